"""The compose stack, built and run with podman, end to end (the ``containers`` tier, tests/tiers.py):

    pytest -m containers -s tests/docker/test_stack.py

docker/local-images.sh builds the images (Debian base, PostgreSQL, Redis and Orthanc from Debian
packages, the CPU image, the CPU caption worker; cached layers make a rebuild seconds), then
docker/compose.yaml + docker/compose.local.yaml run: Orthanc pushes the shared CT study to the
listener container, the caption worker drafts, the dispatch worker sends the SR back and Orthanc
holds it; the caption worker's container is killed mid-job and the MR study still gets exactly one
SR; the volumes survive ``down``/``up``. Needs root, podman, runc, mmdebstrap and podman-compose
(the ``containers`` extra); host ports are free ones on 127.0.0.1 (the host's own PostgreSQL and
Redis keep 5432 and 6379: the stack publishes neither).
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from tests.conftest import free_port, series_files
from tests.docker.stack import DOCKER, MEDCAP, PORT_VARIABLES, OrthancREST, Stack, StackError, wait_for

pytestmark = [pytest.mark.containers, pytest.mark.timeout(1800)]

PROJECT = "medcap-e2e"
IMAGES = (
    "localhost/medcap-postgres:15",
    "localhost/medcap-redis:7",
    "localhost/medcap-orthanc:latest",
    "localhost/medcap:latest",
    "localhost/medcap-worker-cpu:latest",
)
# Settings of this run only, on top of compose.yaml and compose.local.yaml: a short quiet period, and
# a caption job slowed down (16 key slices, beam search, one image per pass) so that the worker is
# surely mid-job when it is killed.
OVERRIDE = """
services:
  listener:
    environment: { MEDCAP_QUIET_SECONDS: "5" }
  worker-caption:
    environment:
      MEDCAP_KEY_SLICES: "16"
      MEDCAP_GENERATION_PRESET: paper
      MEDCAP_CAPTION_BATCH_SIZE: "1"
      MEDCAP_JOB_TIME_LIMIT_SECONDS: "300"
"""
TIMINGS: dict[str, float] = {}


def study_uid(name: str) -> str:
    (uid,) = {str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in series_files(name)}
    return uid


def job_of(stack: Stack, uid: str) -> list[list[str]]:
    """[status, attempts] of the study's jobs, oldest first."""
    return stack.sql(
        "select j.status, j.attempts from jobs j join study_versions v on v.id = j.study_version_id "
        f"join studies s on s.id = v.study_id where s.study_uid = '{uid}' order by j.id"
    )


def sr_documents(stack: Stack, uid: str) -> list[str]:
    rows = stack.sql(f"select d.sop_instance_uid from sr_documents d join studies s on s.id = d.study_id where s.study_uid = '{uid}'")
    return [r[0] for r in rows]


