"""Shared fixtures: real databases (SQLite and PostgreSQL), a listener on loopback, Orthanc as a PACS, real DICOM files."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator, MutableSequence, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import pydicom
import pytest
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]
from sqlalchemy import create_engine, event, select, text

from service.assembly import Assembler
from service.clock import ManualClock
from service.database import Database
from service.listener import Listener
from service.settings import Settings, load_settings
from tests.tiers import requires, set_current

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MEDCAP_TEST_SHARED_DATA", REPO.parent / "shared" / "data"))
PG_ADMIN_URL = os.environ.get("MEDCAP_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
STORESCU = "/usr/bin/storescu"  # pynetdicom installs its own `storescu` into the venv; we want dcmtk's


def _missing(path: Path) -> str:
    return f"shared test data {path} is absent (set MEDCAP_TEST_SHARED_DATA to the folder holding the real series)"


SHARED_SERIES = ("ct-head-ge", "ct-phantom-philips", "mr-t1-brain-uih")  # what ../shared/data holds; tests count on all three


def shared_data(*parts: str) -> Path:
    """``SHARED_DATA / parts``, or skip the calling test when that folder is absent (a fresh clone has none).

    With no parts, the whole collection is meant: skip unless every shared series is there.
    """
    for path in [SHARED_DATA.joinpath(*parts)] if parts else [SHARED_DATA / name for name in SHARED_SERIES]:
        if not path.is_dir():
            pytest.skip(_missing(path), allow_module_level=True)
    return SHARED_DATA.joinpath(*parts)


class SeriesFiles(MutableSequence[Path]):
    """A shared series' files, listed only when first used, so a module can name them at import time.

    Without the data, the first use skips the test that uses them rather than erroring the whole collection.
    """

    def __init__(self, name: str, window: slice | None = None, parent: SeriesFiles | None = None) -> None:
        self.name, self._window, self._parent = name, window, parent
        self._files: list[Path] | None = None

    def _list(self) -> list[Path]:
        if self._files is None:
            if self._parent is not None:
                self._files = self._parent._list()[self._window]
            else:
                folder = shared_data(self.name)
                self._files = sorted(p for p in folder.iterdir() if p.is_file())
        return self._files

    @overload
    def __getitem__(self, index: int) -> Path: ...
    @overload
    def __getitem__(self, index: slice) -> SeriesFiles: ...
    def __getitem__(self, index: int | slice) -> Path | SeriesFiles:
        if isinstance(index, slice):
            return SeriesFiles(self.name, index, self)
        return self._list()[index]

    @overload
    def __setitem__(self, index: int, value: Path) -> None: ...
    @overload
    def __setitem__(self, index: slice, value: Iterable[Path]) -> None: ...
    def __setitem__(self, index: int | slice, value: Any) -> None:  # tests shuffle or reorder their copy
        self._list()[index] = value

    def __delitem__(self, index: int | slice) -> None:
        del self._list()[index]

    def insert(self, index: int, value: Path) -> None:
        self._list().insert(index, value)

    def __add__(self, other: Iterable[Path]) -> list[Path]:
        return [*self, *other]

    def __radd__(self, other: Iterable[Path]) -> list[Path]:
        return [*other, *self]

    def __len__(self) -> int:
        return len(self._list())

    def __iter__(self) -> Iterator[Path]:
        return iter(self._list())

    def __repr__(self) -> str:
        return f"SeriesFiles({self.name!r}, {self._window!r})"


def series_files(name: str) -> SeriesFiles:
    return SeriesFiles(name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(condition: Callable[[], object], what: str, timeout: float = 15, interval: float = 0.05) -> None:
    """Poll until ``condition()`` is true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


