#!/usr/bin/env python3
"""Print requirement lines from pyproject.toml, so that the images install pyproject's own pins.

    python requirements.py [--pyproject FILE] [--no-base] [--extra NAME[=PKG,PKG...]]...

Prints the project's dependencies (unless --no-base), then for each --extra the whole optional
dependency group NAME, or only the named packages of it. A group or package that pyproject.toml
does not have is an error, so an image build stops instead of installing something else.

The images install their dependencies from this list before copying the source (a layer that is
rebuilt only when pyproject.toml changes), then the project itself with --no-deps.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    match = _NAME.match(requirement)
    if match is None:
        raise ValueError(f"cannot read a package name from requirement {requirement!r}")
    return canonical(match.group(1))


def requirements(pyproject: dict[str, Any], *, base: bool = True, extras: Sequence[str] = ()) -> list[str]:
    project = pyproject["project"]
    lines = list(project.get("dependencies", [])) if base else []
    groups = project.get("optional-dependencies", {})
    for spec in extras:
        group, _, names = spec.partition("=")
        if group not in groups:
            raise ValueError(f"pyproject.toml has no optional dependency group {group!r} (it has: {', '.join(sorted(groups))})")
        wanted = [canonical(n) for n in names.split(",") if n.strip()]
        if not wanted:
            lines.extend(groups[group])
            continue
        by_name = {requirement_name(r): r for r in groups[group]}
        missing = [n for n in wanted if n not in by_name]
        if missing:
            raise ValueError(f"optional dependency group {group!r} has no {', '.join(missing)}")
        lines.extend(by_name[n] for n in wanted)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"))
    parser.add_argument("--no-base", action="store_true", help="leave out the project's own dependencies")
    parser.add_argument(
        "--extra", action="append", default=[], metavar="NAME[=PKG,...]", help="an optional dependency group, or some packages of it"
    )
    args = parser.parse_args(argv)
    try:
        lines = requirements(tomllib.loads(args.pyproject.read_text()), base=not args.no_base, extras=args.extra)
    except (OSError, ValueError, KeyError) as exc:
        print(f"requirements.py: {exc}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
