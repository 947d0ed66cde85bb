import math
import random
import subprocess
import sys

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels.processing import apply_rescale

from dicom_io.series import SeriesError, Slice, load_series, read_series
from tests.conftest import REPO, series_files, shared_data


def only(source):
    series = read_series(source)
    assert len(series) == 1
    return series[0]


def shuffled(name):
    files = series_files(name)
    random.Random(3).shuffle(files)
    return files


def test_tilted_ct_is_ordered_along_the_normal_with_its_real_spacing_and_tilt():
    ct = only(shuffled("ct-head-ge"))
    assert ct.modality == "CT" and ct.body_part == "HEAD" and ct.description is None
    assert [s.instance_number for s in ct.slices] == list(range(1, 29))
    assert ct.normal == pytest.approx((0.0, 0.3173, 0.9483), abs=1e-4)
    assert ct.gantry_tilt_deg == pytest.approx(18.5, abs=0.01)
    gaps = ct.gaps_mm  # along the normal: not the z steps (4.22 / 1.14 / 7.38)
    assert gaps[:13] == pytest.approx([4.0] * 13, abs=0.01)
    assert gaps[13] == pytest.approx(1.08, abs=0.01)
    assert gaps[14:] == pytest.approx([7.0] * 13, abs=0.01)
    assert ct.pixel_spacing == pytest.approx((0.488, 0.488), abs=1e-3)
    assert ct.window == (35.0, 85.0)  # the central slice's; the 4 mm slices say 35/100


def test_sagittal_mr_with_one_z_is_sorted_by_projection_not_z_or_instance_number():
    files = shuffled("mr-t1-brain-uih")
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
    assert len({float(h.ImagePositionPatient[2]) for h in headers}) == 1  # z sorting cannot work here
    assert {float(h.SpacingBetweenSlices) for h in headers} == {1.0}  # and this tag is wrong for the subset

    mr = only(files)
    assert len(mr) == 40 and mr.modality == "MR" and mr.description == "t1_gre_fsp_3d_sag"
    numbers = [s.instance_number for s in mr.slices]
    assert numbers == sorted(numbers, reverse=True) == list(range(157, 0, -4))  # InstanceNumber runs against the normal
    assert np.all(np.diff(mr.positions) > 0)
    assert mr.gaps_mm == pytest.approx([4.0] * 39, abs=1e-3)
    assert mr.spacing_mm == pytest.approx(4.0, abs=1e-3)
    assert mr.normal == pytest.approx((-0.9977, 0.0680, 0.0), abs=1e-4)
    assert mr.gantry_tilt_deg is None  # sagittal: no gantry tilt to speak of
    first = mr.slices[0].pixels
    assert first.shape == (512, 460) and first.dtype == np.float32


def test_untilted_ct_without_extensions_is_in_hu():
    files = series_files("ct-phantom-philips")
    assert all(p.suffix == "" for p in files)
    ct = only(files)
    assert len(ct) == 28 and ct.gantry_tilt_deg == 0.0 and ct.spacing_mm == pytest.approx(5.0)
    assert ct.normal == (0.0, 0.0, 1.0) and ct.slices[0].image_position[2] == pytest.approx(696.21)
    ds = pydicom.dcmread(ct.slices[10].path)
    expected = apply_rescale(ds.pixel_array, ds)  # pydicom's own modality LUT as the oracle
    np.testing.assert_array_equal(ct.slices[10].pixels, expected.astype(np.float32))
    assert ct.slices[10].pixels.min() == -1024.0  # RescaleIntercept -1024 applied to stored 0


def test_a_folder_is_searched_and_non_dicom_files_are_skipped_with_a_reason():
    result = load_series(shared_data())
    assert sorted(s.modality for s in result.series) == ["CT", "CT", "MR"]
    assert sorted(s.path.name for s in result.skipped) == ["LICENSE.dcm_qa_ct", "LICENSE.dcm_qa_uih", "README.md"]
    assert all(s.reason == "not a DICOM Part 10 file" for s in result.skipped)
    assert len({s.series_uid for s in result.series}) == 3


