"""docker/compose.local.yaml, docker/local-images.sh and the stand-in images of docker/local/, read
as data (tests/docker/test_stack.py runs them)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml  # type: ignore[import-untyped]  # (no stubs in the venv)

from service.cli import build_parser
from tests.docker.conftest import DOCKER, interpolate, load_compose


def local_compose() -> dict[str, Any]:
    class Loader(yaml.SafeLoader):
        pass

    # compose's !reset: the key is dropped from what the base file says.
    Loader.add_constructor("!reset", lambda loader, node: {"!reset": True})
    loaded: dict[str, Any] = yaml.load(interpolate((DOCKER / "compose.local.yaml").read_text()), Loader=Loader)
    return loaded


def orthanc_entrypoint() -> ModuleType:
    spec = importlib.util.spec_from_file_location("medcap_orthanc_entrypoint", DOCKER / "local" / "orthanc-entrypoint.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def built_by_script() -> set[str]:
    return set(re.findall(r"localhost/medcap[\w-]*:[\w.]+", (DOCKER / "local-images.sh").read_text()))


def test_compose_defaults_to_the_official_images():
    services = load_compose()["services"]
    assert services["postgres"]["image"] == "postgres:15"
    assert services["redis"]["image"] == "redis:7"
    assert services["orthanc"]["image"].startswith("orthancteam/orthanc:")
    text = (DOCKER / "compose.yaml").read_text()
    for variable in ("POSTGRES_IMAGE", "REDIS_IMAGE", "ORTHANC_IMAGE", "APP_IMAGE", "WORKER_IMAGE"):
        assert f"${{{variable}:-" in text, f"{variable} does not override an image"


def test_local_compose_runs_every_service_on_an_image_the_script_builds():
    base, local = load_compose()["services"], local_compose()["services"]
    assert set(local) == set(base)
    images = {name: service["image"] for name, service in local.items()}
    assert set(images.values()) <= built_by_script()
    assert "localhost/medcap-base:bookworm" in built_by_script()


def test_local_caption_worker_runs_on_the_cpu_without_a_gpu_reservation():
    worker = local_compose()["services"]["worker-caption"]
    assert worker["deploy"] == {"!reset": True}
    command = worker["entrypoint"]
    args = build_parser().parse_args(command[1:])
    assert command[0] == "medcap" and (args.command, args.queues, args.device) == ("worker", "caption", "cpu")
    script = (DOCKER / "local-images.sh").read_text()
    assert "--build-arg TORCH_BUILD=cpu" in script and "Dockerfile.worker" in script


def test_orthanc_stand_in_reads_compose_environment_as_the_official_image_does():
    env = {k: str(v) for k, v in load_compose()["services"]["orthanc"]["environment"].items()}
    config = orthanc_entrypoint().configuration({**env, "PATH": "/usr/bin", "ORTHANC__DICOM_WEB__ENABLE": "true"})
    assert config["Name"] == "DEMO-PACS" and config["DicomAet"] == "ORTHANC"
    assert config["AuthenticationEnabled"] is False
    assert config["DicomModalities"] == {"medcap": ["MEDCAP", "listener", 11112]}
    assert config["DicomWeb"] == {"Enable": True}  # a double underscore nests
    assert config["StorageDirectory"] == "/var/lib/orthanc/db" and "Path" not in config


def test_stand_ins_keep_the_official_images_volumes_and_probes():
    compose = load_compose()["services"]
    for name, containerfile in (("postgres", "postgres"), ("redis", "redis"), ("orthanc", "orthanc")):
        text = Path(DOCKER / "local" / f"{containerfile}.Containerfile").read_text()
        for volume in compose[name]["volumes"]:
            target = volume.split(":")[1]
            assert f"VOLUME {target}" in text, f"{name}: no VOLUME {target}"
    assert "/probes/test-aliveness.py" in (DOCKER / "local" / "orthanc.Containerfile").read_text()
    assert compose["orthanc"]["healthcheck"]["test"][1] == "/probes/test-aliveness.py"
