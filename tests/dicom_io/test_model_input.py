import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from dicom_io.intensity import CT_WINDOWS, Window, unit_images
from dicom_io.key_slices import KeySliceSpec, select_key_slices
from dicom_io.model_input import prepare, prepare_series
from dicom_io.series import read_series
from dicom_io.transforms import clip_input, sam_input
from tests.conftest import SHARED_DATA, series_files


def test_prepare_series_gives_one_input_per_series_with_both_encoders_arrays():
    inputs = prepare_series([SHARED_DATA, get_testdata_file("test-SR.dcm")])
    assert sorted(i.modality for i in inputs) == ["CT", "CT", "MR"]
    for item in inputs:
        assert item.clip.shape == (3, 3, 224, 224) and item.clip.dtype == np.float32
        assert item.sam.shape == (3, 3, 1024, 1024) and item.sam.dtype == np.float32
        assert len(item.sop_instance_uids) == 3 and len(set(item.sop_instance_uids)) == 3
    mr = next(i for i in inputs if i.modality == "MR")
    assert mr.sam_sizes == ((1024, 920),) * 3 and mr.window.width > 0  # the percentile window actually used
    assert {i.window for i in inputs if i.modality == "CT"} == {CT_WINDOWS["brain"]}


def test_arrays_are_the_key_slices_through_each_transform():
    series = read_series(series_files("ct-head-ge"))[0]
    item = prepare(series, key_slices=KeySliceSpec("uniform", 2), window="subdural", clip_size=364)
    expected = select_key_slices(series, KeySliceSpec("uniform", 2))
    assert item.key_slices == expected and item.series_uid == series.series_uid and item.study_uid == series.study_uid
    assert item.sop_instance_uids == tuple(series.slices[i].sop_instance_uid for i in expected.indices)
    images = unit_images(series, expected.indices, "subdural")
    for k in range(2):
        np.testing.assert_array_equal(item.clip[k], clip_input(images[k], 364))
        np.testing.assert_array_equal(item.sam[k], sam_input(images[k])[0])
    # the files on disk are what an SR will cite
    for uid, index in zip(item.sop_instance_uids, expected.indices, strict=True):
        assert pydicom.dcmread(series.slices[index].path, stop_before_pixels=True).SOPInstanceUID == uid


def test_multiframe_input_references_frames_of_one_instance(multiframe):
    item = prepare_series(multiframe("ct-head-ge"), key_slices="central", window=Window(40, 80), sam_size=256)[0]
    assert len(set(item.sop_instance_uids)) == 1
    assert all(f is not None for f in item.key_slices.frames)
    single = prepare_series(series_files("ct-head-ge"), key_slices="central", window=Window(40, 80), sam_size=256)[0]
    np.testing.assert_array_equal(item.clip, single.clip)  # same pixels in, same tensors out
    assert item.sam.shape == (3, 3, 256, 256)


def test_a_view_the_model_does_not_read_is_not_computed():
    series = read_series(series_files("ct-head-ge"))[0]
    clip_only = prepare(series, key_slices=KeySliceSpec("uniform", 2), clip_size=64, sam_size=None)
    assert clip_only.clip.shape == (2, 3, 64, 64) and clip_only.sam.shape == (2, 3, 0, 0) and clip_only.sam_sizes == ((0, 0),) * 2
    both = prepare(series, key_slices=KeySliceSpec("uniform", 2), clip_size=64, sam_size=128)
    np.testing.assert_array_equal(clip_only.clip, both.clip)
    sam_only = prepare(series, key_slices=KeySliceSpec("uniform", 2), clip_size=None, sam_size=128)
    assert sam_only.clip.shape == (2, 3, 0, 0)
    np.testing.assert_array_equal(sam_only.sam, both.sam)
    with pytest.raises(ValueError, match="at least one view"):
        prepare(series, clip_size=None, sam_size=None)


def test_bad_arguments_fail_before_any_work():
    series = read_series(series_files("ct-phantom-philips")[:2])[0]
    with pytest.raises(ValueError, match="clip_size must be a positive integer or None"):
        prepare(series, clip_size=0)
    with pytest.raises(ValueError, match="KeySliceSpec.strategy"):
        prepare(series, key_slices="middle")  # type: ignore[arg-type]
