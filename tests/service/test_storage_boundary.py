"""Only service/storage.py builds paths under the data directory or opens files there.

A static check over service/ and workers/: every call that opens, reads, writes, lists or removes
files, every path joined with ``/`` to a literal, and every use of the data dir or its folders is
found in the syntax tree. Calls on a Storage (a receiver named ``storage`` or ``store``) are the
way through. What remains must be in ALLOWED with the reason it is not a data-directory file;
an entry nothing needs any more fails too, so the list stays exact.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("service", "workers")
OWNER = "service/storage.py"

# Calls that touch the file system (pathlib, os, shutil, pydicom, dicom_io's path readers).
FILE_CALLS = {
    "open",
    "dcmread",
    "read_file",
    "write_atomic",
    "fsync_directory",
    "save_as",
    "read_bytes",
    "write_bytes",
    "read_text",
    "write_text",
    "unlink",
    "rename",
    "mkdir",
    "makedirs",
    "rmdir",
    "touch",
    "rglob",
    "glob",
    "iterdir",
    "listdir",
    "scandir",
    "walk",
    "is_file",
    "is_dir",
    "exists",
    "isfile",
    "isdir",
    "remove",
    "rmtree",
    "move",
    "copy",
    "copyfile",
    "copy2",
    "disk_usage",
    "Path",
    "joinpath",
    "with_name",
    "with_suffix",
    "read_series",
    "load_series",
    "prepare_series",
}
# The data dir and its folders: only the settings (which hand out a Storage) and storage.py name them.
LAYOUT_ATTRIBUTES = {"data_dir", "instances_dir", "reports_dir", "quarantine_dir", "instance_path", "report_path", "quarantine_path"}
STORAGE_RECEIVERS = {"storage", "store"}

ALLOWED: dict[tuple[str, str], str] = {
    ("service/settings.py", "Path"): "the data_dir setting's default",
    ("service/settings.py", "is_file"): "the --config file, TLS files and the model's config.json are not data-dir files",
    ("service/settings.py", "/ 'config.json'"): "a file of the model checkpoint directory",
    ("service/settings.py", "/ 'medcap.sqlite'"): "the embedded database, not an instance, report or quarantine file",
    ("service/settings.py", "/ 'broker.sqlite'"): "the embedded broker, not an instance, report or quarantine file",
    ("service/settings.py", ".data_dir"): "the setting itself, handed to Storage and the embedded database URLs",
    ("service/database.py", "Path"): "the SQLite database file's folder",
    ("service/database.py", "mkdir"): "the SQLite database file's folder",
    ("service/prometheus.py", "rmtree"): "prometheus' temporary multiprocess folder",
    ("service/routing.py", "Path"): "the rule file and the model checkpoints it names, not data-dir files",
    ("service/routing.py", "is_file"): "a named model checkpoint's config.json",
    ("service/routing.py", "/ 'config.json'"): "a named model checkpoint's config.json",
    ("service/routing.py", "read_text"): "the routing rule file",
    ("service/cli.py", "remove"): "DicomwebClients.remove (an allowed STOW-RS client), not a file",
    ("service/stow.py", "dcmread"): "a STOW-RS part parsed from memory (io.BytesIO) before it is stored",
    ("service/atna.py", "Path"): "the package's own DICOM audit message schema",
    ("service/atna.py", "/ 'schemas'"): "the package's own DICOM audit message schema",
    ("service/atna.py", "/ 'dicom-audit-message.rng'"): "the package's own DICOM audit message schema",
    ("service/audit_queries.py", "exists"): "SQL EXISTS (whether more events matched an export), not a file",
    ("service/audit_queries.py", "copy"): "psycopg's COPY ... TO STDOUT (the audit CSV export), not a file",
    ("service/web/app.py", "Path"): "the web package's own static files",
    ("service/web/context.py", "Path"): "the web package's own templates",
    ("service/web/context.py", "/ 'templates'"): "the web package's own templates",
    ("service/web/app.py", "/ 'static'"): "the web package's own static files",
    ("service/cli.py", "exists"): "export-feedback's --out folder, chosen by the operator",
    ("service/cli.py", "is_dir"): "export-feedback's --out folder, chosen by the operator",
    ("service/feedback.py", "Path"): "the export folder, chosen by the operator",
    ("service/feedback.py", "mkdir"): "the export folder, chosen by the operator",
    ("service/feedback.py", "write_atomic"): "the export's PNGs and table, in the operator's folder",
    ("service/feedback.py", "/ f-string"): "the export's PNG names, in the operator's folder",
    ("service/assembly.py", "exists"): "SQL EXISTS",
    ("service/reports.py", "exists"): "SQL EXISTS",
    ("service/worklist.py", "exists"): "SQL EXISTS",
    ("workers/drafting.py", "prepare_series"): "reads the paths Storage.existing_all checked",
    ("service/outputs/__init__.py", "Path"): "an output's recorded path as its artefact; DicomSR.send opens it through Storage",
    ("service/outputs/dicom_sr.py", "Path"): "the report's recorded path as its artefact; send opens it through Storage",
    ("service/outputs/kind.py", "Path"): "Artefact takes its recorded path as text or Path",
}


def _receiver(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def findings(source: str) -> set[str]:
    """What in ``source`` touches files or the data directory's layout."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute) and _receiver(func.value) in STORAGE_RECEIVERS:
                continue  # the Storage API
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
            if isinstance(func, ast.Attribute) and func.attr == "join" and _receiver(func.value) == "path":
                name = "os.path.join"
            if name in FILE_CALLS or name == "os.path.join":
                found.add(str(name))
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            for side in (node.left, node.right):
                if isinstance(side, ast.Constant) and isinstance(side.value, str):
                    found.add(f"/ {side.value!r}")
                elif isinstance(side, ast.JoinedStr):
                    found.add("/ f-string")
        elif isinstance(node, ast.Attribute) and node.attr in LAYOUT_ATTRIBUTES and _receiver(node.value) not in STORAGE_RECEIVERS:
            found.add(f".{node.attr}")
        elif isinstance(node, ast.Attribute) and node.attr == "root" and _receiver(node.value) in STORAGE_RECEIVERS:
            found.add(".root of a Storage")
    return found


