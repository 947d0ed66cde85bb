import numpy as np
import pytest
from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

from dicom_io.intensity import unit_images
from dicom_io.series import read_series
from dicom_io.transforms import CLIP_MEAN, CLIP_STD, SAM_PIXEL_MEAN, SAM_PIXEL_STD, clip_input, sam_input
from tests.conftest import series_files

MEAN, STD = np.array(CLIP_MEAN, dtype=np.float32)[:, None, None], np.array(CLIP_STD, dtype=np.float32)[:, None, None]


@pytest.fixture(scope="module")
def mr_slice():
    """A real 512×460 (non-square) sagittal MR slice in [0, 1]."""
    mr = read_series(series_files("mr-t1-brain-uih"))[0]
    return unit_images(mr, [20])[0]


def test_clip_input_shapes_and_normalisation():
    gray = np.random.default_rng(0).random((224, 224), dtype=np.float32)
    out = clip_input(gray)
    assert out.shape == (3, 224, 224) and out.dtype == np.float32
    np.testing.assert_allclose(out, (gray - MEAN) / STD, atol=1e-6)  # same size: no resampling, only normalisation
    assert clip_input(gray, 364).shape == (3, 364, 364)
    rgb = np.stack([gray, 1 - gray, np.full_like(gray, 0.5)], axis=-1)
    np.testing.assert_allclose(clip_input(rgb)[1], (1 - gray - CLIP_MEAN[1]) / CLIP_STD[1], atol=1e-5)


def test_clip_input_resizes_the_whole_image_in_float_without_quantising(mr_slice):
    out = clip_input(mr_slice)
    assert out.shape == (3, 224, 224)
    unit = out[0] * CLIP_STD[0] + CLIP_MEAN[0]
    assert unit.min() >= -1e-6 and unit.max() <= 1 + 1e-6  # bicubic overshoot clipped
    assert len(np.unique(np.round(unit * 255 * 16))) > 256 * 4  # far more than 256 grey levels survive
    ramp = np.tile(np.linspace(0, 1, 1000, dtype=np.float32), (10, 1))
    assert len(np.unique(clip_input(ramp, 224)[0])) > 200


def test_sam_input_matches_transformers_sam_image_processor(mr_slice):
    out, (h, w) = sam_input(mr_slice)
    assert out.shape == (3, 1024, 1024) and out.dtype == np.float32
    assert (h, w) == (1024, 920)  # 512×460 scaled so the longest side is 1024
    quantised = np.round(mr_slice * 255).astype(np.uint8)  # the processor's own input type
    reference = SamImageProcessorPil()(images=np.repeat(quantised[..., None], 3, axis=-1), return_tensors="np")
    assert tuple(reference["reshaped_input_sizes"][0]) == (h, w)
    expected = reference["pixel_values"][0]
    assert expected.shape == out.shape
    diff = np.abs(out - expected)
    one_level = 1 / min(SAM_PIXEL_STD)
    assert diff.max() <= 2 * one_level  # 8-bit input plus PIL's 8-bit intermediate rounding in the reference
    assert diff.mean() <= 0.5 * one_level
    np.testing.assert_array_equal(out[:, :, w:], 0)  # right padding, zeros after normalisation
    np.testing.assert_array_equal(expected[:, :, w:], 0)


def test_sam_input_normalises_with_sam_statistics_and_pads():
    image = np.full((100, 50), 0.5, dtype=np.float32)
    out, size = sam_input(image, longest=256)
    assert size == (256, 128) and out.shape == (3, 256, 256)
    for k in range(3):
        np.testing.assert_allclose(out[k, :, :128], (127.5 - SAM_PIXEL_MEAN[k]) / SAM_PIXEL_STD[k], atol=1e-5)
    assert np.all(out[:, :, 128:] == 0)
    wide, size = sam_input(np.zeros((30, 100), dtype=np.float32))
    assert size == (307, 1024) and np.all(wide[:, 307:, :] == 0)  # 30·10.24 = 307.2, SAM rounds half up


def test_sam_input_comes_from_the_raw_image_not_the_clip_tensor(mr_slice):
    clip = clip_input(mr_slice)
    sam, _ = sam_input(mr_slice)
    # the official code: ToPILImage(CLIP-normalised tensor) = mul(255).byte(), wrapping modulo 256
    wrapped = (np.trunc(clip * 255).astype(np.int64) % 256).astype(np.uint8).transpose(1, 2, 0)
    bugged, _ = sam_input(wrapped.astype(np.float32) / 255)
    assert np.abs(bugged - sam).mean() > 0.5  # a different picture altogether
    # and the normalised tensor itself is refused rather than silently rescaled
    with pytest.raises(ValueError, match=r"must be \(H, W\) or \(H, W, 3\)"):
        sam_input(clip)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\] \(a raw unit image, not a normalised tensor\)"):
        sam_input(clip.transpose(1, 2, 0))


def test_no_flips_or_crops_in_either_input():
    image = np.zeros((300, 400), dtype=np.float32)
    marks = {(0, 0): 1.0, (0, 1): 0.75, (1, 0): 0.5, (1, 1): 0.25}  # (bottom?, right?) -> brightness
    for (bottom, right), value in marks.items():
        rows = slice(260, 300) if bottom else slice(0, 40)
        cols = slice(360, 400) if right else slice(0, 40)
        image[rows, cols] = value
    image[140:160, 40:60] = 1.0  # and a spot on the left, half way down

    clip = clip_input(image)[0] * CLIP_STD[0] + CLIP_MEAN[0]
    sam, (h, w) = sam_input(image)
    sam = sam[0, :h, :w] * SAM_PIXEL_STD[0] + SAM_PIXEL_MEAN[0]
    for out, scale in ((clip, 1.0), (sam, 255.0)):
        rows, cols = out.shape
        for (bottom, right), value in marks.items():  # every corner where it was: no flip, no crop
            r, c = (rows - 2 if bottom else 1), (cols - 2 if right else 1)
            assert out[r, c] == pytest.approx(value * scale, abs=0.01 * scale)
        middle = out[int(rows * 0.45) : int(rows * 0.55)]
        assert middle[:, : cols // 2].max() == pytest.approx(scale, abs=0.02 * scale)  # the spot stays on the left
        assert middle[:, cols // 2 :].max() == pytest.approx(0, abs=0.01 * scale)


def test_inputs_are_validated():
    with pytest.raises(ValueError, match="float image"):
        clip_input(np.zeros((8, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        clip_input(np.full((8, 8), 1.5, dtype=np.float32))
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        sam_input(np.full((8, 8), np.nan, dtype=np.float32))
    with pytest.raises(ValueError, match="size must be a positive integer"):
        clip_input(np.zeros((8, 8), dtype=np.float32), size=0)
    with pytest.raises(ValueError, match="longest must be a positive integer"):
        sam_input(np.zeros((8, 8), dtype=np.float32), longest=-1)
