#!/usr/bin/python3
"""Health probe at the official image's path: Orthanc's REST API answers GET /system."""

import sys
import urllib.request

try:
    with urllib.request.urlopen("http://127.0.0.1:8042/system", timeout=5) as response:
        sys.exit(0 if response.status == 200 else 1)
except OSError as exc:
    print(f"Orthanc does not answer: {exc}", file=sys.stderr)
    sys.exit(1)
