"""service/stow.py on its own: the multipart stream, part decoding and the PS3.18 response, with real files."""

from __future__ import annotations

import pytest

from service.stow import (
    InstanceOutcome,
    Part,
    PartStream,
    StowError,
    decode_part,
    file_meta_length,
    http_status,
    multipart_boundary,
    response,
)
from tests.conftest import series_files

CT = "ct-head-ge"


def body(*parts: bytes, boundary: str = "b") -> bytes:
    out = b"preamble text is ignored\r\n"
    for part in parts:
        out += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part + b"\r\n"
    return out + f"--{boundary}--\r\nepilogue".encode()


def test_parts_come_out_whole_however_the_body_is_chunked():
    files = [p.read_bytes()[:300] for p in series_files(CT)[:3]]  # the bytes need not be DICOM here
    data = body(*files)
    for size in (1, 2, 7, 64, len(data)):
        stream, got = PartStream(b"b", len(data)), []
        for i in range(0, len(data), size):
            got += stream.feed(data[i : i + size])
        got += stream.finish()
        assert [bytes(p.body) for p in got] == files
        assert all(p.content_type == "application/dicom" for p in got)


def test_a_body_starting_with_a_line_break_or_the_boundary_is_read():
    for data in (b"\r\n--b\r\n\r\nxyz\r\n--b--\r\n", b"--b\r\n\r\nxyz\r\n--b--"):
        stream = PartStream(b"b", 1000)
        assert [bytes(p.body) for p in stream.feed(data) + stream.finish()] == [b"xyz"]


def test_the_size_cap_stops_the_stream_as_soon_as_it_is_passed():
    data = body(series_files(CT)[0].read_bytes())
    stream = PartStream(b"b", 1000)
    stream.feed(data[:1000])
    with pytest.raises(StowError) as exc:
        stream.feed(data[1000:1001])
    assert exc.value.status == 413


@pytest.mark.parametrize(
    ("content_type", "status"),
    [
        (None, 415),
        ("application/dicom", 415),
        ('multipart/related; type="application/dicom+xml"; boundary=b', 415),
        ('multipart/related; type="application/dicom"', 400),
    ],
)
def test_content_types_other_than_multipart_related_dicom_are_refused(content_type, status):
    with pytest.raises(StowError) as exc:
        multipart_boundary(content_type)
    assert exc.value.status == status


def test_the_boundary_keeps_its_case():
    assert multipart_boundary('Multipart/Related; boundary="AbC-1"; type="Application/DICOM"') == b"AbC-1"


def test_a_decoded_part_is_the_file_the_listener_would_have_written():
    raw = series_files(CT)[0].read_bytes()
    decoded = decode_part(Part({"content-type": "application/dicom; transfer-syntax=1.2.840.10008.1.2.1"}, bytearray(raw)), None)
    assert decoded.error is None and decoded.header is not None
    assert bytes(decoded.instance.dataset) == raw[file_meta_length(raw) :], "the dataset as sent"
    assert decoded.instance.header.startswith(b"\x00" * 128 + b"DICM")


def test_http_status_follows_ps3_18():
    ok = InstanceOutcome("1.2", "1.2.3", 0)
    warned = InstanceOutcome("1.2", "1.2.4", 0, warning=0xB000)
    bad = InstanceOutcome(None, None, 0xC210)
    assert http_status([ok, ok]) == 200
    assert http_status([ok, bad]) == 202
    assert http_status([ok, warned]) == 202
    assert http_status([bad, bad]) == 409
    with pytest.raises(StowError):
        http_status([])


def test_the_response_is_dicom_json_with_empty_values_left_out():
    got = response([InstanceOutcome("1.2.840.10008.5.1.4.1.1.2", "1.2.3", 0, warning=0xB000), InstanceOutcome(None, None, 0xC210)])
    (stored,) = got["00081199"]["Value"]
    assert stored == {
        "00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
        "00081155": {"vr": "UI", "Value": ["1.2.3"]},
        "00081196": {"vr": "US", "Value": [0xB000]},
    }
    (failed,) = got["00081198"]["Value"]
    assert failed == {"00081150": {"vr": "UI"}, "00081155": {"vr": "UI"}, "00081197": {"vr": "US", "Value": [0xC210]}}
    assert response([InstanceOutcome("1.2", "1.2.3", 0)])["00081198"] == {"vr": "SQ"}
