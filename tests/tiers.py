"""Test tiers: what a test starts decides its marker, and the marker is checked, not trusted.

* ``processes``: starts ``medcap`` (or a benchmark) as a process of its own;
* ``peers``: talks to a peer started for it: Orthanc, dcmtk's storescu / storescp / echoscu;
* ``browser``: drives Chromium;
* ``postgresql``: the PostgreSQL run of a test parametrized over both databases (set automatically);
* ``containers``: builds the images and runs docker/compose.yaml with podman (tests/docker/test_stack.py,
  4.5 to 5.5 minutes with the images built); collected only when ``-m`` names it
  (tests/docker/conftest.py), so neither ``scripts/test`` nor CI runs it: ``scripts/test-containers``.

``scripts/test --fast`` leaves all four out. The helpers that start a process or a peer call
:func:`requires`, which fails a test that lacks the marker: a new slow test cannot slip into the
fast tier unnoticed. (With ``MEDCAP_TEST_TIER_AUDIT=FILE`` it writes the test's id there instead.)
"""

from __future__ import annotations

import os

import pytest

TIERS = ("processes", "peers", "browser", "postgresql", "containers")
FAST = " and ".join(f"not {tier}" for tier in TIERS)
_current: list[pytest.Item] = []


def set_current(item: pytest.Item | None) -> None:
    _current[:] = [item] if item is not None else []


def requires(marker: str) -> None:
    """Called by helpers that start a process or a peer: the running test must carry ``marker``."""
    if not _current or _current[0].get_closest_marker(marker) is not None:
        return
    audit = os.environ.get("MEDCAP_TEST_TIER_AUDIT")
    if audit:
        with open(audit, "a") as f:
            f.write(f"{marker} {_current[0].nodeid}\n")
        return
    pytest.fail(
        f"this test starts {'a process' if marker == 'processes' else 'a peer' if marker == 'peers' else marker}: "
        f"mark it @pytest.mark.{marker} (tests/tiers.py)",
        pytrace=False,
    )
