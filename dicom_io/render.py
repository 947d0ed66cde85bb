"""Slices for people: one slice of a series as an 8-bit PNG, windowed as a radiologist would see it.

The review page's stack viewer asks for any slice under any window (center/width in the series'
modality units: HU for CT); the key images use the named presets.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from dicom_io.intensity import CT_WINDOWS, Window, series_window, unit_images
from dicom_io.series import Series

# The presets offered to reviewers: CT windows in HU; MR (and anything else) is auto-windowed by
# robust percentiles over the whole series.
VIEW_WINDOWS = ("default", *sorted(CT_WINDOWS), "auto")
# The presets the stack viewer offers for CT (the radiologist's usual six), in this order.
STACK_CT_PRESETS = ("brain", "subdural", "stroke", "bone", "soft_tissue", "lung")


def slice_index(series: Series, sop_instance_uid: str, frame: int | None = None) -> int:
    for i, s in enumerate(series.slices):
        if s.sop_instance_uid == sop_instance_uid and (frame is None or s.frame in (None, frame)):
            return i
    raise KeyError(f"{sop_instance_uid} (frame {frame}) is not a slice of series {series.series_uid}")


def render_png(series: Series, sop_instance_uid: str, *, frame: int | None = None, window: str = "default") -> bytes:
    """The slice as PNG. ``window``: "default" (by modality and body part), a CT preset, or "auto" (the header's)."""
    if window not in VIEW_WINDOWS:
        raise ValueError(f"window {window!r}: choose from {', '.join(VIEW_WINDOWS)}")
    if window in CT_WINDOWS and series.modality != "CT":
        window = "default"  # CT presets are in HU; other modalities are auto-windowed
    (image,) = unit_images(series, [slice_index(series, sop_instance_uid, frame)], None if window == "default" else window)
    return _png(image)


def stack_windows(series: Series) -> dict[str, Window]:
    """The named windows of the stack viewer: "default" first, then the CT presets (CT) or "auto" (robust percentiles)."""
    default = series_window(series)
    if series.modality == "CT":
        return {"default": default, **{name: CT_WINDOWS[name] for name in STACK_CT_PRESETS}}
    # Not CT: the default already is the robust-percentile window (one pass over the series' pixels).
    return {"default": default, "auto": default}


def render_slice(series: Series, index: int, window: Window) -> bytes:
    """Slice ``index`` (0-based, in stack order) under ``window``, as an 8-bit grey PNG."""
    if not 0 <= index < len(series):
        raise IndexError(f"slice {index} is out of range: the series has {len(series)} slices (0-{len(series) - 1})")
    return _png(window.apply(series.slices[index].pixels))


def _png(image: np.ndarray) -> bytes:
    pixels = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    # compress_level 1: a third of the time of the default for ~10 % more bytes, on localhost-to-LAN links
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
