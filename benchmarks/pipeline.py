"""Pipeline latency and throughput: studies in over DICOM, draft SRs out to a PACS, acknowledged.

Usage::

    .venv/bin/python benchmarks/pipeline.py [--model DIR] [--latency-studies 20] [--burst-studies 50]
                                            [--database sqlite|postgresql] [--broker embedded|redis]
                                            [--pacs storescp|orthanc]

The whole pipeline runs as real processes: ``medcap serve`` (listener, assembler, one caption
worker, one dispatch worker) on the embedded default (SQLite + the embedded broker) or on
PostgreSQL + Redis; dcmtk ``storescu`` sends relabelled copies of the shared CT and MR series;
dcmtk ``storescp`` (or Orthanc) is the PACS in MEDCAP_DESTINATIONS. Every time comes from the
audit database (``instances.received_at``, the ``jobs`` milestones, ``dispatches``,
``dispatch_attempts``). Separately, in this process, the same files go through
``prepare_series`` + ``Captioner.caption`` with the same settings ("inference alone"): once per
source before MedCap starts, and after every one-at-a-time study while MedCap is idle (paired,
the denominator of the overhead ratio). See benchmarks/README.md for the definitions.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import receive as rb  # noqa: E402  # process helpers shared with the receive benchmark
from pydicom.uid import generate_uid  # noqa: E402

from dicom_io.relabel import relabel_series  # noqa: E402

MEDCAP = REPO / ".venv" / "bin" / "medcap"
SHARED = Path(os.environ.get("MEDCAP_TEST_SHARED_DATA", "/work/shared/data"))
DEFAULT_SOURCES = "ct-head-ge,mr-t1-brain-uih"
CACHE = REPO / "benchmarks" / ".cache"
DEFAULT_MODEL = CACHE / "demo-model"
RESULTS = REPO / "benchmarks" / "results"
DEFAULT_REDIS = "redis://127.0.0.1:6379/14"  # a database number of this benchmark's own, flushed
GOAL_RATIO = 1.2  # (end-to-end - quiet) / inference alone, CPU, demo model
PACS_AET = "PACS"
MEDCAP_AET = "MEDCAP"
SENDER_AET = "BENCHSCU"

# -- inputs --------------------------------------------------------------------------------


@dataclass
class StudyInput:
    source: str  # name of the shared series it copies
    study_uid: str
    directory: Path
    files: list[Path]
    phase: str  # warmup | latency | burst
    send_start: dt.datetime | None = None
    send_end: dt.datetime | None = None


def make_studies(sources: dict[str, list[Path]], root: Path, phase: str, count: int, progress: Any) -> list[StudyInput]:
    """``count`` studies cycling through the sources, each a copy under fresh UIDs."""
    names = list(sources)
    studies = []
    for i in range(count):
        name = names[i % len(names)]
        uid = generate_uid()
        directory = root / phase / f"{i:03d}-{name}"
        files = relabel_series(sources[name], directory / "series00", study_uid=uid)
        studies.append(StudyInput(name, uid, directory, files, phase))
        progress.update(1)
    return studies


# -- the model -----------------------------------------------------------------------------


def ensure_model(path: Path, default: bool) -> Path:
    if (path / "config.json").is_file():
        return path
    if not default:
        raise SystemExit(f"--model {path}: not a MedCap checkpoint directory (no config.json)")
    print(f"building the demo model into {path} (`medcap model demo`, several minutes on CPU) ...", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDCAP_")} | {"HF_HUB_OFFLINE": "1"}
    subprocess.run([str(MEDCAP), "model", "demo", "--out", str(path)], env=env, check=True)
    return path


@dataclass
class InferenceAlone:
    source: str
    images: int
    repeats: int
    prepare: list[float]
    caption: list[float]
    # The worker's SR step without the database, timed once per repeat as well: the evidence from
    # the headers prepare_series kept, building the SR (highdicom), serialising + durable write.
    sr_evidence: list[float] = field(default_factory=list)
    sr_build: list[float] = field(default_factory=list)
    sr_store: list[float] = field(default_factory=list)

    @property
    def total(self) -> list[float]:
        return [p + c for p, c in zip(self.prepare, self.caption, strict=True)]


class InferenceBench:
    """Warm, in-process: what a caption job's model work costs without the pipeline around it.

    Mirrors workers/drafting.py: prepare_series on the study's files with the worker's key-slice
    settings and the model's image sizes, then every key image of the study in one caption call;
    then, untimed for the ratio but reported, the SR as the worker builds it (its own methods,
    minus the database).
    """

    def __init__(self, model_dir: Path, args: argparse.Namespace, scratch: Path) -> None:
        import torch

        from dicom_io.key_slices import KeySliceSpec
        from dicom_io.sr import AlgorithmInfo
        from models.captioner import Captioner
        from service.storage import Storage

        self.args = args
        if args.torch_threads:
            torch.set_num_threads(args.torch_threads)
        self.captioner = Captioner.load(model_dir, "cpu")
        self.captioner.warm_up()
        self.spec = KeySliceSpec(strategy=args.key_slice_strategy, n=args.key_slices)
        # The worker's data dir: the study copies (inputs/) lie under it, the SRs go to its reports/.
        self.storage = Storage(scratch)
        self.reports = self.storage.reports_dir
        identity = self.captioner.identity
        self.algorithm = AlgorithmInfo(identity.name, identity.version, identity.weights_sha256, args.preset)
        views = ", ".join(f"{v.name} {v.size}²" for v in self.captioner.views)
        self.info = {**self.captioner.describe(), "torch_threads": torch.get_num_threads(), "views": views}

    def measure(self, study: StudyInput, repeats: int, untimed_first: bool) -> InferenceAlone:
        import numpy as np
        import pydicom

        from dicom_io.model_input import prepare_series
        from dicom_io.sr import SeriesFinding, write_draft_sr
        from models.grounding import ground
        from workers.drafting import DraftSource, facts_of, grounded_impression, printable, procedures_of, sr_evidence

        views = self.captioner.views
        headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in study.files]
        source = DraftSource(
            0, study.study_uid, 0, 1, {str(h.SOPInstanceUID): (str(h.SOPClassUID), p) for h, p in zip(headers, study.files, strict=True)}
        )
        run = InferenceAlone(study.source, 0, repeats, [], [])
        for rep in range(repeats + (1 if untimed_first else 0)):
            t0 = time.perf_counter()
            series = prepare_series(study.files, key_slices=self.spec, views=views)
            t1 = time.perf_counter()
            inputs = {v.name: np.concatenate([s.views[v.name] for s in series]) for v in views}
            flat = self.captioner.caption(inputs, self.args.preset, batch_size=self.args.batch_size)
            t2 = time.perf_counter()
            # As the caption worker (workers/drafting.py): grounded in the header facts, coded in the SR.
            facts = [facts_of(s) for s in series]
            grounded, start = [], 0
            for s, f in zip(series, facts, strict=True):
                grounded.append(ground([printable(c) for c in flat[start : start + len(s.key_slices)]], f))
                start += len(s.key_slices)
            findings = [
                SeriesFinding(
                    s.series_uid,
                    g.text,
                    [(source.instances[u][0], u, fr) for u, fr in zip(s.sop_instance_uids, s.key_slices.frames, strict=True)],
                    finding_site=f.region.code if f.region else None,
                    laterality=f.laterality_code,
                )
                for s, g, f in zip(series, grounded, facts, strict=True)
            ]
            t3 = time.perf_counter()
            evidence = sr_evidence(series)
            t4 = time.perf_counter()
            sr = write_draft_sr(
                findings, grounded_impression(grounded), self.algorithm, evidence, created_at=utcnow(), procedures=procedures_of(facts)
            )
            t5 = time.perf_counter()
            self.storage.write_report(study.study_uid, sr)
            t6 = time.perf_counter()
            if rep or not untimed_first:
                run.prepare.append(t1 - t0)
                run.caption.append(t2 - t1)
                run.sr_evidence.append(t4 - t3)
                run.sr_build.append(t5 - t4)
                run.sr_store.append(t6 - t5)
            run.images = sum(len(s.key_slices) for s in series)
        shutil.rmtree(self.reports, ignore_errors=True)
        return run

    def close(self) -> None:
        del self.captioner
        gc.collect()


def process_group_cpu(pgid: int) -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) used so far by each live process of a process group, with a
    short name for its role in ``medcap serve``."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmd = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if int(fields[2]) != pgid:  # fields after the command: state ppid pgrp ... utime(11) stime(12)
            continue
        pid, ppid = int(stat.parent.name), int(fields[1])
        if " serve" in cmd:
            role = "serve (listener, assembler)"
        elif cmd.rstrip().endswith(" web"):
            role = "web"
        else:
            queue = "caption" if "--queues caption" in cmd else "dispatch" if "--queues dispatch" in cmd else "other"
            role = f"{queue} worker {'main' if ppid == pgid else 'pool process'}"
        out[pid] = (role, (int(fields[11]) + int(fields[12])) / tick)
    return out


def cpu_by_role(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    roles: dict[str, float] = {}
    for pid, (role, cpu) in after.items():
        roles[role] = roles.get(role, 0.0) + cpu - (before.get(pid, (role, 0.0))[1])
    return dict(sorted(roles.items()))


def code_fingerprint() -> str:
    """sha256 over the product's Python files (the working tree changes under a benchmark; no git here)."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(p for d in ("service", "workers", "dicom_io", "models", "migrations") for p in (REPO / d).rglob("*.py")):
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


