"""docker/compose.yaml and the Dockerfiles, checked without a Docker engine: what each container
runs, with which settings, volumes and health checks."""

from __future__ import annotations

import ipaddress
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from service.cli import build_parser
from service.settings import ENV_PREFIX, Settings, SettingsError, load_settings, unknown_setting_check
from tests.docker.conftest import (
    DOCKER,
    DOCKERFILES,
    REPO,
    argv,
    dockerfile_of,
    image_env,
    instructions,
    last,
)

KNOWN_SETTINGS = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}
MEDCAP_SERVICES = ("listener", "worker-caption", "worker-dispatch")  # long-running, our images


def medcap_args(service: dict[str, Any]) -> Any:
    """The service's command as `medcap` parses it."""
    command = argv(service)
    assert command[:1] == ["medcap"], f"not a medcap command: {command}"
    return build_parser().parse_args(command[1:])


def env_of(service: dict[str, Any]) -> dict[str, str]:
    """The MEDCAP_ environment of a service's container: its image's ENV, then compose's."""
    dockerfile = dockerfile_of(service)
    env = image_env(dockerfile) if dockerfile else {}
    env.update({k: str(v) for k, v in (service.get("environment") or {}).items()})
    return {k: v for k, v in env.items() if k.startswith(ENV_PREFIX)}


def one_shot(services: dict[str, dict[str, Any]]) -> set[str]:
    """Services others wait to *complete*."""
    return {
        target
        for s in services.values()
        for target, dep in (s.get("depends_on") or {}).items()
        if dep.get("condition") == "service_completed_successfully"
    }