# -- databases ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    """A migrated PostgreSQL database that each test clones (CREATE DATABASE ... TEMPLATE)."""
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"medcap_tpl_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    db = Database(url)
    db.upgrade()
    db.dispose()
    yield name
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tpl") / "medcap.sqlite"
    db = Database(f"sqlite:///{path}")
    db.upgrade()
    db.dispose()
    return path


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, migrated audit database of each backend."""
    if request.param == "sqlite":
        path = tmp_path / "medcap.sqlite"
        shutil.copy(request.getfixturevalue("sqlite_template"), path)
        yield f"sqlite:///{path}"
        return
    template = request.getfixturevalue("pg_template")
    name = f"medcap_t_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{template}"'))
    yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    database = Database(database_url)
    yield database
    database.dispose()


# -- settings, clock, listener -----------------------------------------------------------


@pytest.fixture
def make_settings(tmp_path: Path, database_url: str):
    def make(**overrides: object) -> Settings:
        values: dict[str, object] = dict(
            data_dir=tmp_path / "data",
            database_url=database_url,
            dicom_bind_address="127.0.0.1",
            dicom_port=free_port(),
            web_port=free_port(),
            allowed_peers="*@127.0.0.1/32",
            quiet_seconds=30,
            max_wait_seconds=600,
            min_free_disk_mb=1,
            broker_url=f"sqla+sqlite:///{tmp_path / 'broker.sqlite'}",
        )
        values.update(overrides)
        return load_settings(**values)

    return make


@pytest.fixture
def settings(make_settings) -> Settings:
    return make_settings()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def start_listener(db: Database, clock: ManualClock):
    started: list[Listener] = []

    def start(settings: Settings, name: str = "test-listener") -> Listener:
        listener = Listener(settings, db, clock, name=name)
        listener.start()
        started.append(listener)
        return listener

    yield start
    for listener in started:
        listener.stop()


@pytest.fixture
def listener(start_listener, settings: Settings) -> Listener:
    return start_listener(settings)


def storescu(
    to: int | Listener,
    files: Sequence[Path],
    *,
    calling: str = "STORESCU",
    called: str = "MEDCAP",
    extra: list[str] | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """Send files with dcmtk's storescu (TCP_NODELAY on, as Debian's build needs).

    Given a listener rather than a port, returns once the listener has recorded the end
    of the association (pynetdicom confirms a release before telling us about it).
    """
    requires("peers")
    if not Path(STORESCU).exists():
        pytest.fail("dcmtk is not installed (apt-get install dcmtk)")
    port = to.port if isinstance(to, Listener) else to
    cmd = [STORESCU, "-aet", calling, "-aec", called, *(extra or []), "127.0.0.1", str(port), *map(str, files)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "TCP_NODELAY": "1"})
    if isinstance(to, Listener):
        assert to.wait_idle(30), "the listener did not record the end of the association"
    return result


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MB filesystem of its own, to fill up for real."""
    mount = tmp_path / "small"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here to fill a disk: {proc.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def open_association(port: int, calling: str = "RAWSENDER") -> Association:
    """A pynetdicom SCU association proposing CT Image Storage to the listener."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDCAP")
    assert assoc.is_established
    return assoc


def send_raw(assoc: Association, files: list[Path]) -> list[int]:
    """C-STORE files byte for byte, without decoding them first, as a broken sender would."""
    previous, _config.STORE_SEND_CHUNKED_DATASET = _config.STORE_SEND_CHUNKED_DATASET, True
    try:
        return [int(assoc.send_c_store(path).Status) for path in files]
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous


# -- the broker as seen by producers ---------------------------------------------------------


class RecordingPublisher:
    """Stands in for the broker where a test drives the queue by hand (the broker is a doorbell:
    what matters is in the database; tests/workers run the real brokers)."""

    def __init__(self) -> None:
        self.published: list[int] = []
        self.dispatches: list[int] = []
        self.fail = False

    def publish(self, job_id: int) -> None:
        if self.fail:
            raise ConnectionError("broker down")
        self.published.append(job_id)

    def publish_dispatch(self, dispatch_id: int) -> None:
        if self.fail:
            raise ConnectionError("broker down")
        self.dispatches.append(dispatch_id)


@pytest.fixture
def publisher() -> RecordingPublisher:
    return RecordingPublisher()


@pytest.fixture
def assembler(db: Database, clock: ManualClock, settings: Settings, publisher: RecordingPublisher) -> Assembler:
    return make_assembler(db, clock, settings, publisher)


def make_assembler(db: Database, clock: ManualClock, settings: Settings, publisher: RecordingPublisher) -> Assembler:
    return Assembler(
        db,
        clock,
        publisher,
        quiet_seconds=settings.quiet_seconds,
        max_wait_seconds=settings.max_wait_seconds,
        redeliver_seconds=settings.job_redeliver_seconds,
        dispatch_stale_seconds=settings.dispatch_stale_seconds,
    )


# -- Orthanc as the PACS (one per session) ---------------------------------------------------

ORTHANC_AET = "ORTHANC"


class Orthanc:
    """A running Orthanc and its REST API (stdlib urllib only)."""

    def __init__(self, process: subprocess.Popen[bytes], http_port: int, dicom_port: int, log: Path) -> None:
        self.process = process
        self.url = f"http://127.0.0.1:{http_port}"
        self.dicom_port = dicom_port
        self.log = log

    def request(self, method: str, path: str, body: bytes | dict[str, Any] | None = None, timeout: float = 120) -> Any:
        """Call the REST API; raises urllib.error.HTTPError on an error status."""
        headers = {}
        if isinstance(body, dict):
            body, headers = json.dumps(body).encode(), {"Content-Type": "application/json"}
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        with urllib.request.urlopen(req, timeout=timeout) as response:
            payload = response.read()
        return json.loads(payload) if payload else None

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else "(no log)"

    def register(self, name: str, ae_title: str, port: int) -> None:
        self.request("PUT", f"/modalities/{name}", {"AET": ae_title, "Host": "127.0.0.1", "Port": port})

    def push(self, modality: str, study_id: str) -> dict[str, Any]:
        """C-STORE a whole study to a registered modality; returns when Orthanc's job is done."""
        reply: dict[str, Any] = self.request("POST", f"/modalities/{modality}/store", {"Resources": [study_id], "Synchronous": True})
        return reply


def _orthanc_binary() -> str:
    # /usr/sbin is not on every user's PATH; Debian installs Orthanc there.
    found = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        pytest.fail("Orthanc is not installed (apt-get install orthanc); these tests need it as the sending PACS")
    return found


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    binary = _orthanc_binary()
    home = tmp_path_factory.mktemp("orthanc")
    http_port, dicom_port = free_port(), free_port()
    config = {
        "Name": "MEDCAP-TEST-PACS",
        "StorageDirectory": str(home / "db"),
        "IndexDirectory": str(home / "db"),
        "Plugins": [],
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomServerEnabled": True,
        "DicomAet": ORTHANC_AET,
        "DicomPort": dicom_port,
        "StableAge": 5,
    }
    (home / "orthanc.json").write_text(json.dumps(config, indent=2))
    log = home / "orthanc.log"
    with log.open("wb") as out:
        # TCP_NODELAY=1: Debian's Orthanc leaves Nagle on otherwise (~40 ms per C-STORE-RSP).
        process = subprocess.Popen(
            [binary, str(home / "orthanc.json")], cwd=home, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "TCP_NODELAY": "1"}
        )
    server = Orthanc(process, http_port, dicom_port, log)
    try:
        _wait_for_rest_api(server, timeout=30)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@dataclass(frozen=True)
