"""Receive throughput: dcmtk storescu -> dcmtk storescp (peer baseline) vs. -> `medcap listen`.

Usage::

    .venv/bin/python benchmarks/receive.py [--instances 504] [--associations 4]
                                           [--database sqlite|postgresql] [--repeat 1]

Both receivers run as real subprocesses on 127.0.0.1 free ports, side by side in one run,
fed the same input files by the same sender (dcmtk ``storescu``, TCP_NODELAY=1). See
benchmarks/README.md for what is measured and why the comparison is set up this way.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pydicom.uid import generate_uid  # noqa: E402

from dicom_io.relabel import relabel_series  # noqa: E402

STORESCU = "/usr/bin/storescu"  # the venv's pynetdicom scripts shadow dcmtk's: use full paths
STORESCP = "/usr/bin/storescp"
ECHOSCU = "/usr/bin/echoscu"
MEDCAP = REPO / ".venv" / "bin" / "medcap"
DEFAULT_SOURCE = Path("/work/shared/data/ct-head-ge")
DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432"
RESULTS = REPO / "benchmarks" / "results"

GOAL_RATIO_ONE = 0.35  # MedCap / storescp, one association
STORESCP_AET = "STORESCP"
MEDCAP_AET = "MEDCAP"
SENDER_AET = "BENCHSCU"

# Every subprocess we start, so that a crash or Ctrl-C still kills it (its whole group).
_CHILDREN: list[subprocess.Popen[bytes]] = []


# -- processes ----------------------------------------------------------------------------


def dcmtk_env() -> dict[str, str]:
    # Debian's dcmtk leaves Nagle on unless told: ~11 instead of ~700 instances/s.
    return {**os.environ, "TCP_NODELAY": "1"}


def spawn(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    _CHILDREN.append(proc)
    return proc


def stop(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """SIGTERM the process group, then SIGKILL it if it has not gone in ``timeout`` seconds."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(wait)
            break
        except subprocess.TimeoutExpired:
            continue
    # storescp --fork children share the group; make sure none is left behind.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    if proc in _CHILDREN:
        _CHILDREN.remove(proc)


