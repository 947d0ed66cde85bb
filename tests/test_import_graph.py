"""The import graph, read from the source with ``ast`` (nothing is imported): no import loop among the
modules of dicom_io/, models/, service/ and workers/; dicom_io/ and models/ free of the queue, database
and web layers; no module reaching for another module's private (leading-underscore) names.

Imports inside functions count as much as those at the top: a loop hidden in a function is still a
loop, and a lazily imported database is still a database.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dicom_io", "models", "service", "workers")
# dicom_io/ and models/ must stay usable without Celery, a database or the web app (README "Where things are").
LAYER_FREE = ("dicom_io", "models")
FORBIDDEN = (
    "celery",
    "kombu",
    "sqlalchemy",
    "alembic",
    "fastapi",
    "starlette",
    "uvicorn",
    "redis",
    "psycopg",
    "psycopg2",
    "service",
    "workers",
)
# Every Python file of ours, scripts included, for the private-name rule.
SCANNED = (*PACKAGES, "migrations", "tests", "benchmarks", "experiments", "docker")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    return {module_name(path, root): path for package in packages for path in sorted((root / package).rglob("*.py"))}


def import_source(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    """The absolute module a ``from ... import`` reads from (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join([*base, *([node.module] if node.module else [])])


def imported_modules(path: Path, name: str, known: dict[str, Path]) -> Iterator[str]:
    """Every module ``path`` imports, anywhere in it: ``from pkg import mod`` is pkg.mod when that is a module."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            source = import_source(node, name, path.name == "__init__.py")
            for alias in node.names:
                yield f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source


def import_graph(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """Module -> the modules of ``packages`` it imports."""
    known = modules(root, packages)
    return {name: {m for m in imported_modules(path, name, known) if m in known and m != name} for name, path in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import loops: strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def forbidden_imports(root: Path, packages: tuple[str, ...] = LAYER_FREE) -> list[str]:
    found = []
    for name, path in modules(root, packages).items():
        for imported in imported_modules(path, name, {}):
            if imported.split(".")[0] in FORBIDDEN:
                found.append(f"{name} imports {imported}")
    return sorted(set(found))


def _is_private(name: str) -> bool:
    # _name, not __dunder__ nor _sunder_ (enum's _missing_ and the like are protocol, not private).
    return name.startswith("_") and not name.endswith("_")


def private_uses(root: Path, folders: tuple[str, ...] = SCANNED) -> list[str]:
    """``from ours import _name``, and ``ours._name`` on a name bound by an import of our own code."""
    found = []
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            name = module_name(path, root)

            def ours(module: str, here: Path = path) -> bool:
                top = module.split(".")[0]  # a package of ours, or a sibling script (benchmarks' `import receive`)
                return top in SCANNED or (here.parent / f"{top}.py").is_file() or (here.parent / top / "__init__.py").is_file()

            tree = ast.parse(path.read_text(), str(path))
            bound: set[str] = set()
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    bound.update((alias.asname or alias.name.split(".")[0]) for alias in node.names if ours(alias.name))
                elif isinstance(node, ast.ImportFrom):
                    source = import_source(node, name, path.name == "__init__.py")
                    if node.level or ours(source):
                        for alias in node.names:
                            if _is_private(alias.name):
                                found.append(f"{path.relative_to(root)}:{node.lineno} imports {alias.name} from {source}")
                            bound.add(alias.asname or alias.name)
            for node in ast.walk(tree):
                if isinstance(node, ast.Attribute) and _is_private(node.attr):
                    base = node.value
                    while isinstance(base, ast.Attribute) and not _is_private(base.attr):
                        base = base.value
                    if isinstance(base, ast.Name) and base.id in bound:
                        found.append(f"{path.relative_to(root)}:{node.lineno} uses {ast.unparse(node)}")
    return found


# -- the rules, on this tree ------------------------------------------------------------------


def test_the_graph_sees_the_packages_and_their_imports() -> None:
    graph = import_graph(ROOT)
    assert len(graph) > 80 and {name.split(".")[0] for name in graph} == set(PACKAGES)
    assert {"service.web.context", "service.web.pages", "service.web.admin"} <= graph["service.web.app"]
    assert "service.web.admin_actions" in graph["service.web.admin_api"]
    assert "dicom_io.store_scu" in graph["service.outputs.dicom_sr"]  # `from dicom_io.store_scu import Destination, ...`
    assert "service.prometheus" in graph["workers.tasks"]  # `from service import audit, outputs, prometheus`
    assert "models.caption_metrics" in graph["models.evaluation"]  # also imported inside a function there


def test_no_import_loop() -> None:
    # The web routers used to import their dependencies back from app.py, which imports them.
    assert cycles(import_graph(ROOT)) == []


def test_the_web_routers_do_not_import_the_app() -> None:
    graph = import_graph(ROOT)
    routers = [name for name in graph if name.startswith("service.web.") and name != "service.web.app"]
    assert len(routers) >= 5
    assert [name for name in routers if "service.web.app" in graph[name]] == []


def test_dicom_io_and_models_import_no_queue_database_or_web_code() -> None:
    assert forbidden_imports(ROOT) == []


def test_no_module_uses_another_modules_private_names() -> None:
    assert private_uses(ROOT) == []


# -- the checks themselves catch what they look for -------------------------------------------


def write(root: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text)
    return root


def test_a_loop_through_a_lazy_and_a_relative_import_is_found(tmp_path: Path) -> None:
    root = write(
        tmp_path,
        {
            "service/__init__.py": "",
            "service/web/__init__.py": "",
            "service/web/app.py": "def create_app():\n    from service.web import pages\n",
            "service/web/pages.py": "from .app import Context\n",
            "service/web/auth.py": "import service.web.pages\n",
            "workers/__init__.py": "from service.web import auth\n",
        },
    )
    graph = import_graph(root, ("service", "workers"))
    assert graph["service.web.auth"] == {"service.web.pages"} and graph["workers"] == {"service.web.auth"}
    assert cycles(graph) == [["service.web.app", "service.web.pages"]]


def test_a_layer_import_in_models_is_found(tmp_path: Path) -> None:
    root = write(
        tmp_path,
        {
            "dicom_io/__init__.py": "",
            "dicom_io/sr.py": "import numpy\nfrom pydicom import Dataset\n",
            "models/__init__.py": "",
            "models/demo.py": "def f():\n    import sqlalchemy.orm\n    from service.web.app import create_app\n",
        },
    )
    assert forbidden_imports(root) == ["models.demo imports service.web.app", "models.demo imports sqlalchemy.orm"]


def test_private_names_of_our_modules_are_found(tmp_path: Path) -> None:
    root = write(
        tmp_path,
        {
            "models/__init__.py": "",
            "models/compose.py": "_RENAMES = []\nRENAMES = _RENAMES\n",
            "models/lavis.py": "from models.compose import _RENAMES\nfrom pynetdicom import _config\n",
            "tests/test_x.py": "from models import compose\nfrom models.compose import RENAMES\ncompose._RENAMES\nRENAMES.__len__\n",
            "benchmarks/receive.py": "def _env(): ...\n",
            "benchmarks/pipeline.py": "import receive as rb\nimport ssl\nrb._env()\nssl._create_unverified_context()\n",
        },
    )
    assert private_uses(root, ("models", "tests", "benchmarks")) == [
        "models/lavis.py:1 imports _RENAMES from models.compose",
        "tests/test_x.py:3 uses compose._RENAMES",
        "benchmarks/pipeline.py:3 uses rb._env",
    ]