class UploadedStudy:
    orthanc_id: str  # Orthanc's own identifier, what /modalities/.../store takes
    study_uid: str
    files: dict[str, Path]  # SOP Instance UID -> source file


@pytest.fixture(scope="session")
def pacs_studies(orthanc: Orthanc) -> dict[str, UploadedStudy]:
    """The CT and MR series, uploaded to Orthanc once per session."""
    studies = {}
    for name in ("ct-head-ge", "mr-t1-brain-uih"):
        files = series_files(name)
        parents = {orthanc.request("POST", "/instances", path.read_bytes())["ParentStudy"] for path in files}
        assert len(parents) == 1, f"{name} should be one study in Orthanc, got {parents}"
        headers = {path: pydicom.dcmread(path, stop_before_pixels=True) for path in files}
        study_uids = {str(h.StudyInstanceUID) for h in headers.values()}
        assert len(study_uids) == 1
        studies[name] = UploadedStudy(parents.pop(), study_uids.pop(), {str(h.SOPInstanceUID): p for p, h in headers.items()})
    return studies


def delete_srs(orthanc: Orthanc) -> None:
    """Remove the SRs MedCap sent, so the shared studies stay as uploaded for the next test."""
    for instance in orthanc.request("POST", "/tools/find", {"Level": "Instance", "Query": {"Modality": "SR"}}):
        orthanc.request("DELETE", f"/instances/{instance}")


