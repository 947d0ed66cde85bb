#!/usr/bin/python3
"""Start Orthanc with a configuration made from ORTHANC__* variables, as the official image does.

ORTHANC__DICOM_AET=ORTHANC sets "DicomAet"; a double underscore nests (ORTHANC__A__B_C sets
{"A": {"BC": ...}}); a value that parses as JSON (false, 4242, {...}) is that value, else a string.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

PREFIX = "ORTHANC__"
DEFAULTS = {
    "StorageDirectory": "/var/lib/orthanc/db",
    "IndexDirectory": "/var/lib/orthanc/db",
    "RemoteAccessAllowed": True,
    "HttpPort": 8042,
    "DicomPort": 4242,
}


def key(word: str) -> str:
    return "".join(part.capitalize() for part in word.split("_"))


def value(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        return text


def configuration(environ: dict[str, str]) -> dict[str, object]:
    config: dict[str, object] = dict(DEFAULTS)
    for name, text in sorted(environ.items()):
        if not name.startswith(PREFIX):
            continue
        *parents, last = [key(w) for w in name[len(PREFIX) :].split("__")]
        node = config
        for parent in parents:
            child = node.setdefault(parent, {})
            if not isinstance(child, dict):
                sys.exit(f"orthanc-entrypoint: {name}: {parent} is not a section")
            node = child
        node[last] = value(text)
    return config


def main() -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="orthanc-", delete=False) as f:
        json.dump(configuration(dict(os.environ)), f, indent=2)
    os.execv("/usr/sbin/Orthanc", ["Orthanc", f.name, *sys.argv[1:]])


if __name__ == "__main__":
    main()