def volume_targets(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Mount target -> {source, type, read_only}, from compose's short or long volume syntax."""
    mounts = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target, *mode = volume.split(":")
            kind = "bind" if source.startswith((".", "/", "~", "$")) else "volume"
            mounts[target] = {"source": source, "type": kind, "read_only": mode == ["ro"]}
        else:
            mounts[volume["target"]] = {"source": volume["source"], "type": volume["type"], "read_only": bool(volume.get("read_only"))}
    return mounts


# -- settings --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [DOCKER / "compose.yaml", *DOCKERFILES.values()], ids=lambda p: p.name)
def test_every_medcap_variable_named_is_a_setting(path):
    # medcap refuses to start on an unknown MEDCAP_ variable; comments must not name one either.
    named = set(re.findall(r"\bMEDCAP_[A-Z0-9_]*[A-Z0-9]", path.read_text()))
    assert named, f"{path.name} names no MEDCAP_ variable: is this the right file?"
    assert named - KNOWN_SETTINGS == set()


@pytest.mark.parametrize("name", [*MEDCAP_SERVICES, "migrate"])
def test_each_medcap_container_environment_is_a_valid_configuration(services, name, tmp_path, monkeypatch):
    env = env_of(services[name])
    unknown_setting_check(env)
    if "MEDCAP_MODEL" in env:  # the mounted checkpoint: a directory with a config.json
        (tmp_path / "config.json").write_text("{}")
        env["MEDCAP_MODEL"] = str(tmp_path)
    for key in [k for k in os.environ if k.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    try:
        settings = load_settings()
    except SettingsError as exc:
        pytest.fail(f"{name}: {exc}")
    if name != "migrate":
        assert settings.database_url.startswith("postgresql://"), "every container shares the PostgreSQL audit database"
        assert settings.broker_url.startswith("redis://"), "every container shares the Redis broker"


def test_all_medcap_containers_share_database_broker_and_destinations(services):
    envs = {name: env_of(services[name]) for name in MEDCAP_SERVICES}
    for key in ("MEDCAP_DATABASE_URL", "MEDCAP_BROKER_URL", "MEDCAP_DESTINATIONS", "MEDCAP_DATA_DIR"):
        values = {name: env.get(key) for name, env in envs.items()}
        assert len(set(values.values())) == 1 and None not in values.values(), f"{key} differs: {values}"
    assert env_of(services["migrate"])["MEDCAP_DATABASE_URL"] == envs["listener"]["MEDCAP_DATABASE_URL"]


def test_destination_is_the_demo_pacs(services):
    destination = env_of(services["worker-dispatch"])["MEDCAP_DESTINATIONS"]
    ae, host, port = re.fullmatch(r"(\w+)@([\w.-]+):(\d+)", destination).groups()
    orthanc = services[host]
    assert orthanc["environment"]["ORTHANC__DICOM_AET"] == ae
    assert port == str(orthanc["environment"].get("ORTHANC__DICOM_PORT", 4242))  # Orthanc's default DICOM port


def test_orthanc_sends_to_the_listener(services):
    modalities = json.loads(services["orthanc"]["environment"]["ORTHANC__DICOM_MODALITIES"])
    ae, host, port = modalities["medcap"]
    listener = env_of(services["listener"])
    assert host == "listener" and host in services
    assert ae == listener.get("MEDCAP_DICOM_AE_TITLE", Settings.model_fields["dicom_ae_title"].default)
    assert port == int(listener.get("MEDCAP_DICOM_PORT", Settings.model_fields["dicom_port"].default))
    assert f"{port}:{port}" in services["listener"]["ports"]


def test_listener_admits_the_compose_network_only(compose, services):
    subnet = ipaddress.ip_network(compose["networks"]["default"]["ipam"]["config"][0]["subnet"])
    peers = Settings(allowed_peers=env_of(services["listener"])["MEDCAP_ALLOWED_PEERS"]).allowed_peers
    assert peers, "an empty allow-list rejects everyone"
    assert all(peer.network.subnet_of(subnet) for peer in peers), f"{peers} reaches beyond the compose network {subnet}"
    orthanc_address = str(next(subnet.hosts()) + 5)  # any address Docker hands out on the network
    assert any(peer.admits("ORTHANC", orthanc_address) for peer in peers)
    assert not any(peer.admits("ORTHANC", "8.8.8.8") for peer in peers)


def test_metrics_ports_are_published(services):
    for name, key in (
        ("listener", "MEDCAP_METRICS_PORT"),
        ("worker-caption", "MEDCAP_WORKER_METRICS_PORT"),
        ("worker-dispatch", "MEDCAP_WORKER_METRICS_PORT"),
    ):
        port = env_of(services[name]).get(key)
        assert port and port != "0", f"{name}: {key} is off"
        assert any(str(p).endswith(f":{port}") for p in services[name].get("ports", [])), f"{name}: metrics port {port} not published"


# -- commands --------------------------------------------------------------------------------


def test_worker_image_entrypoint_is_the_caption_worker_on_the_gpu():
    entrypoint = last(DOCKERFILES["worker"], "ENTRYPOINT")
    assert entrypoint is not None
    command = entrypoint.exec_form()
    assert command[0] == "medcap"
    args = build_parser().parse_args(command[1:])
    assert (args.command, args.queues, args.device) == ("worker", "caption", "cuda:0")


def test_cpu_image_runs_the_listener_by_default():
    entrypoint, cmd = last(DOCKERFILES["cpu"], "ENTRYPOINT"), last(DOCKERFILES["cpu"], "CMD")
    assert entrypoint is not None and cmd is not None
    args = build_parser().parse_args(entrypoint.exec_form()[1:] + cmd.exec_form())
    assert args.command == "listen"


def test_each_service_runs_its_command(services):
    assert medcap_args(services["listener"]).command == "listen"
    assert medcap_args(services["migrate"]).func.__name__ == "cmd_db_upgrade"
    caption, dispatch = medcap_args(services["worker-caption"]), medcap_args(services["worker-dispatch"])
    assert (caption.command, caption.queues, caption.device) == ("worker", "caption", "cuda:0")
    assert (dispatch.command, dispatch.queues) == ("worker", "dispatch")


def test_caption_worker_reserves_one_gpu_and_runs_the_cuda_image(services):
    worker = services["worker-caption"]
    assert dockerfile_of(worker) == DOCKERFILES["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1
    assert devices[0]["driver"] == "nvidia" and devices[0]["count"] == 1 and "gpu" in devices[0]["capabilities"]


def test_cpu_services_use_the_cpu_image_and_no_gpu(services):
    for name in ("listener", "worker-dispatch", "migrate"):
        assert dockerfile_of(services[name]) == DOCKERFILES["cpu"], name
        assert "deploy" not in services[name], f"{name} needs no GPU"


# -- volumes ---------------------------------------------------------------------------------


def test_listener_and_workers_share_the_data_volume_at_their_data_dir(compose, services):
    mounts = {}
    for name in MEDCAP_SERVICES:
        data_dir = env_of(services[name])["MEDCAP_DATA_DIR"]
        mount = volume_targets(services[name]).get(data_dir)
        assert mount is not None, f"{name}: nothing mounted at MEDCAP_DATA_DIR={data_dir}"
        assert mount["type"] == "volume" and not mount["read_only"], f"{name}: {mount}"
        mounts[name] = (mount["source"], data_dir)
    assert len(set(mounts.values())) == 1, f"not one volume at one path: {mounts}"
    source = next(iter(mounts.values()))[0]
    assert source in compose["volumes"]


def test_images_declare_the_same_data_dir_as_compose(services):
    data_dir = env_of(services["listener"])["MEDCAP_DATA_DIR"]
    for kind, path in DOCKERFILES.items():
        assert image_env(path)["MEDCAP_DATA_DIR"] == data_dir, kind
        volume = last(path, "VOLUME")
        assert volume is not None and volume.args == data_dir, kind
        assert any(data_dir in i.args and "chown" in i.args for i in instructions(path) if i.keyword == "RUN"), (
            f"{kind}: {data_dir} is not made and given to the medcap user (a fresh volume copies its owner)"
        )


def test_images_share_one_uid_so_both_can_write_the_data_volume():
    uids = {
        kind: {i.args for i in instructions(path) if i.keyword == "ARG" and i.args.startswith(("APP_UID=", "APP_GID="))}
        for kind, path in DOCKERFILES.items()
    }
    assert uids["cpu"] == uids["worker"] and len(uids["cpu"]) == 2, uids
    for path in DOCKERFILES.values():
        assert last(path, "USER").args == "medcap"


def test_caption_worker_gets_the_model_read_only_at_medcap_model(services):
    worker = services["worker-caption"]
    model = env_of(worker)["MEDCAP_MODEL"]
    mount = volume_targets(worker).get(model)
    assert mount is not None, f"nothing mounted at MEDCAP_MODEL={model}"
    assert mount["read_only"]
    assert "MEDCAP_MODEL" not in env_of(services["worker-dispatch"]), "a dispatch worker needs no model"
    env = image_env(DOCKERFILES["worker"])
    assert env.get("HF_HUB_OFFLINE") == "1", "no model hub access at run time"


# -- health and start order ------------------------------------------------------------------


def test_every_long_running_service_has_a_healthcheck(services):
    for name, service in services.items():
        if name in one_shot(services):
            assert service.get("restart") == "no", f"{name} is one-shot and must not be restarted"
            continue
        check = service.get("healthcheck") or {}
        assert check.get("test") and not check.get("disable"), f"{name} has no health check"


def test_medcap_health_checks_fit_the_command(services):
    expected = {"listen": "listen", "worker": "worker"}
    for name in MEDCAP_SERVICES:
        test = services[name]["healthcheck"]["test"]
        assert test[:2] == ["CMD", "medcap-healthcheck"], f"{name}: {test}"
        assert test[2] == expected[medcap_args(services[name]).command], f"{name}: {test}"


def test_images_have_health_checks():
    cpu = last(DOCKERFILES["cpu"], "HEALTHCHECK")
    worker = last(DOCKERFILES["worker"], "HEALTHCHECK")
    assert cpu is not None and worker is not None
    assert cpu.args.split(" CMD ")[1] == '["medcap-healthcheck"]'  # auto: listen/serve -> the DICOM port
    assert worker.args.split(" CMD ")[1] == '["medcap-healthcheck", "worker"]'


def test_depends_on_targets_exist_and_conditions_can_be_met(services):
    one = one_shot(services)
    for name, service in services.items():
        for target, dep in (service.get("depends_on") or {}).items():
            assert target in services, f"{name} depends on unknown service {target}"
            condition = dep.get("condition")
            assert condition in ("service_healthy", "service_completed_successfully"), f"{name} -> {target}: {condition}"
            if condition == "service_healthy":
                assert target not in one and services[target].get("healthcheck", {}).get("test"), (
                    f"{target} has no health check to wait for"
                )


def test_medcap_services_wait_for_database_broker_and_migration(services):
    for name in MEDCAP_SERVICES:
        deps = {t: d["condition"] for t, d in services[name]["depends_on"].items()}
        assert deps.get("postgres") == "service_healthy" and deps.get("redis") == "service_healthy", name
        assert deps.get("migrate") == "service_completed_successfully", name
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"


# -- builds ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_every_copied_path_exists_and_is_in_the_build_context(kind):
    path = DOCKERFILES[kind]
    allowed = {line[1:] for line in Path(f"{path}.dockerignore").read_text().splitlines() if line.startswith("!")}
    for instruction in instructions(path):
        if instruction.keyword != "COPY":
            continue
        *sources, _ = [a for a in instruction.args.split() if not a.startswith("--")]
        for source in sources:
            assert (REPO / source).exists(), f"{kind}: COPY {source}: no such file"
            assert source in allowed, f"{kind}: COPY {source}, but {path.name}.dockerignore leaves it out of the context"


def test_package_directories_copied_are_those_setuptools_packages():
    import tomllib

    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {p.rstrip("*") for p in include}
    for kind, path in DOCKERFILES.items():
        copied = {i.args.split()[0] for i in instructions(path) if i.keyword == "COPY"}
        assert packages <= copied, f"{kind} does not copy {packages - copied}"


def test_worker_image_installs_cuda_torch_at_the_projects_pin():
    text = DOCKERFILES["worker"].read_text()
    runs = " ".join(i.args for i in instructions(DOCKERFILES["worker"]) if i.keyword == "RUN")
    assert "requirements.py --no-base --extra model=torch" in runs
    assert re.search(r"--index-url \"?\$\{TORCH_INDEX_URL\}", runs)
    index = re.search(r"ARG TORCH_INDEX_URL=(\S+)", text).group(1)
    cuda = re.search(r"ARG CUDA_IMAGE=nvidia/cuda:(\d+)\.\d+\.\d+-\S*runtime-ubuntu22\.04", text)
    assert cuda is not None, "base image is not a CUDA runtime image"
    assert re.fullmatch(rf"https://download\.pytorch\.org/whl/cu{cuda.group(1)}\d+", index), f"{index} is not a CUDA {cuda.group(1)} build"
    # torch first, from that index; the model extra afterwards (it must not replace torch from PyPI).
    assert runs.index("--extra model=torch") < runs.index("--extra model >")
