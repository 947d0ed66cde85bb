import numpy as np
import pytest

from dicom_io.key_slices import KeySlices, KeySliceSpec, foreground_areas, select_key_slices


def test_central_takes_the_middle_neighbours(ge, mr):
    assert select_key_slices(ge, KeySliceSpec("central", 3)).indices == (13, 14, 15)
    assert select_key_slices(mr, KeySliceSpec("central", 4)).indices == (18, 19, 20, 21)
    assert select_key_slices(mr, KeySliceSpec("central", 1)).indices == (20,)


def test_uniform_spaces_slices_in_mm_along_the_normal_inside_the_margins(ge):
    chosen = select_key_slices(ge, KeySliceSpec("uniform", 3))
    low, high = ge.positions[0], ge.positions[-1]
    targets = [low + f * (high - low) for f in (0.1, 0.5, 0.9)]
    largest_gap = max(ge.gaps_mm)
    assert all(abs(p - t) <= largest_gap / 2 for p, t in zip(chosen.positions, targets, strict=True))
    # spacing changes from 4 to 7 mm half way: the middle in mm is slice 17, not the middle index 13/14
    assert chosen.indices == (4, 17, 25)
    one = select_key_slices(ge, KeySliceSpec("uniform", 1))
    assert one.indices == (17,)
    for margin in (0.1, 0.3):
        spread = select_key_slices(ge, KeySliceSpec("uniform", 5, margin=margin))
        inset = margin * (high - low) - largest_gap / 2
        assert min(spread.positions) >= low + inset and max(spread.positions) <= high - inset


def test_uniform_references_the_chosen_instances(mr):
    chosen = select_key_slices(mr, "uniform")
    assert len(chosen) == 3 and chosen.frames == (None, None, None)
    assert chosen.sop_instance_uids == tuple(mr.slices[i].sop_instance_uid for i in chosen.indices)
    assert len(set(chosen.sop_instance_uids)) == 3


def test_content_picks_large_foreground_slices_spread_out(mr):
    areas = foreground_areas(mr)
    assert areas.shape == (40,) and 0 < areas.min() < 0.5 * areas.max()  # edge slices hold little head
    chosen = select_key_slices(mr, KeySliceSpec("content", 3, content_fraction=0.8))
    assert all(areas[i] >= 0.8 * areas.max() for i in chosen.indices)
    assert min(np.diff(chosen.indices)) >= 5  # spread, not the three largest neighbours
    assert select_key_slices(mr, KeySliceSpec("content", 40)).indices == tuple(range(40))


def test_content_on_ct_uses_body_hu(ge):
    areas = foreground_areas(ge)
    hu = ge.slices[0].pixels
    assert areas[0] == pytest.approx(np.mean(hu > -500))
    chosen = select_key_slices(ge, KeySliceSpec("content", 4))
    assert all(areas[i] >= 0.5 * areas.max() for i in chosen.indices) and len(chosen) == 4


def test_more_slices_than_the_series_has_gives_them_all(ge):
    for strategy in ("central", "uniform", "content"):
        assert select_key_slices(ge, KeySliceSpec(strategy, 99)).indices == tuple(range(28))


def test_spec_validates_its_fields():
    with pytest.raises(ValueError, match=r"KeySliceSpec.n must be an integer >= 1, got 0"):
        KeySliceSpec(n=0)
    with pytest.raises(ValueError, match="KeySliceSpec.n must be an integer"):
        KeySliceSpec(n=2.5)
    with pytest.raises(ValueError, match="KeySliceSpec.strategy must be one of"):
        KeySliceSpec("random")
    with pytest.raises(ValueError, match="KeySliceSpec.margin"):
        KeySliceSpec(margin=0.5)
    with pytest.raises(ValueError, match="KeySlices.indices must be increasing"):
        KeySlices((2, 1), ("a", "b"), (None, None), (0.0, 1.0))
