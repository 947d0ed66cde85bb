"""From DICOM files to the image views a captioner reads, one :class:`SeriesInput` per series."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

from dicom_io.image_views import ImageView, check_views, view_array
from dicom_io.intensity import Intensity, Window, series_window
from dicom_io.key_slices import DEFAULT_KEY_SLICES, KeySlices, KeySliceSpec, Strategy, select_key_slices
from dicom_io.series import PathLike, Series, load_series

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SeriesInput:
    """Model-ready arrays for the key slices of one series, with the references an SR needs."""

    series_uid: str
    study_uid: str
    modality: str
    key_slices: KeySlices
    window: Window  # the intensity mapping actually used, in modality units (for the audit trail)
    views: Mapping[str, np.ndarray]  # view name -> (N, 3, S, S) float32, as its ImageView says
    content_sizes: Mapping[str, tuple[tuple[int, int], ...]]  # view name -> (h, w) of each image inside its square (padded views)
    series: Series  # what it was prepared from: its instances and header are the SR's evidence, no second read

    def __post_init__(self) -> None:
        n = len(self.key_slices)
        if not self.views:
            raise ValueError("SeriesInput.views: at least one view is needed")
        for name, array in self.views.items():
            if (
                not isinstance(array, np.ndarray)
                or array.dtype != np.float32
                or array.ndim != 4
                or array.shape[0] != n
                or array.shape[1] != 3
                or array.shape[2] != array.shape[3]
            ):
                got = f"{array.dtype} {array.shape}" if isinstance(array, np.ndarray) else type(array).__name__
                raise ValueError(f"SeriesInput.views[{name!r}] must be float32 ({n}, 3, S, S), got {got}")
        if set(self.content_sizes) != set(self.views):
            raise ValueError(f"SeriesInput.content_sizes has views {sorted(self.content_sizes)}, the arrays {sorted(self.views)}")
        for name, sizes in self.content_sizes.items():
            if len(sizes) != n:
                raise ValueError(f"SeriesInput.content_sizes[{name!r}] has {len(sizes)} entries for {n} key slices")
        # read-only: one SeriesInput may be read by several threads (the batcher)
        object.__setattr__(self, "views", MappingProxyType(dict(self.views)))
        object.__setattr__(self, "content_sizes", MappingProxyType(dict(self.content_sizes)))

    @property
    def sop_instance_uids(self) -> tuple[str, ...]:
        return self.key_slices.sop_instance_uids


def prepare(
    series: Series,
    *,
    views: Sequence[ImageView],
    key_slices: KeySliceSpec | Strategy = DEFAULT_KEY_SLICES,
    window: str | Intensity | None = None,
) -> SeriesInput:
    """Key slices of one series as the ``views`` a captioner reads (``Captioner.views``), each from the unit image.

    ``window`` is as for :func:`dicom_io.intensity.resolve_intensity` (None: modality default).
    Only the key slices are decoded, except where percentiles or content selection need them all.
    """
    wanted = check_views(views)
    chosen = select_key_slices(series, key_slices)
    mapping = series_window(series, window)
    arrays = {v.name: np.empty((len(chosen), 3, v.size, v.size), dtype=np.float32) for v in wanted}
    sizes: dict[str, list[tuple[int, int]]] = {v.name: [] for v in wanted}
    for k, index in enumerate(chosen.indices):
        image = mapping.apply(series.slices[index].pixels)
        for view in wanted:
            arrays[view.name][k], content = view_array(view, image)  # from the unit image, never from another view
            sizes[view.name].append(content)
    return SeriesInput(
        series.series_uid,
        series.study_uid,
        series.modality,
        chosen,
        mapping,
        arrays,
        {name: tuple(s) for name, s in sizes.items()},
        series,
    )


def prepare_series(
    paths: PathLike | Iterable[PathLike],
    *,
    views: Sequence[ImageView],
    key_slices: KeySliceSpec | Strategy = DEFAULT_KEY_SLICES,
    window: str | Intensity | None = None,
) -> list[SeriesInput]:
    """Load every CT/MR series in ``paths`` (files or folders) and prepare each with :func:`prepare`.

    Files that are not CT/MR images are logged and left out. About 4·N·3·ΣS² bytes per series
    (N=3, CLIP 224 and SAM 1024: 38 MB).
    """
    wanted = check_views(views)  # before any file is read
    loaded = load_series(paths)
    for skipped in loaded.skipped:
        log.info("not captioned: %s: %s", skipped.path, skipped.reason)
    return [prepare(s, views=wanted, key_slices=key_slices, window=window) for s in loaded.series]
