"""What the images install (docker/requirements.py reads pyproject.toml) and whether the CPU
image's selection is enough for the commands it runs."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import tomllib
from importlib import metadata

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement

from tests.docker.conftest import DOCKERFILES, REPO, instructions, load_script

req = load_script("requirements")
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PROJECT_PACKAGES = {"service", "dicom_io", "models", "workers", "migrations", "tests"}


def cpu_image_requirements() -> list[str]:
    """The requirement lines docker/Dockerfile installs, by running its requirements.py call."""
    runs = " ".join(i.args for i in instructions(DOCKERFILES["cpu"]) if i.keyword == "RUN")
    call = re.search(r"python requirements\.py ([^>]*)>", runs)
    assert call is not None, "docker/Dockerfile no longer installs from requirements.py"
    args = call.group(1).split()
    return req.requirements(PYPROJECT, base="--no-base" not in args, extras=[args[i + 1] for i, a in enumerate(args) if a == "--extra"])


def test_base_requirements_are_the_projects():
    assert req.requirements(PYPROJECT) == PYPROJECT["project"]["dependencies"]


def test_selected_packages_keep_pyprojects_pins():
    model = PYPROJECT["project"]["optional-dependencies"]["model"]
    assert req.requirements(PYPROJECT, base=False, extras=["model=torch"]) == [r for r in model if r.startswith("torch")]
    assert req.requirements(PYPROJECT, base=False, extras=["model=TQDM,Transformers"]) == [
        next(r for r in model if r.startswith("tqdm")),
        next(r for r in model if r.startswith("transformers")),
    ]
    assert req.requirements(PYPROJECT, base=False, extras=["model"]) == model


def test_torch_is_pinned_exactly():
    # The worker image installs this version from PyTorch's CUDA index: a range could resolve to a
    # release the index lacks, or differ from what the tests ran with.
    (torch,) = req.requirements(PYPROJECT, base=False, extras=["model=torch"])
    assert re.fullmatch(r"torch==\d+\.\d+\.\d+", torch), torch


@pytest.mark.parametrize("extra", ["nope", "model=torchvision", "model=torch,nope"])
def test_unknown_group_or_package_stops_the_build(extra, capsys, tmp_path):
    (tmp_path / "pyproject.toml").write_text((REPO / "pyproject.toml").read_text())
    assert req.main(["--pyproject", str(tmp_path / "pyproject.toml"), "--extra", extra]) == 1
    assert "requirements.py:" in capsys.readouterr().err


def test_cli_prints_one_requirement_per_line(capsys):
    assert req.main(["--pyproject", str(REPO / "pyproject.toml"), "--no-base", "--extra", "model=torch,tqdm"]) == 0
    assert capsys.readouterr().out.splitlines() == req.requirements(PYPROJECT, base=False, extras=["model=torch,tqdm"])


def _closure(requirements: list[str]) -> set[str]:
    """Distributions the requirements install, as installed here (extras and markers followed)."""
    env = default_environment()
    seen: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        r = todo.pop()
        name = req.canonical(r.name)
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(r.name) or []
        except metadata.PackageNotFoundError:
            continue
        for line in requires:
            dep = Requirement(line)
            if dep.marker is None or any(dep.marker.evaluate({**env, "extra": e}) for e in (r.extras or {""})):
                todo.append(dep)
    return seen


def test_cpu_image_has_what_the_listener_and_the_dispatch_worker_import():
    # Block every installed module whose distribution the CPU image does not install (torch,
    # transformers, ...), then import what `medcap listen`, `db upgrade` and a dispatch worker
    # (Celery loads workers.tasks) import. A new top-level `import torch` on that path fails here.
    allowed = _closure(cpu_image_requirements())
    blocked = sorted(
        {
            module
            for module, dists in metadata.packages_distributions().items()
            if module not in PROJECT_PACKAGES and not any(req.canonical(d) in allowed for d in dists)
        }
    )
    assert "torch" in blocked and "transformers" in blocked, "the test no longer blocks the model stack"
    code = textwrap.dedent(f"""
        import importlib.abc, sys
        BLOCKED = set({blocked!r})
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.partition(".")[0] in BLOCKED:
                    raise ModuleNotFoundError(f"{{name}} is not in the CPU image", name=name)
        sys.meta_path.insert(0, Block())
        import service.cli, service.listener, service.assembly, service.prometheus, migrations
        import workers.celery_app, workers.tasks
        from service.cli import build_parser
        build_parser().parse_args(["worker", "--queues", "dispatch"])
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_every_data_file_of_the_packages_is_installed():
    # The images install the project non-editable (`pip install .`): a file that is not package data
    # is missing there (the web app's templates and stylesheet were, until the stack first ran).
    from fnmatch import fnmatch

    package_data = PYPROJECT["tool"]["setuptools"]["package-data"]
    for package in ("service", "dicom_io", "models", "workers", "migrations"):
        for path in (REPO / package).rglob("*"):
            if not path.is_file() or path.suffix in (".py", ".pyc") or "__pycache__" in path.parts:
                continue
            relative = path.relative_to(REPO / package).as_posix()
            assert any(fnmatch(relative, pattern) for pattern in package_data.get(package, [])), f"{package}/{relative} is not package data"
