"""Key images for people: one slice of a series as an 8-bit PNG, windowed as a radiologist would see it."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from dicom_io.intensity import CT_WINDOWS, unit_images
from dicom_io.series import Series

# The presets offered to reviewers: CT windows in HU; MR (and anything else) is auto-windowed by
# robust percentiles over the whole series.
VIEW_WINDOWS = ("default", *sorted(CT_WINDOWS), "auto")


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
    pixels = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()
