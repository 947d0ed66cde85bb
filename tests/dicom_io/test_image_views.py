import numpy as np
import pytest

from dicom_io.image_views import ImageView, check_views, view_array
from dicom_io.intensity import unit_images
from dicom_io.series import read_series
from dicom_io.transforms import clip_input, sam_input
from tests.conftest import series_files


@pytest.fixture(scope="module")
def mr_slice():
    """A real 512×460 (non-square) sagittal MR slice in [0, 1]."""
    return unit_images(read_series(series_files("mr-t1-brain-uih"))[0], [20])[0]


def test_clip_and_sam_views_are_exactly_the_encoders_transforms(mr_slice):
    clip, size = view_array(ImageView("clip", 224, "clip"), mr_slice)
    np.testing.assert_array_equal(clip, clip_input(mr_slice, 224))
    assert size == (224, 224)
    sam, content = view_array(ImageView("sam", 1024, "sam"), mr_slice)
    expected, expected_content = sam_input(mr_slice, 1024)
    np.testing.assert_array_equal(sam, expected)
    assert content == expected_content == (1024, 920) and ImageView("sam", 1024, "sam").padded


def test_square_views_differ_only_in_their_statistics(mr_slice):
    unit, _ = view_array(ImageView("u", 96, "unit"), mr_slice)
    assert unit.dtype == np.float32 and unit.shape == (3, 96, 96) and 0 <= unit.min() and unit.max() <= 1
    imagenet, _ = view_array(ImageView("i", 96, "imagenet"), mr_slice)
    for k, (m, s) in enumerate(zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), strict=True)):
        np.testing.assert_allclose(imagenet[k], (unit[k] - m) / s, atol=1e-5)
    half, _ = view_array(ImageView("m", 96, "mean_std", mean=(0.5, 0.5, 0.5), std=[0.5, 0.5, 0.5]), mr_slice)
    np.testing.assert_allclose(half, unit * 2 - 1, atol=1e-6)
    clip, _ = view_array(ImageView("c", 96, "clip"), mr_slice)
    np.testing.assert_allclose(clip[0], (unit[0] - 0.48145466) / 0.26862954, atol=1e-5)


def test_a_view_refuses_anything_but_a_unit_image():
    with pytest.raises(ValueError, match="view 'u': image01 must lie in \\[0, 1\\]"):
        view_array(ImageView("u", 8, "unit"), np.full((4, 4), 2.0, dtype=np.float32))


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (("CLIP", 224, "clip"), "ImageView.name must be a lower-case identifier"),
        (("", 224, "clip"), "ImageView.name"),
        (("clip", 0, "clip"), "ImageView.size must be a positive integer"),
        (("clip", True, "clip"), "ImageView.size"),
        (("clip", 224.0, "clip"), "ImageView.size"),
        (("clip", 224, "bicubic"), "ImageView.normalisation must be one of"),
        (("clip", 224, "clip", (0.5, 0.5, 0.5)), "ImageView.mean, ImageView.std: only for normalisation 'mean_std'"),
        (("m", 224, "mean_std"), "ImageView.mean must be three numbers"),
        (("m", 224, "mean_std", (0.5, 0.5), (1, 1, 1)), "ImageView.mean must be three numbers"),
        (("m", 224, "mean_std", (0.5, 0.5, 0.5), (1, 0, 1)), "ImageView.std must be positive"),
    ],
)
def test_image_view_names_the_bad_field(arguments, message):
    with pytest.raises(ValueError, match=message):
        ImageView(*arguments)


def test_check_views():
    views = check_views([ImageView("a", 8, "unit"), ImageView("b", 8, "sam")])
    assert [v.name for v in views] == ["a", "b"]
    with pytest.raises(ValueError, match="model views: view names must be distinct"):
        check_views([ImageView("a", 8, "unit"), ImageView("a", 16, "clip")], "model views")