def _wait_for_rest_api(server: Orthanc, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if server.process.poll() is not None:
            pytest.fail(f"Orthanc exited with status {server.process.returncode} at start-up:\n{server.log_tail()}")
        try:
            server.request("GET", "/system", timeout=2)
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if time.monotonic() > deadline:
                pytest.fail(f"Orthanc's REST API did not answer within {timeout} s:\n{server.log_tail()}")
            time.sleep(0.1)


@pytest.fixture
def socket_options(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, int]]:
    """Every (level, option, value) set on a socket in this process during the test."""
    calls: list[tuple[int, int, int]] = []
    original = socket.socket.setsockopt

    def spy(self, level, option, value, *rest):
        calls.append((level, option, value))
        return original(self, level, option, value, *rest)

    monkeypatch.setattr(socket.socket, "setsockopt", spy)
    return calls


# -- a captioning model ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny, untrained MSMedCap checkpoint built locally (the pipeline needs a model, not a good one)."""
    import torch

    from models import checkpoint
    from models.msmedcap.model import MedCapModel
    from models.msmedcap.tiny import tiny_config
    from tests.models.parts import tiny_tokenizers

    tokenizers = tiny_tokenizers()
    torch.manual_seed(0)
    model = MedCapModel(tiny_config("msmedcap", lm_vocab=len(tokenizers.lm), qformer_vocab=len(tokenizers.qformer)))
    directory = tmp_path_factory.mktemp("model") / "tiny"
    checkpoint.save(model, tokenizers, directory, checkpoint.Provenance(sources=[{"part": "all", "source": "random (tests)"}]))
    return directory


@pytest.fixture(scope="session")
def captioner(tiny_model: Path):
    from models.captioner import Captioner

    return Captioner.load(tiny_model, "cpu")


@pytest.fixture
def job_id(db, listener, clock, assembler, settings) -> int:
    """A CT study received by the listener and assembled into version 1 with its job."""
    from tests.pipeline import CT

    assert storescu(listener, CT).returncode == 0
    clock.advance(settings.quiet_seconds + 1)
    (created,) = assembler.tick()
    return created


@pytest.fixture
def draft_id(db, clock, settings, captioner, job_id) -> int:
    """The draft SR of that study, written by the drafting step (no destinations)."""
    from service.schema import SRDocument
    from tests.pipeline import make_drafter, runner

    assert runner(db, clock).run(job_id, make_drafter(db, clock, captioner, settings, destinations=()).draft) == "succeeded"
    with db.session() as s:
        return s.scalar(select(SRDocument.id).where(SRDocument.job_id == job_id))


# -- counting reads and statements ------------------------------------------------------------


@pytest.fixture
def dcmread_calls(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The path of every ``pydicom.dcmread`` call from here on (MedCap's code calls it by that name)."""
    calls: list[Path] = []
    real = pydicom.dcmread

    def counting(fp: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(Path(fp) if isinstance(fp, str | os.PathLike) else Path(getattr(fp, "name", "<file object>")))
        return real(fp, *args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", counting)
    return calls


@contextmanager
def sql_statements(db: Database) -> Iterator[list[str]]:
    """The SQL statements ``db`` sends while the block runs, in order."""
    sent: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        sent.append(statement)

    event.listen(db.engine, "before_cursor_execute", record)
    try:
        yield sent
    finally:
        event.remove(db.engine, "before_cursor_execute", record)


# -- test tiers (tests/tiers.py) ---------------------------------------------------------------------

#: Fixtures that bring a peer or a browser with them: their tests get the marker by using them.
TIER_FIXTURES = {"orthanc": "peers", "pacs_studies": "peers", "clean_pacs": "peers", "chromium": "browser"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if getattr(item, "callspec", None) is not None and item.callspec.params.get("database_url") == "postgresql":  # type: ignore[attr-defined]
            item.add_marker(pytest.mark.postgresql)
        for fixture, marker in TIER_FIXTURES.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(getattr(pytest.mark, marker))
        if item.get_closest_marker("orthanc") is not None:
            item.add_marker(pytest.mark.peers)


@pytest.fixture(autouse=True)
def _tier_of_the_running_test(request: pytest.FixtureRequest) -> Iterator[None]:
    set_current(request.node)
    yield
    set_current(None)