# -- the PACS ------------------------------------------------------------------------------


class StoreSCP:
    name = "storescp"

    def __init__(self, workdir: Path) -> None:
        self.out = workdir / "pacs"
        self.out.mkdir(parents=True)
        self.port = rb.free_port()
        self.log = workdir / "storescp.log"
        # storescp has no bind option and listens on 0.0.0.0; only 127.0.0.1 is ever used.
        self.proc = rb.spawn([rb.STORESCP, "-aet", PACS_AET, "-od", str(self.out), str(self.port)], rb.dcmtk_env(), self.log)
        rb.wait_ready(self.proc, self.port, PACS_AET, self.log)

    @property
    def destination(self) -> str:
        return f"{PACS_AET}@127.0.0.1:{self.port}"

    def count_srs(self) -> int:
        return sum(1 for p in self.out.iterdir() if p.is_file() and p.name.startswith("SR"))

    def stop(self) -> None:
        rb.stop(self.proc)


class OrthancPACS:
    name = "orthanc"
    binary = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/local/sbin")

    def __init__(self, workdir: Path) -> None:
        if self.binary is None:
            raise SystemExit("--pacs orthanc: Orthanc is not installed")
        home = workdir / "orthanc"
        home.mkdir(parents=True)
        self.http_port, self.port = rb.free_port(), rb.free_port()
        config = {
            "Name": "MEDCAP-BENCH-PACS",
            "StorageDirectory": str(home / "db"),
            "IndexDirectory": str(home / "db"),
            "Plugins": [],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": PACS_AET,
            "DicomPort": self.port,
            "StableAge": 5,
        }
        (home / "orthanc.json").write_text(json.dumps(config, indent=2))
        self.log = workdir / "orthanc.log"
        # TCP_NODELAY=1: Debian's Orthanc leaves Nagle on otherwise (~40 ms per C-STORE-RSP).
        self.proc = rb.spawn([self.binary, str(home / "orthanc.json")], rb.dcmtk_env(), self.log)
        rb.wait_ready(self.proc, self.port, PACS_AET, self.log)

    @property
    def destination(self) -> str:
        return f"{PACS_AET}@127.0.0.1:{self.port}"

    def count_srs(self) -> int:
        body = json.dumps({"Level": "Instance", "Query": {"Modality": "SR"}}).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}/tools/find", data=body, method="POST", headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=60) as response:
            return len(json.loads(response.read()))

    def stop(self) -> None:
        rb.stop(self.proc, timeout=30.0)