def test_sr_and_other_non_image_classes_are_skipped_and_duplicates_are_dropped(tmp_path):
    ct_files = series_files("ct-phantom-philips")[:5]
    copy = tmp_path / "same-instance-again.dcm"
    copy.write_bytes(ct_files[0].read_bytes())
    result = load_series([*ct_files, get_testdata_file("test-SR.dcm"), copy, ct_files[1]])
    assert len(result.series) == 1 and len(result.series[0]) == 5
    reasons = {s.path.name: s.reason for s in result.skipped}
    assert reasons["test-SR.dcm"] == "Comprehensive SR Storage: not a CT/MR image class"
    assert reasons["same-instance-again.dcm"].startswith("duplicate of SOP instance")
    assert len(result.skipped) == 2  # the path given twice is read once, silently


@pytest.mark.parametrize("name", ["ct-head-ge", "ct-phantom-philips"])
def test_legacy_converted_enhanced_ct_gives_the_same_slices_as_the_single_frame_series(multiframe, name):
    path = multiframe(name)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert ds.SOPClassUID == pydicom.uid.LegacyConvertedEnhancedCTImageStorage and int(ds.NumberOfFrames) == 28
    single, multi = only(series_files(name)), only([path])
    assert multi.sop_class_uid == pydicom.uid.LegacyConvertedEnhancedCTImageStorage
    assert {s.sop_instance_uid for s in multi.slices} == {ds.SOPInstanceUID}
    assert sorted(s.frame for s in multi.slices) == list(range(1, 29))
    assert [s.frame for s in multi.slices] != list(range(1, 29))  # frames were stored shuffled: order came from geometry
    assert multi.positions == pytest.approx(single.positions, abs=1e-6)
    assert multi.normal == pytest.approx(single.normal) and multi.gantry_tilt_deg == pytest.approx(single.gantry_tilt_deg)
    assert multi.pixel_spacing == pytest.approx(single.pixel_spacing)
    assert {s.rescale_intercept for s in multi.slices} == {s.rescale_intercept for s in single.slices}
    for a, b in zip(single.slices, multi.slices, strict=True):
        np.testing.assert_array_equal(a.pixels, b.pixels)


def test_per_frame_functional_groups_override_shared_ones(multiframe, tmp_path):
    ds = pydicom.dcmread(multiframe("ct-phantom-philips"))
    shared = ds.SharedFunctionalGroupsSequence[0]
    transform = shared.PixelValueTransformationSequence[0]
    assert float(transform.RescaleIntercept) == -1024
    override = pydicom.Dataset()
    override.RescaleSlope, override.RescaleIntercept, override.RescaleType = 2, -2048, "HU"
    ds.PerFrameFunctionalGroupsSequence[4].PixelValueTransformationSequence = [override]
    path = tmp_path / "per-frame-rescale"
    ds.save_as(path, enforce_file_format=True)
    by_frame = {s.frame: s for s in only([path]).slices}
    original = {s.frame: s for s in only([multiframe("ct-phantom-philips")]).slices}
    assert (by_frame[5].rescale_slope, by_frame[5].rescale_intercept) == (2.0, -2048.0)
    np.testing.assert_array_equal(by_frame[5].pixels, 2 * original[5].pixels)  # 2·s - 2048 = 2·(s - 1024)
    np.testing.assert_array_equal(by_frame[6].pixels, original[6].pixels)


def test_jpeg2000_pixel_data_decodes_through_pylibjpeg():
    compressed = pydicom.dcmread(get_testdata_file("MR_small_jp2klossless.dcm"), stop_before_pixels=True)
    assert compressed.file_meta.TransferSyntaxUID.is_compressed
    # both files share a SOP Instance UID, so they are loaded apart
    a = only([get_testdata_file("MR_small_jp2klossless.dcm")]).slices[0].pixels
    b = only([get_testdata_file("MR_small.dcm")]).slices[0].pixels
    assert a.shape == (64, 64) and a.std() > 0
    np.testing.assert_array_equal(a, b)


def test_monochrome1_mr_is_inverted_and_ct_stays_in_hu(edited):
    mr_files = series_files("mr-t1-brain-uih")[:3]

    def mono1(ds, i):
        ds.PhotometricInterpretation = "MONOCHROME1"

    plain, inverted = only(mr_files), only(edited(mr_files, mono1))
    for a, b in zip(plain.slices, inverted.slices, strict=True):
        np.testing.assert_array_equal(b.pixels, 65535 - a.pixels)  # unsigned 16 bits stored: brighter is higher again
    ct_files = series_files("ct-phantom-philips")[:2]
    np.testing.assert_array_equal(only(edited(ct_files, mono1)).slices[0].pixels, only(ct_files).slices[0].pixels)


