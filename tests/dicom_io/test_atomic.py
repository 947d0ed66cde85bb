import os

import pytest

from dicom_io.atomic import write_atomic


def test_write_atomic_writes_whole_file(tmp_path):
    target = tmp_path / "a" / "b.dcm"
    write_atomic(target, b"x" * 1000)
    assert target.read_bytes() == b"x" * 1000
    assert [p.name for p in target.parent.iterdir()] == ["b.dcm"]


def test_write_atomic_replaces_existing_file_whole(tmp_path):
    target = tmp_path / "b.dcm"
    write_atomic(target, b"old")
    write_atomic(target, b"new content")
    assert target.read_bytes() == b"new content"


def test_full_disk_leaves_no_partial_file_and_keeps_the_old_one(small_disk):
    target = small_disk / "instance.dcm"
    write_atomic(target, b"first version")
    filler = small_disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(os.urandom(65536))
        except OSError:
            pass
    with pytest.raises(OSError):
        write_atomic(target, os.urandom(1024 * 1024))
    assert target.read_bytes() == b"first version"
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "instance.dcm"]