def scan() -> set[tuple[str, str]]:
    found = set()
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            module = path.relative_to(ROOT).as_posix()
            if module != OWNER:
                found |= {(module, what) for what in findings(path.read_text(encoding="utf-8"))}
    return found


def test_only_storage_builds_or_opens_data_directory_paths():
    found = scan()
    unexpected = sorted(found - ALLOWED.keys())
    assert unexpected == [], f"file access outside {OWNER} (go through Storage, or allow it here with a reason): {unexpected}"


def test_every_allowance_is_still_needed():
    stale = sorted(ALLOWED.keys() - scan())
    assert stale == [], f"remove these entries from ALLOWED, nothing needs them: {stale}"


def test_the_check_finds_what_the_callers_used_to_do():
    # The lines service/storage.py replaced, as they were written in review.py, drafting.py,
    # ingest.py, dispatching.py, listener.py and web/pages.py.
    before = {
        "sr = pydicom.dcmread(doc.path)": "dcmread",
        'path = self.reports_dir / study_uid / f"{sr.SOPInstanceUID}.dcm"': "/ f-string",
        "write_atomic(path, data)": "write_atomic",
        "path.unlink(missing_ok=True)": "unlink",
        "fresh_file = not path.exists()": "exists",
        "path = Path(doc.path)": "Path",
        "store = InstanceStore(settings.instances_dir, settings.quarantine_dir, 1)": ".instances_dir",
        'settings.data_dir / "reports"': "/ 'reports'",
        "read_series([Path(p) for p in paths])": "read_series",
        "os.path.join(settings.data_dir, 'instances')": "os.path.join",
        "with open(path, 'rb') as f: f.read()": "open",
        "target.write_bytes(data)": "write_bytes",
        "settings.storage.root / study_uid": ".root of a Storage",
    }
    for line, what in before.items():
        assert what in findings(line), line


def test_calls_on_a_storage_pass():
    assert findings("self.store.write(path, *chunks); settings.storage.read_dataset(doc.path); self.options.storage.delete(p)") == set()
