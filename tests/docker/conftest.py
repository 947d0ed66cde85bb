"""The files under docker/, read as data: compose.yaml, the Dockerfiles and their helper scripts."""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

DOCKER = Path(__file__).resolve().parents[2] / "docker"
REPO = DOCKER.parent
DOCKERFILES = {"cpu": DOCKER / "Dockerfile", "worker": DOCKER / "Dockerfile.worker"}
_DEFAULT = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def interpolate(text: str) -> str:
    """Compose's ``${VAR:-default}`` with nothing set: every variable takes its default."""
    return _DEFAULT.sub(lambda m: m.group(2) or "", text)


def load_compose(text: str | None = None) -> dict[str, Any]:
    return yaml.safe_load(interpolate((DOCKER / "compose.yaml").read_text() if text is None else text))


def load_script(name: str) -> ModuleType:
    """A script of docker/ as a module (docker/ is no package: it would shadow the Docker SDK)."""
    spec = importlib.util.spec_from_file_location(f"medcap_docker_{name}", DOCKER / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str

    def exec_form(self) -> list[str]:
        value = json.loads(self.args)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), f"{self.keyword} is not in exec form: {self.args}"
        return value


def instructions(path: Path) -> list[Instruction]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    result: list[Instruction] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, args = (pending + stripped).partition(" ")
        result.append(Instruction(keyword.upper(), args.strip()))
        pending = ""
    return result


def last(path: Path, keyword: str) -> Instruction | None:
    found = [i for i in instructions(path) if i.keyword == keyword]
    return found[-1] if found else None


def image_env(path: Path) -> dict[str, str]:
    """ENV of the Dockerfile (KEY=VALUE form), later ones winning."""
    env: dict[str, str] = {}
    for instruction in instructions(path):
        if instruction.keyword == "ENV":
            for item in re.findall(r'(\w+)=("[^"]*"|\S+)', instruction.args):
                env[item[0]] = item[1].strip('"')
    return env


def dockerfile_of(service: dict[str, Any]) -> Path | None:
    build = service.get("build")
    if build is None:
        return None
    return (DOCKER / build["context"] / build.get("dockerfile", "Dockerfile")).resolve()


def argv(service: dict[str, Any]) -> list[str]:
    """The command a service's container runs: compose's entrypoint/command, else its image's."""
    dockerfile = dockerfile_of(service)
    entrypoint = service.get("entrypoint")
    command = service.get("command")
    if entrypoint is None and dockerfile is not None:
        found = last(dockerfile, "ENTRYPOINT")
        entrypoint = found.exec_form() if found else []
    if command is None and dockerfile is not None and "entrypoint" not in service:
        found = last(dockerfile, "CMD")
        command = found.exec_form() if found else []
    return list(entrypoint or []) + list(command or [])


@pytest.fixture
def compose() -> dict[str, Any]:
    return load_compose()


@pytest.fixture
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The containers tier runs only when asked for by name (``-m containers``): it needs root and
    podman, and takes minutes (tests/tiers.py)."""
    if "containers" in (config.option.markexpr or ""):
        return
    left_out = [item for item in items if item.get_closest_marker("containers") is not None]
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = [item for item in items if item.get_closest_marker("containers") is None]
