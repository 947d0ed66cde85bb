"""From DICOM files to the captioner's two image inputs, one :class:`SeriesInput` per series."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from dicom_io.intensity import Intensity, Window, series_window
from dicom_io.key_slices import DEFAULT_KEY_SLICES, KeySlices, KeySliceSpec, Strategy, select_key_slices
from dicom_io.series import PathLike, Series, load_series
from dicom_io.transforms import clip_input, sam_input

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SeriesInput:
    """Model-ready arrays for the key slices of one series, with the references an SR needs."""

    series_uid: str
    study_uid: str
    modality: str
    key_slices: KeySlices
    window: Window  # the intensity mapping actually used, in modality units (for the audit trail)
    clip: np.ndarray  # (N, 3, S, S) float32, CLIP-normalised; (N, 3, 0, 0) when the model reads no CLIP view
    sam: np.ndarray  # (N, 3, L, L) float32, SAM-normalised and zero-padded; (N, 3, 0, 0) when not read
    sam_sizes: tuple[tuple[int, int], ...]  # (h, w) of each SAM image before padding ((0, 0) when not read)
    series: Series  # what it was prepared from: its instances and header are the SR's evidence, no second read

    def __post_init__(self) -> None:
        n = len(self.key_slices)
        for name in ("clip", "sam"):
            array = getattr(self, name)
            if (
                array.dtype != np.float32
                or array.ndim != 4
                or array.shape[0] != n
                or array.shape[1] != 3
                or array.shape[2] != array.shape[3]
            ):
                raise ValueError(f"SeriesInput.{name} must be float32 ({n}, 3, S, S), got {array.dtype} {array.shape}")
        if len(self.sam_sizes) != n:
            raise ValueError(f"SeriesInput.sam_sizes has {len(self.sam_sizes)} entries for {n} key slices")

    @property
    def sop_instance_uids(self) -> tuple[str, ...]:
        return self.key_slices.sop_instance_uids


def prepare(
    series: Series,
    *,
    key_slices: KeySliceSpec | Strategy = DEFAULT_KEY_SLICES,
    window: str | Intensity | None = None,
    clip_size: int | None = 224,
    sam_size: int | None = 1024,
) -> SeriesInput:
    """Key slices of one series as CLIP and SAM inputs (a size of None: the model does not read that view).

    ``window`` is as for :func:`dicom_io.intensity.resolve_intensity` (None: modality default).
    Only the key slices are decoded, except where percentiles or content selection need them all.
    """
    for name, size in (("clip_size", clip_size), ("sam_size", sam_size)):
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"{name} must be a positive integer or None, got {size!r}")
    if clip_size is None and sam_size is None:
        raise ValueError("clip_size, sam_size: at least one view is needed")
    chosen = select_key_slices(series, key_slices)
    mapping = series_window(series, window)
    clip = np.empty((len(chosen), 3, clip_size or 0, clip_size or 0), dtype=np.float32)
    sam = np.empty((len(chosen), 3, sam_size or 0, sam_size or 0), dtype=np.float32)
    sizes: list[tuple[int, int]] = []
    for k, index in enumerate(chosen.indices):
        image = mapping.apply(series.slices[index].pixels)
        if clip_size:
            clip[k] = clip_input(image, clip_size)
        resized = (0, 0)
        if sam_size:
            sam[k], resized = sam_input(image, sam_size)  # from the unit image, never from the CLIP tensor
        sizes.append(resized)
    return SeriesInput(series.series_uid, series.study_uid, series.modality, chosen, mapping, clip, sam, tuple(sizes), series)


def prepare_series(
    paths: PathLike | Iterable[PathLike],
    *,
    key_slices: KeySliceSpec | Strategy = DEFAULT_KEY_SLICES,
    window: str | Intensity | None = None,
    clip_size: int | None = 224,
    sam_size: int | None = 1024,
) -> list[SeriesInput]:
    """Load every CT/MR series in ``paths`` (files or folders) and prepare each with :func:`prepare`.

    Files that are not CT/MR images are logged and left out. About 4·N·3·(S² + L²) bytes per
    series (N=3, S=224, L=1024: 38 MB).
    """
    loaded = load_series(paths)
    for skipped in loaded.skipped:
        log.info("not captioned: %s: %s", skipped.path, skipped.reason)
    return [prepare(s, key_slices=key_slices, window=window, clip_size=clip_size, sam_size=sam_size) for s in loaded.series]