def check_draft_sr(orthanc: OrthancREST, uid: str) -> str:
    """Exactly one SR in Orthanc's copy of the study, a preliminary draft; its SOP Instance UID."""
    (instance,) = orthanc.sr_instances(uid)
    sr = pydicom.dcmread(io.BytesIO(orthanc.file(instance)))
    assert (sr.CompletionFlag, sr.VerificationFlag, sr.PreliminaryFlag) == ("PARTIAL", "UNVERIFIED", "PRELIMINARY")
    assert sr.StudyInstanceUID == uid
    return str(sr.SOPInstanceUID)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Stack]:
    if os.geteuid() != 0 or shutil.which("podman") is None:
        pytest.fail("the containers tier needs root and podman (apt-get install podman buildah runc mmdebstrap uidmap)")
    home = tmp_path_factory.mktemp("stack")
    env = {**os.environ, "CONTAINERS_CONF": str(DOCKER / "podman" / "containers.conf")}
    started = time.monotonic()
    build = subprocess.run([str(DOCKER / "local-images.sh")], env=env, capture_output=True, text=True, timeout=3600)
    (home / "local-images.log").write_text(build.stdout + build.stderr)
    assert build.returncode == 0, f"docker/local-images.sh failed:\n{(build.stdout + build.stderr)[-4000:]}"
    TIMINGS["images built (cached layers)"] = round(time.monotonic() - started, 1)

    # The checkpoint, readable by the images' medcap user (UID 10001).
    model = home / "model"
    shutil.copytree(tiny_model, model)
    for path in [model, *model.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    (home / "override.yaml").write_text(OVERRIDE)
    env["MODEL_DIR"] = str(model)
    for variable in PORT_VARIABLES:
        env[variable] = str(free_port())
    env["LISTENER_HOST_PORT"] = f"127.0.0.1:{env['LISTENER_HOST_PORT']}"
    stack = Stack(PROJECT, [DOCKER / "compose.yaml", DOCKER / "compose.local.yaml", home / "override.yaml"], env, home / "stack.log")
    stack.down(volumes=True)  # what an interrupted earlier run left
    try:
        yield stack
    finally:
        print(f"\ncontainers tier: {TIMINGS}; podman-compose log: {stack.log}")
        for service in MEDCAP:
            try:
                (home / f"{service}.log").write_text(stack.logs(service, tail=400))
            except StackError:
                pass
        stack.down(volumes=True)


def test_the_stack_comes_up_healthy_and_a_ct_study_comes_back_as_a_draft_sr(stack: Stack) -> None:
    started = time.monotonic()
    took = stack.up()
    TIMINGS["up until every health check passed"] = round(time.monotonic() - started, 1)
    assert set(took) == {"postgres", "redis", "orthanc", "migrate", *MEDCAP}
    print(f"\nseconds from up until each service was healthy (migrate: exited 0): {took}")
    assert stack.state("migrate")["ExitCode"] == 0
    # PostgreSQL and Redis are reachable from the containers only.
    for service in ("postgres", "redis"):
        assert stack.podman("port", stack.container(service)).stdout.strip() == ""

    orthanc = stack.orthanc
    uid = study_uid("ct-head-ge")
    study = orthanc.upload(series_files("ct-head-ge"))
    started = time.monotonic()
    orthanc.request("POST", "/modalities/medcap/store", {"Resources": [study], "Synchronous": True})
    wait_for(lambda: orthanc.sr_instances(uid), "the draft SR of the CT study in Orthanc", timeout=300, interval=2)
    TIMINGS["CT: push to SR in Orthanc"] = round(time.monotonic() - started, 1)
    sop = check_draft_sr(orthanc, uid)
    assert sr_documents(stack, uid) == [sop]
    assert job_of(stack, uid) == [["succeeded", "1"]]
    files = stack.exec("listener", "find", "/var/lib/medcap/data/instances", "-name", "*.dcm").split()
    assert len(files) == len(series_files("ct-head-ge"))


def test_a_caption_worker_killed_mid_job_still_gives_exactly_one_sr(stack: Stack) -> None:
    orthanc = stack.orthanc
    uid = study_uid("mr-t1-brain-uih")
    study = orthanc.upload(series_files("mr-t1-brain-uih"))
    orthanc.request("POST", "/modalities/medcap/store", {"Resources": [study], "Synchronous": True})
    wait_for(lambda: job_of(stack, uid) == [["running", "1"]], "the caption worker to start the MR job", timeout=120, interval=0.2)
    # SIGKILL to the container's main process (`medcap worker`, PID 1 inside): the container dies with
    # its pool, as on a crash or an OOM kill. (`podman kill` would count as stopped by the user, and
    # podman, unlike Docker, would then not restart it.)
    first_pid = stack.state("worker-caption")["Pid"]
    os.kill(first_pid, signal.SIGKILL)
    killed = time.monotonic()
    assert job_of(stack, uid) == [["running", "1"]], "the job must have been cut off mid-way"
    assert sr_documents(stack, uid) == [] and orthanc.sr_instances(uid) == []

    # restart: unless-stopped brings the container back (podman's own restart policy, no compose).
    wait_for(
        lambda: stack.state("worker-caption")["Status"] == "running" and stack.state("worker-caption")["Pid"] != first_pid,
        "the caption worker's container to restart",
        timeout=60,
    )
    TIMINGS["caption worker restarted after the kill"] = round(time.monotonic() - killed, 1)
    wait_for(lambda: orthanc.sr_instances(uid), "the MR study's draft SR in Orthanc", timeout=300, interval=2)
    TIMINGS["MR: kill to SR in Orthanc"] = round(time.monotonic() - killed, 1)
    time.sleep(5)  # a second SR, if one were coming, would follow the first within the dispatch round-trip
    sop = check_draft_sr(orthanc, uid)
    assert sr_documents(stack, uid) == [sop]
    assert job_of(stack, uid) == [["succeeded", "2"]]
    reports = stack.exec("listener", "find", "/var/lib/medcap/data/reports", "-name", "*.dcm").split()
    assert len(reports) == 2, reports  # one per study: the killed attempt's file, if any, was removed
    assert stack.healthy("worker-caption")


def test_the_data_survives_down_and_up(stack: Stack) -> None:
    def snapshot() -> tuple[list[str], list[list[str]]]:
        files = sorted(stack.exec("listener", "find", "/var/lib/medcap/data", "-type", "f", "-name", "*.dcm").split())
        return files, stack.sql("select kind, sop_instance_uid from sr_documents order by id")

    before = snapshot()
    assert len(before[1]) == 2
    started = time.monotonic()
    stack.down()
    for volume in ("medcap-data", "postgres-data", "redis-data", "orthanc-data"):
        assert stack.volume_exists(volume), volume
    stack.up()
    TIMINGS["down, then up until healthy"] = round(time.monotonic() - started, 1)
    assert snapshot() == before
    orthanc = stack.orthanc
    for name in ("ct-head-ge", "mr-t1-brain-uih"):
        assert len(orthanc.sr_instances(study_uid(name))) == 1
    # The restarted listener still takes studies: the CT series again is the same instances, so no new
    # version and no new job once the quiet period (5 s) is over. (The series, not Orthanc's whole
    # study: that now holds our draft SR too, which would be a new instance and make a new version.)
    (series,) = {orthanc.request("POST", "/instances", path.read_bytes())["ParentSeries"] for path in series_files("ct-head-ge")}
    reply = orthanc.request("POST", "/modalities/medcap/store", {"Resources": [series], "Synchronous": True})
    assert reply["InstancesCount"] == len(series_files("ct-head-ge")), reply
    time.sleep(10)
    assert job_of(stack, study_uid("ct-head-ge")) == [["succeeded", "1"]]