# -- MedCap --------------------------------------------------------------------------------


class MedCapServe:
    """``medcap serve`` on a fresh data dir (and a fresh PostgreSQL database / flushed Redis db)."""

    def __init__(self, workdir: Path, model: Path, destination: str, args: argparse.Namespace) -> None:
        self.data_dir = workdir / "data"
        self.data_dir.mkdir(parents=True)
        self.port = rb.free_port()
        self.log = workdir / "medcap.log"
        self.pg = rb.Postgres(args.pg_url) if args.database == "postgresql" else None
        self.db_name = None
        self.redis_url = args.redis_url if args.broker == "redis" else None
        env = {k: v for k, v in os.environ.items() if not k.startswith("MEDCAP_")}
        env.update(
            HF_HUB_OFFLINE="1",
            MEDCAP_DATA_DIR=str(self.data_dir),
            MEDCAP_DICOM_PORT=str(self.port),
            MEDCAP_DICOM_BIND_ADDRESS="127.0.0.1",
            MEDCAP_ALLOWED_PEERS="*@127.0.0.1/32",
            MEDCAP_QUIET_SECONDS=str(args.quiet),
            MEDCAP_MAX_WAIT_SECONDS="600",
            MEDCAP_ASSEMBLY_INTERVAL_SECONDS=str(args.assembly_interval),
            MEDCAP_MODEL=str(model),
            MEDCAP_DESTINATIONS=destination,
            MEDCAP_DEVICE="cpu",
            MEDCAP_KEY_SLICES=str(args.key_slices),
            MEDCAP_KEY_SLICE_STRATEGY=args.key_slice_strategy,
            MEDCAP_CAPTION_BATCH_SIZE=str(args.batch_size),
            MEDCAP_GENERATION_PRESET=args.preset,
            MEDCAP_LOG_LEVEL=args.log_level,
            MEDCAP_MIN_FREE_DISK_MB="100",
        )
        from service.settings import Settings

        if "web_port" in Settings.model_fields:  # `medcap serve` also starts the review web app: keep it off shared ports
            env["MEDCAP_WEB_PORT"] = str(rb.free_port())
        if "web_bind_address" in Settings.model_fields:
            env["MEDCAP_WEB_BIND_ADDRESS"] = "127.0.0.1"
        if args.torch_threads:  # torch reads these at start-up in the caption worker
            env.update(OMP_NUM_THREADS=str(args.torch_threads), MKL_NUM_THREADS=str(args.torch_threads))
        if self.pg is not None:
            self.db_name, self.url = self.pg.create()
            env["MEDCAP_DATABASE_URL"] = self.url
        else:
            self.url = f"sqlite:///{(self.data_dir / 'medcap.sqlite').resolve()}"
        if self.redis_url is not None:
            import redis

            redis.Redis.from_url(self.redis_url).flushdb()
            env["MEDCAP_BROKER_URL"] = self.redis_url
        self.env = env
        self.proc = rb.spawn([str(MEDCAP), "serve"], env, self.log)
        rb.wait_ready(self.proc, self.port, MEDCAP_AET, self.log, timeout=120)
        from sqlalchemy import create_engine

        self.engine = create_engine(self.url.replace("postgresql://", "postgresql+psycopg://", 1))

    def stop(self) -> None:
        try:
            self.engine.dispose()
            rb.stop(self.proc, timeout=30.0)
        finally:
            if self.db_name is not None:
                self.pg.drop(self.db_name)  # type: ignore[union-attr]
            if self.redis_url is not None:
                import redis

                redis.Redis.from_url(self.redis_url).flushdb()

    # -- reading the audit database --

    def jobs_by_study(self) -> dict[str, dict[str, Any]]:
        from sqlalchemy import select

        from service.schema import Job, Study, StudyVersion

        with self.engine.connect() as conn:
            rows = conn.execute(
                select(
                    Study.study_uid,
                    Job.id,
                    Job.status,
                    Job.attempts,
                    Job.error,
                    Job.created_at,
                    Job.enqueued_at,
                    Job.started_at,
                    Job.inferred_at,
                    Job.sr_written_at,
                    Job.acknowledged_at,
                    Job.finished_at,
                )
                .join(StudyVersion, StudyVersion.study_id == Study.id)
                .join(Job, Job.study_version_id == StudyVersion.id)
                .order_by(Job.id)
            ).all()
        out: dict[str, dict[str, Any]] = {}
        for row in rows:
            m = row._asdict()
            if m["study_uid"] in out:
                m["extra_jobs"] = out[m["study_uid"]].get("extra_jobs", 0) + 1
            out[m["study_uid"]] = m
        return out

    def acknowledged(self, study_uids: list[str]) -> tuple[int, list[str]]:
        """How many of these studies have their SR acknowledged; which jobs failed."""
        jobs = self.jobs_by_study()
        done = sum(1 for uid in study_uids if uid in jobs and jobs[uid]["acknowledged_at"] is not None)
        failed = [
            f"{uid}: {jobs[uid]['status']} {jobs[uid]['error']}"
            for uid in study_uids
            if uid in jobs and jobs[uid]["status"] in ("failed", "superseded")
        ]
        return done, failed

    def timeline(self) -> dict[str, dict[str, Any]]:
        """Per study: received, the job milestones, and the dispatch's own steps."""
        from sqlalchemy import func, select

        from service.schema import Dispatch, DispatchAttempt, Instance, Output, SRDocument, Study, UTCDateTime

        jobs = self.jobs_by_study()
        with self.engine.connect() as conn:
            received = conn.execute(
                select(
                    Study.study_uid,
                    func.min(Instance.received_at, type_=UTCDateTime),
                    func.max(Instance.received_at, type_=UTCDateTime),
                    func.count(),
                )
                .join(Instance, Instance.study_id == Study.id)
                .group_by(Study.study_uid)
            ).all()
            dispatches = conn.execute(
                select(
                    SRDocument.job_id,
                    Dispatch.id,
                    Dispatch.status,
                    Dispatch.attempts,
                    Dispatch.created_at,
                    Dispatch.enqueued_at,
                    Dispatch.started_at,
                    Dispatch.delivered_at,
                )
                .join(Output, Output.id == Dispatch.output_id)
                .join(SRDocument, SRDocument.id == Output.report_id)
            ).all()
            attempts = conn.execute(
                select(
                    DispatchAttempt.dispatch_id, DispatchAttempt.started_at, DispatchAttempt.finished_at, DispatchAttempt.outcome
                ).order_by(DispatchAttempt.id)
            ).all()
        last_attempt = {a.dispatch_id: a for a in attempts}
        by_job = {d.job_id: d for d in dispatches}  # one destination
        out = {}
        for uid, first, last, count in received:
            job = jobs.get(uid)
            if job is None:
                continue
            d = by_job.get(job["id"])
            a = last_attempt.get(d.id) if d is not None else None
            out[uid] = {
                **job,
                "first_received": first,
                "last_received": last,
                "instances": count,
                "dispatch_status": d.status if d else None,
                "dispatch_attempts": d.attempts if d else None,
                "dispatch_enqueued": d.enqueued_at if d else None,
                "dispatch_started": d.started_at if d else None,
                "attempt_started": a.started_at if a else None,
                "attempt_finished": a.finished_at if a else None,
            }
        return out


