"""Each image encoder's own input transform, from the same unit-range image.

Every view (``dicom_io/image_views.py``) starts from the raw [0, 1] image. The official MSMedCap code fed SAM a CLIP-normalised
tensor through ``ToPILImage``, where values outside [0, 1] wrap modulo 256; :func:`sam_input`
refuses anything that is not a [0, 1] image, so that path cannot be rebuilt by accident.
No flips anywhere: left and right are findings in medical images.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

#: OpenAI CLIP normalisation (also EVA-CLIP / BLIP-2 ``blip_image_eval``).
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
#: SAM ``pixel_mean`` / ``pixel_std`` on the 0–255 scale (ImageNet statistics).
SAM_PIXEL_MEAN: tuple[float, float, float] = (123.675, 116.28, 103.53)
SAM_PIXEL_STD: tuple[float, float, float] = (58.395, 57.12, 57.375)
#: ImageNet statistics on the [0, 1] scale (torchvision, timm and most CNN checkpoints).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

_RANGE_TOLERANCE = 1e-4  # float32 round-off from windowing may step just outside [0, 1]


def clip_input(image01: np.ndarray, size: int = 224) -> np.ndarray:
    """The (3, size, size) float32 CLIP input: bicubic resize of the whole image, clip to [0, 1], normalise.

    The image is resized to a square without cropping (as LAVIS ``blip_image_eval`` does), in float
    ("F" mode per channel) so no 8-bit quantisation happens. Bicubic overshoot is clipped away.
    """
    return square_input(image01, size, CLIP_MEAN, CLIP_STD, caller="clip_input")


def square_input(
    image01: np.ndarray,
    size: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    *,
    caller: str = "square_input",
) -> np.ndarray:
    """As :func:`clip_input`, with any per-channel ``mean`` / ``std`` on the [0, 1] scale."""
    channels = _unit_channels(image01, caller)
    _check_size(size, "size")
    out = np.empty((3, size, size), dtype=np.float32)
    resized = [np.clip(_resize(c, (size, size), Image.Resampling.BICUBIC), 0.0, 1.0) for c in channels]
    for k in range(3):
        out[k] = (resized[k % len(resized)] - np.float32(mean[k])) / np.float32(std[k])
    return out


def sam_input(image01: np.ndarray, longest: int = 1024) -> tuple[np.ndarray, tuple[int, int]]:
    """The (3, longest, longest) float32 SAM input and the (height, width) of the image before padding.

    As SAM's own preprocessing: scale to 0–255, bilinear resize so the longest side is ``longest``
    (aspect kept), normalise with SAM's pixel mean/std, then pad bottom and right with zeros.
    Resizing is done in float, so the result differs from ``SamImageProcessor`` (uint8) by about one
    grey level at most.
    """
    channels = _unit_channels(image01, "sam_input")
    _check_size(longest, "longest")
    height, width = channels[0].shape
    scale = longest / max(height, width)
    new_h, new_w = int(height * scale + 0.5), int(width * scale + 0.5)  # SAM's ResizeLongestSide rounding
    out = np.zeros((3, longest, longest), dtype=np.float32)
    resized = [_resize(c * np.float32(255), (new_h, new_w), Image.Resampling.BILINEAR) for c in channels]
    for k in range(3):
        out[k, :new_h, :new_w] = (resized[k % len(resized)] - np.float32(SAM_PIXEL_MEAN[k])) / np.float32(SAM_PIXEL_STD[k])
    return out, (new_h, new_w)


def _unit_channels(image01: np.ndarray, caller: str) -> list[np.ndarray]:
    """A (H, W) or (H, W, 3) [0, 1] image as 1 or 3 float32 (H, W) planes (grayscale is resized once)."""
    image = np.asarray(image01)
    if image.ndim == 2:
        planes = [image]
    elif image.ndim == 3 and image.shape[2] == 3:
        planes = [image[:, :, k] for k in range(3)]
    else:
        raise ValueError(f"{caller}: image01 must be (H, W) or (H, W, 3), got shape {image.shape}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"{caller}: image01 is empty, shape {image.shape}")
    if not np.issubdtype(image.dtype, np.floating):
        raise ValueError(f"{caller}: image01 must be a float image in [0, 1], got dtype {image.dtype}")
    low, high = float(np.min(image)), float(np.max(image))
    if not (np.isfinite(low) and np.isfinite(high)) or low < -_RANGE_TOLERANCE or high > 1 + _RANGE_TOLERANCE:
        raise ValueError(f"{caller}: image01 must lie in [0, 1] (a raw unit image, not a normalised tensor), got [{low:.4g}, {high:.4g}]")
    return [np.clip(p, 0.0, 1.0).astype(np.float32, copy=False) for p in planes]


def _check_size(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _resize(plane: np.ndarray, size_hw: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    image = Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32))  # mode "F": 32-bit float, no quantisation
    return np.asarray(image.resize((size_hw[1], size_hw[0]), resample), dtype=np.float32)