def stop_all() -> None:
    for proc in list(_CHILDREN):
        stop(proc, timeout=5.0)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(proc: subprocess.Popen[bytes], port: int, called_aet: str, log: Path, timeout: float = 60.0) -> None:
    """Wait until a C-ECHO on 127.0.0.1:port succeeds (the receiver accepts associations)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"receiver exited with status {proc.returncode} before it was ready; see {log}")
        echo = subprocess.run(
            [ECHOSCU, "-aet", SENDER_AET, "-aec", called_aet, "-to", "2", "127.0.0.1", str(port)], env=dcmtk_env(), capture_output=True
        )
        if echo.returncode == 0:
            return
        time.sleep(0.2)
    raise RuntimeError(f"receiver on port {port} not ready after {timeout:.0f} s; see {log}")


def send(port: int, called_aet: str, sets: list[list[Path]], logdir: Path, tag: str) -> float:
    """Start one storescu per entry of ``sets`` at once; return seconds until the last one exits."""
    cmds = [[STORESCU, "-aet", SENDER_AET, "-aec", called_aet, "+sd", "+r", "127.0.0.1", str(port), *map(str, dirs)] for dirs in sets]
    logs = [logdir / f"storescu-{tag}-{i}.log" for i in range(len(cmds))]
    start = time.perf_counter()
    procs = [spawn(cmd, dcmtk_env(), log) for cmd, log in zip(cmds, logs, strict=True)]
    for proc in procs:
        proc.wait()
    elapsed = time.perf_counter() - start
    for proc, log in zip(procs, logs, strict=True):
        _CHILDREN.remove(proc)
        if proc.returncode != 0:
            tail = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"storescu exited with status {proc.returncode} ({log}):\n{tail}")
    return elapsed


# -- inputs -------------------------------------------------------------------------------


@dataclass
class Inputs:
    sets: list[Path]  # one directory (one study) per association of the concurrent scenario
    set_sizes: list[int]
    warmup: Path
    warmup_size: int

    @property
    def total(self) -> int:
        return sum(self.set_sizes)


def make_inputs(source: Path, root: Path, instances: int, associations: int) -> Inputs:
    """Copies of the source series under fresh UIDs: ``associations`` studies, ``instances`` in all.

    Each set is one study made of whole series (the last one maybe partial), so the one-
    association run (all sets) and the concurrent run (one set per storescu) send the same files.
    """
    files = sorted(p for p in source.iterdir() if p.is_file())
    if not files:
        raise SystemExit(f"no DICOM files in {source}")
    sizes = [instances // associations + (1 if i < instances % associations else 0) for i in range(associations)]
    sets = []
    for i, size in enumerate(sizes):
        set_dir = root / f"set{i}"
        study_uid = generate_uid()
        done, series = 0, 0
        while done < size:
            chunk = files[: min(len(files), size - done)]
            relabel_series(chunk, set_dir / f"series{series:02d}", study_uid=study_uid)
            done += len(chunk)
            series += 1
        sets.append(set_dir)
    warmup = root / "warmup"
    relabel_series(files, warmup / "series00")
    return Inputs(sets, sizes, warmup, len(files))


# -- receivers ----------------------------------------------------------------------------


@dataclass
class Run:
    receiver: str
    scenario: str
    associations: int
    instances: int
    seconds: float
    rate: float
    received: int
    extra: dict[str, Any] = field(default_factory=dict)


def count_files(directory: Path) -> int:
    return sum(1 for p in directory.rglob("*") if p.is_file() and not p.name.startswith("."))


def run_storescp(inputs: Inputs, sets: list[list[Path]], scenario: str, workdir: Path, pdu: int | None) -> Run:
    out = workdir / "out"
    out.mkdir(parents=True)
    port = free_port()
    log = workdir / "storescp.log"
    cmd = [STORESCP, "-aet", STORESCP_AET, "-od", str(out)]
    if pdu:
        cmd += ["-pdu", str(pdu)]
    if len(sets) > 1:
        cmd.append("--fork")  # without it storescp serves one association at a time
    # storescp has no bind option and listens on 0.0.0.0; we only ever send to 127.0.0.1.
    proc = spawn([*cmd, str(port)], dcmtk_env(), log)
    try:
        wait_ready(proc, port, STORESCP_AET, log)
        send(port, STORESCP_AET, [[inputs.warmup]], workdir, "warmup")
        seconds = send(port, STORESCP_AET, sets, workdir, "timed")
        expected = inputs.warmup_size + inputs.total
        deadline = time.monotonic() + 10  # --fork children answer after writing; this is belt and braces
        while (received := count_files(out)) < expected and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop(proc)
    return Run(
        "storescp",
        scenario,
        len(sets),
        inputs.total,
        seconds,
        inputs.total / seconds,
        received - inputs.warmup_size,
        {"fork": len(sets) > 1, "max_pdu": pdu or 16384},
    )


class Postgres:
    """A fresh database per MedCap run, created and dropped through the server's `postgres` db."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")

    def _admin(self) -> Any:
        import psycopg
        from sqlalchemy.engine import make_url

        url = make_url(self.base_url + "/postgres")
        return psycopg.connect(
            host=url.host, port=url.port or 5432, user=url.username, password=url.password, dbname="postgres", autocommit=True
        )

    def create(self) -> tuple[str, str]:
        name = f"medcap_bench_{uuid.uuid4().hex[:12]}"
        with self._admin() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return name, f"{self.base_url}/{name}"

    def drop(self, name: str) -> None:
        with self._admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def count_instances(url: str) -> int:
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(text("SELECT count(*) FROM instances")).scalar_one())
    finally:
        engine.dispose()