# -- sending and waiting -------------------------------------------------------------------


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def send_study(port: int, study: StudyInput, logdir: Path) -> None:
    log = logdir / f"storescu-{study.phase}-{study.directory.name}.log"
    study.send_start = utcnow()
    with log.open("wb") as out:
        proc = subprocess.run(
            [rb.STORESCU, "-aet", SENDER_AET, "-aec", MEDCAP_AET, "+sd", "+r", "127.0.0.1", str(port), str(study.directory)],
            env=rb.dcmtk_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    study.send_end = utcnow()
    if proc.returncode != 0:
        raise RuntimeError(f"storescu exited with status {proc.returncode} for {study.directory} ({log})")


def wait_acknowledged(medcap: MedCapServe, studies: list[StudyInput], timeout: float, progress: Any = None, interval: float = 0.1) -> None:
    uids = [s.study_uid for s in studies]
    deadline = time.monotonic() + timeout
    seen = 0
    while True:
        done, failed = medcap.acknowledged(uids)
        if progress is not None and done > seen:
            progress.update(done - seen)
            seen = done
        if failed:
            raise RuntimeError(f"job(s) did not succeed: {failed[:3]}; see {medcap.log}")
        if done == len(uids):
            return
        if medcap.proc.poll() is not None:
            raise RuntimeError(f"medcap serve exited with status {medcap.proc.returncode}; see {medcap.log}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(uids) - done} of {len(uids)} SR(s) not acknowledged after {timeout:.0f} s; see {medcap.log}")
        time.sleep(interval)


# -- statistics ----------------------------------------------------------------------------


def secs(a: dt.datetime | None, b: dt.datetime | None) -> float | None:
    return None if a is None or b is None else (b - a).total_seconds()


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


STAGES = [
    # (key, label, definition); the five first-level stages add up to the end-to-end latency
    ("assembly", "assembly delay", "created_at − (last received + quiet)"),
    ("queue", "queue wait", "started_at − created_at"),
    ("queue.publish", "  · publish (assembler → broker)", "enqueued_at − created_at"),
    ("queue.pickup", "  · broker → caption worker", "started_at − enqueued_at"),
    ("inference", "inference (in the worker)", "inferred_at − started_at"),
    ("sr", "SR write", "sr_written_at − inferred_at"),
    ("dispatch", "dispatch", "acknowledged_at − sr_written_at"),
    ("dispatch.publish", "  · publish (caption worker or assembler → broker)", "dispatches.enqueued_at − sr_written_at"),
    ("dispatch.pickup", "  · broker → dispatch worker", "dispatches.started_at − dispatches.enqueued_at"),
    ("dispatch.prepare", "  · claim → association start", "attempt.started_at − dispatches.started_at"),
    ("dispatch.send", "  · association + C-STORE", "attempt.finished_at − attempt.started_at"),
    ("dispatch.record", "  · record delivery", "acknowledged_at − attempt.finished_at"),
    ("e2e", "end-to-end", "acknowledged_at − last received − quiet"),
]


def stage_times(t: dict[str, Any], quiet: float) -> dict[str, float | None]:
    stable = t["last_received"] + dt.timedelta(seconds=quiet)
    return {
        "assembly": secs(stable, t["created_at"]),
        "queue": secs(t["created_at"], t["started_at"]),
        "queue.publish": secs(t["created_at"], t["enqueued_at"]),
        "queue.pickup": secs(t["enqueued_at"], t["started_at"]),
        "inference": secs(t["started_at"], t["inferred_at"]),
        "sr": secs(t["inferred_at"], t["sr_written_at"]),
        "dispatch": secs(t["sr_written_at"], t["acknowledged_at"]),
        "dispatch.publish": secs(t["sr_written_at"], t["dispatch_enqueued"]),
        "dispatch.pickup": secs(t["dispatch_enqueued"], t["dispatch_started"]),
        "dispatch.prepare": secs(t["dispatch_started"], t["attempt_started"]),
        "dispatch.send": secs(t["attempt_started"], t["attempt_finished"]),
        "dispatch.record": secs(t["attempt_finished"], t["acknowledged_at"]),
        "e2e": secs(stable, t["acknowledged_at"]),
        "receive": secs(t["first_received"], t["last_received"]),
    }


def summarise(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "mean": statistics.fmean(values),
        "p50": percentile(values, 0.5),
        "p95": percentile(values, 0.95),
        "min": min(values),
        "max": max(values),
    }


def phase_stats(studies: list[StudyInput], timeline: dict[str, dict[str, Any]], quiet: float) -> dict[str, dict[str, float]]:
    per = [stage_times(timeline[s.study_uid], quiet) for s in studies]
    keys = [k for k, _, _ in STAGES] + ["receive"]
    return {k: summarise([p[k] for p in per if p[k] is not None]) for k in keys if any(p[k] is not None for p in per)}


# -- main ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        help=f"captioner checkpoint (default: the demo model, built into {DEFAULT_MODEL.relative_to(REPO)} if missing)",
    )
    parser.add_argument(
        "--sources", default=DEFAULT_SOURCES, help=f"comma-separated series under {SHARED} to copy, cycled (default {DEFAULT_SOURCES})"
    )
    parser.add_argument(
        "--latency-studies",
        type=int,
        default=20,
        help="studies sent one at a time, each after the previous SR was acknowledged (default 20)",
    )
    parser.add_argument("--burst-studies", type=int, default=50, help="studies sent back to back (default 50; 0 skips the burst)")
    parser.add_argument(
        "--senders", type=int, default=4, help="storescu processes in parallel during the burst, one association per study (default 4)"
    )
    parser.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--broker", choices=["embedded", "redis"], default="embedded")
    parser.add_argument("--pacs", choices=["storescp", "orthanc"], default="storescp")
    parser.add_argument(
        "--pg-url",
        default=rb.DEFAULT_PG,
        help=f"PostgreSQL server without database (default {rb.DEFAULT_PG}); a fresh database is created and dropped",
    )
    parser.add_argument(
        "--redis-url", default=DEFAULT_REDIS, help=f"Redis database of this benchmark, flushed before and after (default {DEFAULT_REDIS})"
    )
    parser.add_argument("--quiet", type=float, default=1.0, help="MEDCAP_QUIET_SECONDS (default 1)")
    parser.add_argument("--assembly-interval", type=float, default=0.2, help="MEDCAP_ASSEMBLY_INTERVAL_SECONDS (default 0.2)")
    parser.add_argument("--key-slices", type=int, default=3, help="MEDCAP_KEY_SLICES (default 3, MedCap's default)")
    parser.add_argument("--key-slice-strategy", default="uniform", choices=["central", "uniform", "content"])
    parser.add_argument("--batch-size", type=int, default=8, help="MEDCAP_CAPTION_BATCH_SIZE (default 8)")
    parser.add_argument("--preset", default="fast", choices=["fast", "paper"], help="MEDCAP_GENERATION_PRESET (default fast)")
    parser.add_argument(
        "--inference-repeat",
        type=int,
        default=5,
        help="timed in-process inference runs per source before MedCap starts (default 5, after one untimed)",
    )
    parser.add_argument(
        "--paired-repeat", type=int, default=3, help="in-process inference runs after each one-at-a-time study, on its files (default 3)"
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch intra-op threads, in-process and in the caption worker (OMP_NUM_THREADS); default: torch's own (one per core)",
    )
    parser.add_argument("--idle-seconds", type=float, default=10, help="how long medcap serve's idle CPU use is measured (default 10)")
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="MedCap's log level (default INFO)"
    )
    parser.add_argument("--study-timeout", type=float, default=180, help="seconds to wait for one SR in the latency phase")
    parser.add_argument("--workdir", type=Path, default=None, help="where inputs, data and logs go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--fail-on-goals", action="store_true", help="exit with status 3 when the ratio goal is missed")
    args = parser.parse_args(argv)
    if args.latency_studies < 1 or args.burst_studies < 0 or args.senders < 1:
        parser.error("need --latency-studies >= 1, --burst-studies >= 0, --senders >= 1")
    for tool in (rb.STORESCU, rb.STORESCP, rb.ECHOSCU):
        if not Path(tool).is_file():
            parser.error(f"{tool} not found: install dcmtk")
    if not MEDCAP.is_file():
        parser.error(f"{MEDCAP} not found: run scripts/ensure-venv")
    from tqdm import tqdm

    model = ensure_model(args.model or DEFAULT_MODEL, default=args.model is None).resolve()
    sources = {}
    for name in (n.strip() for n in args.sources.split(",") if n.strip()):
        files = sorted(p for p in (SHARED / name).iterdir() if p.is_file()) if (SHARED / name).is_dir() else []
        if not files:
            parser.error(f"no DICOM files in {SHARED / name}")
        sources[name] = files

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the finally blocks run
    root = Path(tempfile.mkdtemp(prefix="medcap-pipeline-", dir=args.workdir))
    started = time.perf_counter()
    load_start = os.getloadavg()
    fingerprint = code_fingerprint()  # of the code medcap serve is about to import
    pacs = medcap = None
    try:
        # 1. inputs
        total = len(sources) + args.latency_studies + args.burst_studies
        with tqdm(total=total, desc="relabelling studies", unit="study", file=sys.stdout) as bar:
            warmup = make_studies(sources, root / "inputs", "warmup", len(sources), bar)
            latency = make_studies(sources, root / "inputs", "latency", args.latency_studies, bar)
            burst = make_studies(sources, root / "inputs", "burst", args.burst_studies, bar)

        # 2. inference alone, warm, in this process, before MedCap starts (a reference)
        bench = InferenceBench(model, args, root)
        model_info = bench.info
        print(f"inference alone before MedCap starts: warm, in-process, {args.inference_repeat} timed runs per source ...", flush=True)
        upfront = [bench.measure(s, args.inference_repeat, untimed_first=True) for s in warmup]
        for a in upfront:
            print(
                f"  {a.source}: {a.images} images, prepare_series {statistics.median(a.prepare):.3f} s, "
                f"caption {statistics.median(a.caption):.3f} s; SR without database: evidence headers "
                f"{statistics.median(a.sr_evidence):.3f} s, build {statistics.median(a.sr_build):.3f} s, "
                f"serialise + durable write {statistics.median(a.sr_store):.3f} s (medians)"
            )

        # 3. the PACS and MedCap
        logs = root / "logs"
        logs.mkdir()
        pacs = StoreSCP(root) if args.pacs == "storescp" else OrthancPACS(root)
        medcap = MedCapServe(root, model, pacs.destination, args)
        print(
            f"medcap serve on port {medcap.port} ({args.database}, {args.broker} broker), PACS {pacs.name} at {pacs.destination}",
            flush=True,
        )

        # 4. warm-up: one study per source, waits for the model to load in the worker
        for study in warmup:
            send_study(medcap.port, study, logs)
        wait_acknowledged(medcap, warmup, timeout=300)
        print("warm-up SRs acknowledged", flush=True)
        time.sleep(1)
        cpu0, t0 = process_group_cpu(medcap.proc.pid), time.monotonic()
        time.sleep(args.idle_seconds)
        idle_roles = {k: v / (time.monotonic() - t0) for k, v in cpu_by_role(cpu0, process_group_cpu(medcap.proc.pid)).items()}
        idle_cpu = sum(idle_roles.values())
        idle_text = ", ".join(f"{k} {v * 100:.1f} %" for k, v in idle_roles.items())
        print(f"medcap serve idle: {idle_cpu * 100:.1f} % of one core ({idle_text}; {args.idle_seconds:.0f} s)", flush=True)

        # 5. latency: one study at a time; after each SR, the same files through the model in
        #    this process while the pipeline is idle (paired, so both see the same background load)
        paired: dict[str, InferenceAlone] = {}
        with tqdm(total=len(latency), desc="latency (one at a time)", unit="study", file=sys.stdout) as bar:
            for study in latency:
                send_study(medcap.port, study, logs)
                wait_acknowledged(medcap, [study], timeout=args.study_timeout, interval=0.05)
                time.sleep(0.3)  # the dispatch worker finishes its task after the acknowledgement
                paired[study.study_uid] = bench.measure(study, args.paired_repeat, untimed_first=False)
                bar.update(1)
        bench.close()

        # 6. burst: all back to back, `senders` storescu at a time, one association per study
        burst_start = burst_sent = None
        if burst:
            time.sleep(args.quiet + 1)  # let the last latency study's dispatch settle
            acked = threading.Event()
            burst_start = utcnow()
            burst_cpu0 = process_group_cpu(medcap.proc.pid)
            with tqdm(total=len(burst), desc="burst (acknowledged)", unit="study", file=sys.stdout) as bar:
                with ThreadPoolExecutor(args.senders) as pool:
                    futures = [pool.submit(send_study, medcap.port, s, logs) for s in burst]
                    waiter = threading.Thread(
                        target=lambda: (wait_acknowledged(medcap, burst, timeout=540, progress=bar), acked.set()), daemon=True
                    )
                    waiter.start()
                    for f in futures:
                        f.result()
                burst_sent = utcnow()
                waiter.join()
            burst_roles = cpu_by_role(burst_cpu0, process_group_cpu(medcap.proc.pid))
            burst_cpu = sum(burst_roles.values())
            if not acked.is_set():
                raise RuntimeError("the burst did not complete; see the messages above")

        # 7. read everything back
        timeline = medcap.timeline()
        srs_in_pacs = pacs.count_srs()
    except BaseException:
        if medcap is not None and medcap.log.is_file():  # the work directory goes below: show why first
            tail = medcap.log.read_text(errors="replace").splitlines()[-40:]
            print("--- last lines of medcap.log ---", *tail, "---", sep="\n", file=sys.stderr)
        raise
    finally:
        if medcap is not None:
            medcap.stop()
        if pacs is not None:
            pacs.stop()
        rb.stop_all()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"work directory kept: {root}")

    studies = warmup + latency + burst
    problems = []
    if srs_in_pacs != len(studies):
        problems.append(f"the PACS holds {srs_in_pacs} SRs for {len(studies)} studies")
    for s in studies:
        t = timeline.get(s.study_uid)
        if t is None or t["instances"] != len(s.files) or t["attempts"] != 1 or t.get("extra_jobs") or t["dispatch_attempts"] != 1:
            problems.append(f"{s.study_uid}: {None if t is None else {k: t[k] for k in ('instances', 'attempts', 'dispatch_attempts')}}")
    if problems:
        print("WARNING: " + "; ".join(problems[:5]))

    quiet = args.quiet
    lat = phase_stats(latency, timeline, quiet)
    lat_by_source = {name: phase_stats([s for s in latency if s.source == name], timeline, quiet) for name in sources}
    bst = phase_stats(burst, timeline, quiet) if burst else {}
    med = statistics.median

    # The ratio, per study: (end-to-end − quiet) ÷ the median of its paired in-process runs.
    def alone_of(uid: str, kind: str) -> float:
        a = paired[uid]
        return med(a.total if kind == "total" else a.caption)

    def ratio_stats(subset: list[StudyInput], kind: str) -> dict[str, float]:
        return summarise([stage_times(timeline[s.study_uid], quiet)["e2e"] / alone_of(s.study_uid, kind) for s in subset])  # type: ignore[operator]

    ratio_total, ratio_caption = ratio_stats(latency, "total"), ratio_stats(latency, "caption")
    goal_met = ratio_total["p50"] <= GOAL_RATIO
    alone_source = {name: med([alone_of(s.study_uid, "total") for s in latency if s.source == name]) for name in sources}
    throughput = None
    if burst:
        last_ack = max(timeline[s.study_uid]["acknowledged_at"] for s in burst)
        wall = secs(burst_start, last_ack)
        busy = sum(stage_times(timeline[s.study_uid], quiet)["inference"] for s in burst)  # type: ignore[misc]
        mean_alone = statistics.fmean(alone_source[s.source] for s in burst)
        throughput = {
            "studies": len(burst),
            "senders": args.senders,
            "wall_s": wall,
            "send_s": secs(burst_start, burst_sent),
            "studies_per_min": len(burst) / wall * 60,
            "caption_busy_fraction": busy / wall,
            "ceiling_studies_per_min": 60 / mean_alone,
            "medcap_cpu_s": burst_cpu,
            "medcap_cpu_s_per_study": burst_cpu / len(burst),
            "medcap_cpu_s_per_study_by_role": {k: v / len(burst) for k, v in burst_roles.items()},
        }

    # -- report ------------------------------------------------------------------------------
    fmt = lambda v: f"{v:.3f}"  # noqa: E731
    print()
    print(f"### Pipeline, {args.database} + {args.broker} broker, PACS {pacs.name}")  # type: ignore[union-attr]
    print()
    print(
        f"Settings: quiet {quiet} s, assembly interval {args.assembly_interval} s, key slices {args.key_slices} "
        f"({args.key_slice_strategy}), caption batch {args.batch_size}, preset {args.preset}, worker concurrency 1, "
        f"device cpu ({model_info['torch_threads']} torch threads in-process and in the worker{' (--torch-threads)' if args.torch_threads else ', torch default'}), model {model_info['name']} "
        f"{model_info['version']} (weights {str(model_info['weights_sha256'])[:12]}, views {model_info['views']}), "
        f"{os.cpu_count()} CPUs, {len(latency)} studies one at a time, "
        f"{len(burst)} in the burst"
    )
    print()
    print(
        "| studies | n | end-to-end p50 s | p95 s | min–max s | inference alone p50 s: prepare + caption | caption only | "
        "ratio p50 (÷ prepare + caption) | p95 | ratio p50 (÷ caption only) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, subset in [(n, [s for s in latency if s.source == n]) for n in sources] + [("all, one at a time", latency)]:
        e = summarise([stage_times(timeline[s.study_uid], quiet)["e2e"] for s in subset])  # type: ignore[misc]
        tot = med([alone_of(s.study_uid, "total") for s in subset])
        cap = med([alone_of(s.study_uid, "caption") for s in subset])
        rt, rc = ratio_stats(subset, "total"), ratio_stats(subset, "caption")
        bold = (lambda x: f"**{x}**") if subset is latency else (lambda x: x)
        images = f" ({paired[subset[0].study_uid].images} images)" if subset is not latency else ""
        print(
            f"| {name}{images} | {e['n']} | {bold(fmt(e['p50']))} | {bold(fmt(e['p95']))} | {fmt(e['min'])}–{fmt(e['max'])} | "
            f"{fmt(tot)} | {fmt(cap)} | {bold(format(rt['p50'], '.2f'))} | {rt['p95']:.2f} | {rc['p50']:.2f} |"
        )
    print()
    print(
        f"Goal: (end-to-end − quiet) ÷ inference alone (prepare_series + caption, paired) ≤ {GOAL_RATIO}: "
        f"median over studies {ratio_total['p50']:.2f} -> {'MET' if goal_met else 'NOT MET'} "
        f"(÷ caption only: {ratio_caption['p50']:.2f})"
    )
    print()
    print(
        "Inference alone before MedCap started (idle machine but for other users), medians of "
        f"{args.inference_repeat}: "
        + "; ".join(
            f"{a.source} prepare {med(a.prepare):.3f} s (min {min(a.prepare):.3f}) + caption {med(a.caption):.3f} s "
            f"(min {min(a.caption):.3f})"
            for a in upfront
        )
    )
    print(f"medcap serve idle: {idle_cpu * 100:.1f} % of one core ({idle_text})")
    if throughput:
        print()
        print(
            f"Burst: {throughput['studies']} studies, {throughput['senders']} storescu in parallel (one association per study): "
            f"sent in {throughput['send_s']:.1f} s, last SR acknowledged after {throughput['wall_s']:.1f} s -> "
            f"**{throughput['studies_per_min']:.1f} studies/min**; caption worker busy {throughput['caption_busy_fraction'] * 100:.0f} % "
            f"of the wall time; MedCap CPU {throughput['medcap_cpu_s_per_study']:.2f} s per study ("
            + ", ".join(f"{k} {v:.2f}" for k, v in throughput["medcap_cpu_s_per_study_by_role"].items())
            + "); "
            f"ceiling if only the paired inference-alone time counted: {throughput['ceiling_studies_per_min']:.1f}/min"
        )
    print()
    print("Where the time goes, seconds per study:")
    print()
    print("| stage | definition | one at a time: mean | p50 | p95 |" + (" burst: mean | p50 | p95 |" if bst else ""))
    print("|---|---|---|---|---|" + ("---|---|---|" if bst else ""))
    for key, label, definition in STAGES:
        if key not in lat:
            continue
        row = f"| {label} | {definition} | {fmt(lat[key]['mean'])} | {fmt(lat[key]['p50'])} | {fmt(lat[key]['p95'])} |"
        if bst and key in bst:
            row += f" {fmt(bst[key]['mean'])} | {fmt(bst[key]['p50'])} | {fmt(bst[key]['p95'])} |"
        print(row)
    alone_lat = summarise([alone_of(s.study_uid, "total") for s in latency])
    print(
        f"| inference alone (paired) | prepare_series + caption, in-process | {fmt(alone_lat['mean'])} | {fmt(alone_lat['p50'])} | "
        f"{fmt(alone_lat['p95'])} |" + (" | | |" if bst else "")
    )
    sr_alone = {k: statistics.fmean(med(getattr(paired[s.study_uid], k)) for s in latency) for k in ("sr_evidence", "sr_build", "sr_store")}
    overhead = lat["e2e"]["mean"] - alone_lat["mean"]
    parts = {
        "worker inference − inference alone": lat["inference"]["mean"] - alone_lat["mean"],
        "assembly delay": lat["assembly"]["mean"],
        "queue wait": lat["queue"]["mean"],
        "SR write": lat["sr"]["mean"],
        "dispatch": lat["dispatch"]["mean"],
    }
    print()
    print(
        f"One at a time, means: end-to-end {lat['e2e']['mean']:.3f} s = inference alone {alone_lat['mean']:.3f} s + overhead "
        f"{overhead:.3f} s; the overhead: "
        + ", ".join(f"{k} {v:.3f} s ({v / overhead * 100:.0f} %)" for k, v in parts.items())
        + f". SR write without the database, in-process: evidence headers {sr_alone['sr_evidence']:.3f} s + build "
        f"{sr_alone['sr_build']:.3f} s + serialise and durable write {sr_alone['sr_store']:.3f} s."
    )
    print(f"(receive: first→last instance of a study {lat['receive']['p50']:.3f} s p50; not part of the latency)")
    load_end = os.getloadavg()
    print(
        f"total benchmark time {time.perf_counter() - started:.0f} s; load average (1, 5, 15 min) at start "
        f"{', '.join(f'{x:.1f}' for x in load_start)}, at end {', '.join(f'{x:.1f}' for x in load_end)}; "
        f"product code sha256 {fingerprint[:12]}"
    )

    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = RESULTS / f"pipeline-{stamp}.json"
    out.write_text(
        json.dumps(
            {
                "benchmark": "pipeline",
                "utc": stamp,
                "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                "model": model_info,
                "environment": {
                    "host": platform.node(),
                    "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                    "loadavg_start": load_start,
                    "loadavg_end": load_end,
                    "platform": platform.platform(),
                },
                "inference_alone_upfront": [asdict(a) for a in upfront],
                "inference_alone_paired": {u: asdict(a) for u, a in paired.items()},
                "code_sha256": fingerprint,
                "idle_cpu_fraction": idle_cpu,
                "idle_cpu_by_role": idle_roles,
                "overhead_parts_s": parts,
                "sr_without_database_s": sr_alone,
                "latency": lat,
                "latency_by_source": lat_by_source,
                "burst": bst,
                "throughput": throughput,
                "ratio_prepare_caption": ratio_total,
                "ratio_caption_only": ratio_caption,
                "goal": {"ratio_max": GOAL_RATIO, "value": ratio_total["p50"], "met": goal_met},
                "problems": problems,
                "studies": [
                    {
                        "phase": s.phase,
                        "source": s.source,
                        "study_uid": s.study_uid,
                        "send_start": s.send_start,
                        "send_end": s.send_end,
                        **{k: v for k, v in timeline.get(s.study_uid, {}).items() if k != "study_uid"},
                    }
                    for s in studies
                ],
            },
            indent=2,
            default=str,
        )
    )
    print(f"results: {out.relative_to(REPO)}")
    return 3 if args.fail_on_goals and not goal_met else 0


if __name__ == "__main__":
    sys.exit(main())
