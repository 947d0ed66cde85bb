import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from dicom_io.image_views import ImageView
from dicom_io.intensity import CT_WINDOWS, Window, unit_images
from dicom_io.key_slices import KeySliceSpec, select_key_slices
from dicom_io.model_input import prepare, prepare_series
from dicom_io.series import read_series
from dicom_io.transforms import clip_input, sam_input
from tests.conftest import series_files, shared_data

CLIP, SAM = ImageView("clip", 224, "clip"), ImageView("sam", 1024, "sam")


def test_prepare_series_gives_one_input_per_series_with_both_encoders_arrays():
    inputs = prepare_series([shared_data(), get_testdata_file("test-SR.dcm")], views=[CLIP, SAM])
    assert sorted(i.modality for i in inputs) == ["CT", "CT", "MR"]
    for item in inputs:
        assert item.views["clip"].shape == (3, 3, 224, 224) and item.views["clip"].dtype == np.float32
        assert item.views["sam"].shape == (3, 3, 1024, 1024) and item.views["sam"].dtype == np.float32
        assert len(item.sop_instance_uids) == 3 and len(set(item.sop_instance_uids)) == 3
    mr = next(i for i in inputs if i.modality == "MR")
    assert mr.content_sizes["sam"] == ((1024, 920),) * 3 and mr.window.width > 0  # the percentile window actually used
    assert mr.content_sizes["clip"] == ((224, 224),) * 3  # a square view fills its square
    assert {i.window for i in inputs if i.modality == "CT"} == {CT_WINDOWS["brain"]}


def test_arrays_are_the_key_slices_through_each_transform():
    series = read_series(series_files("ct-head-ge"))[0]
    item = prepare(series, key_slices=KeySliceSpec("uniform", 2), window="subdural", views=[ImageView("clip", 364, "clip"), SAM])
    expected = select_key_slices(series, KeySliceSpec("uniform", 2))
    assert item.key_slices == expected and item.series_uid == series.series_uid and item.study_uid == series.study_uid
    assert item.sop_instance_uids == tuple(series.slices[i].sop_instance_uid for i in expected.indices)
    images = unit_images(series, expected.indices, "subdural")
    for k in range(2):
        np.testing.assert_array_equal(item.views["clip"][k], clip_input(images[k], 364))
        np.testing.assert_array_equal(item.views["sam"][k], sam_input(images[k])[0])
    # the files on disk are what an SR will cite
    for uid, index in zip(item.sop_instance_uids, expected.indices, strict=True):
        assert pydicom.dcmread(series.slices[index].path, stop_before_pixels=True).SOPInstanceUID == uid


def test_multiframe_input_references_frames_of_one_instance(multiframe):
    views = [CLIP, ImageView("sam", 256, "sam")]
    item = prepare_series(multiframe("ct-head-ge"), key_slices="central", window=Window(40, 80), views=views)[0]
    assert len(set(item.sop_instance_uids)) == 1
    assert all(f is not None for f in item.key_slices.frames)
    single = prepare_series(series_files("ct-head-ge"), key_slices="central", window=Window(40, 80), views=views)[0]
    np.testing.assert_array_equal(item.views["clip"], single.views["clip"])  # same pixels in, same tensors out
    assert item.views["sam"].shape == (3, 3, 256, 256)


def test_only_the_views_asked_for_are_computed_each_from_the_unit_image():
    series = read_series(series_files("ct-head-ge"))[0]
    spec = KeySliceSpec("uniform", 2)
    clip_only = prepare(series, key_slices=spec, views=[ImageView("clip", 64, "clip")])
    assert dict(clip_only.content_sizes) == {"clip": ((64, 64),) * 2} and clip_only.views["clip"].shape == (2, 3, 64, 64)
    both = prepare(series, key_slices=spec, views=[ImageView("clip", 64, "clip"), ImageView("sam", 128, "sam")])
    np.testing.assert_array_equal(clip_only.views["clip"], both.views["clip"])
    sam_only = prepare(series, key_slices=spec, views=[ImageView("sam", 128, "sam")])
    assert set(sam_only.views) == {"sam"}
    np.testing.assert_array_equal(sam_only.views["sam"], both.views["sam"])
    # any view a family declares, under its own name: here ImageNet- and unit-normalised squares
    other = prepare(series, key_slices=spec, views=[ImageView("imagenet", 32, "imagenet"), ImageView("raw", 32, "unit")])
    unit = other.views["raw"]
    assert unit.shape == (2, 3, 32, 32) and 0 <= unit.min() and unit.max() <= 1
    np.testing.assert_allclose(other.views["imagenet"][:, 0], (unit[:, 0] - 0.485) / 0.229, atol=1e-5)
    with pytest.raises(ValueError, match="views: at least one view"):
        prepare(series, views=[])
    with pytest.raises(ValueError, match="view names must be distinct"):
        prepare(series, views=[ImageView("clip", 64, "clip"), ImageView("clip", 32, "unit")])


def test_series_input_refuses_arrays_that_do_not_match_its_key_slices():
    item = prepare(read_series(series_files("ct-head-ge"))[0], key_slices=KeySliceSpec("uniform", 2), views=[ImageView("u", 8, "unit")])
    fields = (item.series_uid, item.study_uid, item.modality, item.key_slices, item.window)
    with pytest.raises(ValueError, match=r"SeriesInput.views\['u'\] must be float32 \(2, 3, S, S\)"):
        type(item)(*fields, {"u": item.views["u"][:1]}, item.content_sizes, item.series)
    with pytest.raises(ValueError, match=r"SeriesInput.content_sizes\['u'\] has 1 entries for 2"):
        type(item)(*fields, item.views, {"u": ((8, 8),)}, item.series)
    with pytest.raises(ValueError, match="SeriesInput.content_sizes has views"):
        type(item)(*fields, item.views, {}, item.series)
    with pytest.raises(TypeError):
        item.views["u"] = item.views["u"]  # read-only


def test_bad_arguments_fail_before_any_work():
    series = read_series(series_files("ct-phantom-philips")[:2])[0]
    with pytest.raises(ValueError, match="ImageView.size must be a positive integer"):
        prepare(series, views=[ImageView("clip", 0, "clip")])
    with pytest.raises(ValueError, match="views: expected ImageView"):
        prepare(series, views=[("clip", 224)])
    with pytest.raises(ValueError, match="KeySliceSpec.strategy"):
        prepare(series, views=[CLIP], key_slices="middle")