def run_medcap(
    inputs: Inputs, sets: list[list[Path]], scenario: str, workdir: Path, pg: Postgres | None, profile: Path | None = None
) -> Run:
    data_dir = workdir / "data"
    db_name = None
    if pg is None:
        url = f"sqlite:///{(data_dir / 'medcap.sqlite').resolve()}"
    else:
        db_name, url = pg.create()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDCAP_")}
    env.update(
        MEDCAP_DATA_DIR=str(data_dir),
        MEDCAP_DATABASE_URL=url,
        MEDCAP_DICOM_PORT=str(port),
        MEDCAP_DICOM_BIND_ADDRESS="127.0.0.1",
        MEDCAP_ALLOWED_PEERS="*@127.0.0.1/32",
        MEDCAP_QUIET_SECONDS="86400",
        MEDCAP_MAX_WAIT_SECONDS="86400",
        MEDCAP_LOG_LEVEL="WARNING",
    )
    log = workdir / "medcap.log"
    proc = None
    try:
        data_dir.mkdir(parents=True)
        upgrade = subprocess.run([str(MEDCAP), "db", "upgrade"], env=env, capture_output=True, text=True)
        if upgrade.returncode != 0:
            raise RuntimeError(f"medcap db upgrade failed:\n{upgrade.stdout}{upgrade.stderr}")
        cmd = [str(MEDCAP), "listen"]
        if profile is not None:
            cmd = [
                str(REPO / ".venv" / "bin" / "py-spy"),
                "record",
                "--idle",
                "--threads",
                "--rate",
                "200",
                "--format",
                "raw",
                "-o",
                str(profile),
                "--",
                *cmd,
            ]
        proc = spawn(cmd, env, log)
        wait_ready(proc, port, MEDCAP_AET, log)
        send(port, MEDCAP_AET, [[inputs.warmup]], workdir, "warmup")
        seconds = send(port, MEDCAP_AET, sets, workdir, "timed")
        rows = count_instances(url)  # MedCap answers Success only after the row is committed
        files = count_files(data_dir / "instances")
    finally:
        if proc is not None:
            if profile is not None:
                # Ctrl-C for the group: medcap stops cleanly, py-spy writes its profile.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGINT)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(60)
            stop(proc, timeout=30.0)
        if db_name is not None:
            pg.drop(db_name)  # type: ignore[union-attr]
    return Run(
        "medcap",
        scenario,
        len(sets),
        inputs.total,
        seconds,
        inputs.total / seconds,
        rows - inputs.warmup_size,
        {"files": files - inputs.warmup_size, "database": "sqlite" if pg is None else "postgresql"},
    )


# -- report -------------------------------------------------------------------------------


