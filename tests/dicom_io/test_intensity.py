import numpy as np
import pytest

from dicom_io.intensity import CT_WINDOWS, Percentiles, Window, resolve_intensity, series_window, unit_images
from dicom_io.series import read_series
from tests.conftest import series_files


def test_presets_are_the_documented_center_width_pairs():
    expected = {
        "brain": (40, 80),
        "subdural": (75, 215),
        "stroke": (40, 40),
        "bone": (400, 1800),
        "temporal_bone": (600, 2800),
        "soft_tissue": (50, 350),
        "lung": (-600, 1500),
    }
    assert {k: (w.center, w.width) for k, w in CT_WINDOWS.items()} == expected


def test_window_maps_hu_linearly_onto_0_1_and_clips():
    hu = np.array([-1000, 0, 20, 40, 60, 80, 3000], dtype=np.int16)
    out = CT_WINDOWS["brain"].apply(hu)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0, 0, 0.25, 0.5, 0.75, 1, 1])
    with pytest.raises(ValueError, match="Window.width must be finite and > 0"):
        Window(40, 0)
    with pytest.raises(ValueError, match="Percentiles.low/high"):
        Percentiles(99, 1)


def test_ct_defaults_follow_body_part_and_auto_uses_the_header(ge, edited):
    philips = read_series(series_files("ct-phantom-philips"))[0]
    assert philips.body_part == "BRAIN"  # Philips' word for a head
    assert resolve_intensity(ge) == resolve_intensity(philips) == CT_WINDOWS["brain"]
    assert resolve_intensity(ge, head_window="stroke") == CT_WINDOWS["stroke"]
    assert resolve_intensity(philips, "auto") == Window(40, 80)
    assert resolve_intensity(ge, "auto") == Window(35, 85)
    assert resolve_intensity(ge, "bone") == CT_WINDOWS["bone"]

    def chest(ds, i):
        ds.BodyPartExamined = "CHEST"
        del ds.WindowCenter, ds.WindowWidth

    body = read_series(edited(series_files("ct-phantom-philips")[:2], chest))[0]
    assert resolve_intensity(body) == resolve_intensity(body, "auto") == CT_WINDOWS["soft_tissue"]
    assert resolve_intensity(body, body_window="lung") == CT_WINDOWS["lung"]


def test_bad_window_names_fail(ge, mr):
    with pytest.raises(ValueError, match="window 'brian' is unknown"):
        resolve_intensity(ge, "brian")
    with pytest.raises(ValueError, match="CT preset in HU; series .* is MR"):
        resolve_intensity(mr, "brain")
    with pytest.raises(ValueError, match="head_window 'x' is not a CT window preset"):
        resolve_intensity(ge, head_window="x")


def test_ct_unit_images_are_the_window_applied_to_hu(ge):
    images = unit_images(ge, [0, 20])
    assert images.shape == (2, 512, 512) and images.dtype == np.float32
    hu = ge.slices[20].pixels
    np.testing.assert_allclose(images[1], np.clip(hu / 80, 0, 1), atol=1e-6)  # brain 40/80: 0 HU -> 0, 80 HU -> 1
    assert images[1][hu == -1500].max() == 0.0  # PixelPaddingValue stays black


def test_mr_percentiles_are_over_the_whole_series_so_slices_agree(mr):
    assert isinstance(resolve_intensity(mr), Percentiles)
    everything = unit_images(mr)
    assert everything.shape == (40, 512, 460)
    np.testing.assert_array_equal(unit_images(mr, [3, 20]), everything[[3, 20]])
    raw = np.stack([s.pixels for s in mr.slices])
    low, high = Percentiles().limits(mr)
    # integer data: many pixels tie at a percentile, so check from both sides
    assert np.mean(raw < low) <= 0.01 + 1e-4 and np.mean(raw <= low) >= 0.01 - 1e-4
    assert np.mean(raw > high) <= 0.01 + 1e-4 and np.mean(raw >= high) >= 0.01 - 1e-4
    np.testing.assert_allclose(everything, np.clip((raw - low) / (high - low), 0, 1), atol=1e-6)
    # a slice on its own would be scaled differently: the edge slice holds far less bright tissue
    edge = mr.slices[0].pixels
    assert np.percentile(edge, 99) < 0.8 * high
    window = series_window(mr)
    assert window.width == pytest.approx(382.0) and window.center == pytest.approx(202.0)


def test_monochrome1_mr_gives_the_inverted_unit_image(mr, edited):
    files = series_files("mr-t1-brain-uih")[:4]

    def mono1(ds, i):
        ds.PhotometricInterpretation = "MONOCHROME1"

    plain = unit_images(read_series(files)[0])
    inverted = unit_images(read_series(edited(files, mono1))[0])
    np.testing.assert_allclose(inverted, 1 - plain, atol=1e-5)


def test_indices_are_checked(ge):
    with pytest.raises(IndexError, match="slice index 28 is out of range for a series of 28 slices"):
        unit_images(ge, [28])