def test_empty_input_and_missing_paths_fail_clearly(tmp_path):
    with pytest.raises(SeriesError, match="no input files"):
        load_series([])
    with pytest.raises(SeriesError, match="no input files"):
        load_series(tmp_path)
    with pytest.raises(SeriesError, match="no such file or folder"):
        load_series(tmp_path / "nothing-here")


def test_non_image_only_input_gives_no_series():
    result = load_series([get_testdata_file("test-SR.dcm")])
    assert result.series == () and len(result.skipped) == 1


def test_mixed_orientations_fail_naming_the_field(edited):
    def localizer(ds, i):
        if i == 2:
            ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]

    with pytest.raises(SeriesError, match=r"mixed ImageOrientationPatient \(4 at .*; 1 at \[0.0, 1.0, 0.0, 0.0, 0.0, -1.0\]\)"):
        load_series(edited(series_files("ct-phantom-philips")[:5], localizer))


def test_missing_or_truncated_pixel_data_fails_naming_the_file(edited):
    def drop(ds, i):
        if i == 1:
            del ds.PixelData

    files = edited(series_files("ct-phantom-philips")[:3], drop)
    with pytest.raises(SeriesError, match=f"{files[1].name}: image instance without pixel data"):
        load_series(files)

    def truncate(ds, i):
        ds.PixelData = ds.PixelData[:1000]

    with pytest.raises(SeriesError, match="truncated"):
        load_series(edited(series_files("ct-phantom-philips")[:1], truncate))


def test_missing_geometry_and_repeated_positions_fail(edited):
    def no_position(ds, i):
        del ds.ImagePositionPatient

    with pytest.raises(SeriesError, match="ImagePositionPatient is missing"):
        load_series(edited(series_files("ct-phantom-philips")[:1], no_position))

    def same_place(ds, i):
        ds.ImagePositionPatient = [0, 0, 10]

    with pytest.raises(SeriesError, match="share the position 10.000 mm"):
        load_series(edited(series_files("ct-phantom-philips")[:2], same_place))

    def flat(ds, i):
        ds.RescaleSlope = 0

    with pytest.raises(SeriesError, match="I10: Slice.rescale_slope must be finite and non-zero, got 0.0"):
        load_series(edited(series_files("ct-phantom-philips")[:1], flat))


def test_a_series_keeps_one_header_for_reports_and_reads_each_file_once(edited, dcmread_calls):
    def big_private_value(ds, index):  # over the 64 KB that load_series leaves on disk
        ds.add_new(0x00291010, "OB", b"x" * 70_000)
        ds.add_new(0x00290010, "LO", "MEDCAP TEST")

    files = edited(series_files("ct-head-ge")[:4], big_private_value)
    dcmread_calls.clear()
    ct = only(files)
    assert sorted(dcmread_calls) == sorted(files)
    assert sorted(ct.sop_instance_uids) == sorted(str(pydicom.dcmread(f).SOPInstanceUID) for f in files)
    source = pydicom.dcmread(next(f for f in files if pydicom.dcmread(f).SOPInstanceUID == ct.header.SOPInstanceUID))
    kept = {e.tag for e in ct.header}
    assert kept == {e.tag for e in source if e.tag < 0x7FE00000} - {0x00291010}  # no pixel data, nothing left on disk
    assert ct.header.PatientName == source.PatientName and ct.header.Manufacturer == source.Manufacturer


def test_a_multiframe_header_leaves_out_the_per_frame_groups(multiframe):
    ct = only([multiframe("ct-head-ge")])
    assert ct.sop_instance_uids == (ct.slices[0].sop_instance_uid,)  # 28 frames, one instance
    assert "PerFrameFunctionalGroupsSequence" not in ct.header and "PixelData" not in ct.header
    assert "SharedFunctionalGroupsSequence" in ct.header and ct.header.NumberOfFrames == 28


def test_slice_constructor_validates_its_fields():
    good = only(series_files("ct-phantom-philips")[:1]).slices[0]
    fields = {**good.__dict__}
    with pytest.raises(ValueError, match="Slice.frame must be >= 1"):
        Slice(**{**fields, "frame": 0})
    with pytest.raises(ValueError, match="Slice.rescale_slope"):
        Slice(**{**fields, "rescale_slope": math.nan})


def test_dicom_io_needs_neither_torch_nor_service_code():
    code = (
        "import sys, dicom_io.model_input, dicom_io.key_slices\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'transformers', 'celery', 'sqlalchemy', 'fastapi', 'service', 'workers'})\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