def tool_version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
        return out.strip().splitlines()[0] if out.strip() else "?"
    except Exception:
        return "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=504, help="instances per scenario (default 504 = 18 x 28)")
    parser.add_argument("--associations", type=int, default=4, help="concurrent associations of the second scenario (default 4)")
    parser.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite", help="MedCap's audit database")
    parser.add_argument("--repeat", type=int, default=1, help="runs per scenario and receiver; the median is reported")
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help=f"series to copy (default {DEFAULT_SOURCE})")
    parser.add_argument("--pg-url", default=DEFAULT_PG, help=f"PostgreSQL server, without database (default {DEFAULT_PG})")
    parser.add_argument(
        "--storescp-pdu", type=int, default=None, help="storescp max receive PDU, 4096..131072 (default: dcmtk's own default, 16384)"
    )
    parser.add_argument("--workdir", type=Path, default=None, help="where inputs and receiver output go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, received files)")
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="run MedCap under py-spy (must be installed in .venv) and write raw profiles with this prefix",
    )
    parser.add_argument("--fail-on-goals", action="store_true", help="exit with status 3 when a goal is missed")
    args = parser.parse_args(argv)
    if args.instances < args.associations or args.associations < 2 or args.repeat < 1:
        parser.error("need --associations >= 2, --instances >= --associations, --repeat >= 1")
    for tool in (STORESCU, STORESCP, ECHOSCU):
        if not Path(tool).is_file():
            parser.error(f"{tool} not found: install dcmtk")
    if not MEDCAP.is_file():
        parser.error(f"{MEDCAP} not found: run scripts/ensure-venv")

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the finally blocks run
    root = Path(tempfile.mkdtemp(prefix="medcap-receive-", dir=args.workdir))
    pg = Postgres(args.pg_url) if args.database == "postgresql" else None
    runs: list[Run] = []
    try:
        t = time.perf_counter()
        inputs = make_inputs(args.source, root / "inputs", args.instances, args.associations)
        print(
            f"inputs: {inputs.total} instances in {args.associations} studies ({inputs.set_sizes}) "
            f"+ {inputs.warmup_size} warm-up, made in {time.perf_counter() - t:.1f} s under {root}"
        )
        scenarios = [("1 association", [inputs.sets]), (f"{args.associations} associations", [[d] for d in inputs.sets])]
        n = 0
        for rep in range(args.repeat):
            for scenario, sets in scenarios:
                for receiver in ("storescp", "medcap"):
                    n += 1
                    workdir = root / f"run{n:02d}-{receiver}-{len(sets)}"
                    workdir.mkdir()
                    if receiver == "storescp":
                        run = run_storescp(inputs, sets, scenario, workdir, args.storescp_pdu)
                    else:
                        prof = None if args.profile is None else Path(f"{args.profile}-{len(sets)}assoc-{rep}.txt")
                        run = run_medcap(inputs, sets, scenario, workdir, pg, prof)
                    status = "ok" if run.received == run.instances else f"MISSING {run.instances - run.received}"
                    print(
                        f"  [{rep + 1}/{args.repeat}] {scenario:<16} {receiver:<8} {run.seconds:6.2f} s "
                        f"{run.rate:7.1f} inst/s  received {run.received}/{run.instances} {status}",
                        flush=True,
                    )
                    runs.append(run)
                    if run.received != run.instances:
                        raise RuntimeError(f"{receiver} received {run.received} of {run.instances} instances ({workdir})")
                    if run.extra.get("files", run.instances) != run.instances:
                        raise RuntimeError(f"{receiver} has {run.extra['files']} files for {run.instances} instances ({workdir})")
    finally:
        stop_all()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"work directory kept: {root}")

    def median(receiver: str, scenario: str) -> float:
        return statistics.median(r.rate for r in runs if r.receiver == receiver and r.scenario == scenario)

    rows = []
    for scenario, _ in scenarios:
        scp, med = median("storescp", scenario), median("medcap", scenario)
        rows.append({"scenario": scenario, "storescp": scp, "medcap": med, "ratio": med / scp})
    one, many = rows
    goals = [
        {
            "goal": f"MedCap/storescp on one association >= {GOAL_RATIO_ONE}",
            "value": round(one["ratio"], 3),
            "met": one["ratio"] >= GOAL_RATIO_ONE,
        },
        {
            "goal": f"MedCap with {args.associations} associations >= MedCap with one",
            "value": round(many["medcap"] / one["medcap"], 3),
            "met": many["medcap"] >= one["medcap"],
        },
    ]

    print()
    print(
        f"Receive throughput, {inputs.total} instances of 512x512 CT, sender dcmtk storescu, "
        f"MedCap database {args.database}, median of {args.repeat}"
    )
    print(f"{'scenario':<18} {'storescp inst/s':>16} {'MedCap inst/s':>14} {'MedCap/storescp':>16}")
    for r in rows:
        print(f"{r['scenario']:<18} {r['storescp']:>16.1f} {r['medcap']:>14.1f} {r['ratio']:>16.2f}")
    print()
    for g in goals:
        print(f"goal: {g['goal']}: {g['value']:.2f} -> {'MET' if g['met'] else 'NOT MET'}")

    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = RESULTS / f"receive-{stamp}.json"
    out.write_text(
        json.dumps(
            {
                "benchmark": "receive",
                "utc": stamp,
                "config": {
                    "instances": inputs.total,
                    "set_sizes": inputs.set_sizes,
                    "associations": args.associations,
                    "database": args.database,
                    "repeat": args.repeat,
                    "source": str(args.source),
                    "storescp_max_pdu": args.storescp_pdu or 16384,
                    "profiled": args.profile is not None,
                },
                "environment": {
                    "host": platform.node(),
                    "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                    "dcmtk": tool_version([STORESCP, "--version"]),
                    "platform": platform.platform(),
                },
                "summary": rows,
                "goals": goals,
                "runs": [asdict(r) for r in runs],
            },
            indent=2,
        )
    )
    print(f"results: {out.relative_to(REPO)}")
    return 3 if args.fail_on_goals and not all(g["met"] for g in goals) else 0


if __name__ == "__main__":
    sys.exit(main())
