"""Deterministic CT/MR-like slices with templated captions: a benchmark for small local findings.

Each slice shows a global scene (modality, body region, imaging plane) and at most one small
lesion (side, size, density). Captions name all of it, e.g. "axial ct of the head. small
hyperdense lesion in the left hemisphere." A coarse global encoder can get the first sentence
right and still miss the lesion; that gap is what MSMedCap's second (SAM) encoder is meant to close.

Side convention (radiological display):

* axial and coronal slices: "left"/"right" are the **patient's** sides, and the patient's right is
  shown on the **image left**. A "right" lesion lies wholly in the left half of the image.
* sagittal slices cannot show laterality, so the side is "anterior" (image left, the face side)
  or "posterior" (image right).

Sizes are radii scaled to the slice: small 3–4 px, large 7–9 px at 128 px. Density words depend on
the modality: CT "hyperdense"/"hypodense", MR "hyperintense"/"hypointense".

The same seed gives byte-identical images and ``captions.jsonl``. Anatomy, texture and noise come
from one random stream and the lesion from another, so a slice rendered with and without its
lesion differs only inside the lesion disc.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image

from models.captions import match_terms

__all__ = [
    "DENSITIES",
    "DETAIL_WORDS",
    "GLOBAL_WORDS",
    "MODALITIES",
    "PLANES",
    "REGIONS",
    "SIDES",
    "SIZES",
    "SliceAttributes",
    "SyntheticSlice",
    "caption_for",
    "generate_dataset",
    "image_half",
    "parse_caption",
    "render_slice",
    "sample_attributes",
]

MODALITIES: tuple[str, ...] = ("ct", "mr")
REGIONS: tuple[str, ...] = ("head", "chest", "abdomen")
PLANES: tuple[str, ...] = ("axial", "coronal", "sagittal")
SIZES: tuple[str, ...] = ("small", "large")
SIDES: dict[str, tuple[str, str]] = {
    # plane → (side shown on the image left, side shown on the image right)
    "axial": ("right", "left"),
    "coronal": ("right", "left"),
    "sagittal": ("anterior", "posterior"),
}
DENSITIES: dict[str, tuple[str, str]] = {"ct": ("hyperdense", "hypodense"), "mr": ("hyperintense", "hypointense")}

DETAIL_WORDS: dict[str, tuple[str, ...]] = {
    "presence": ("no focal lesion", "lesion"),
    "side": ("left", "right", "anterior", "posterior"),
    "size": SIZES,
    "density": ("hyperdense", "hypodense", "hyperintense", "hypointense"),
}
"""Local-finding vocabulary, grouped by attribute (input to `models.caption_metrics.detail_word_scores`)."""

GLOBAL_WORDS: dict[str, tuple[str, ...]] = {"modality": MODALITIES, "region": REGIONS, "plane": PLANES}

T = TypeVar("T")

_LOCATION = {"head": "hemisphere", "chest": "lung", "abdomen": "abdomen"}
_SMALL_RADIUS, _LARGE_RADIUS = (3.0, 4.0), (7.0, 9.0)  # px at 128 px


@dataclass(frozen=True)
class SliceAttributes:
    """Ground truth of one slice; ``side``/``size``/``density`` are None when there is no lesion."""

    modality: str
    region: str
    plane: str
    lesion: bool
    side: str | None = None
    size: str | None = None
    density: str | None = None

    def __post_init__(self) -> None:
        for name, allowed in (("modality", MODALITIES), ("region", REGIONS), ("plane", PLANES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"SliceAttributes.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not self.lesion:
            for name in ("side", "size", "density"):
                if getattr(self, name) is not None:
                    raise ValueError(f"SliceAttributes.{name} must be None without a lesion, got {getattr(self, name)!r}")
            return
        checks = (("side", SIDES[self.plane]), ("size", SIZES), ("density", DENSITIES[self.modality]))
        for name, allowed in checks:
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"SliceAttributes.{name} must be one of {allowed} for a {self.plane} {self.modality} lesion, got {getattr(self, name)!r}"
                )

    def as_dict(self) -> dict[str, str | bool | None]:
        return asdict(self)

    def without_lesion(self) -> SliceAttributes:
        return replace(self, lesion=False, side=None, size=None, density=None)


def image_half(attributes: SliceAttributes) -> str | None:
    """``"left"``/``"right"`` half of the image that holds the lesion (see the side convention)."""
    if not attributes.lesion:
        return None
    return "left" if attributes.side == SIDES[attributes.plane][0] else "right"


def caption_for(attributes: SliceAttributes) -> str:
    """The templated caption: a global sentence, then the finding sentence."""
    a = attributes
    scene = f"{a.plane} {a.modality} of the {a.region}."
    if not a.lesion:
        return f"{scene} no focal lesion."
    location = "brain" if a.region == "head" and a.plane == "sagittal" else _LOCATION[a.region]
    return f"{scene} {a.size} {a.density} lesion in the {a.side} {location}."


def parse_caption(text: str) -> dict[str, str | bool | None]:
    """Read the attributes back from a caption (a model's or a reference).

    Each field is the single value the text names, or None when it names none or several
    (e.g. both "left" and "right"). Keys match `SliceAttributes.as_dict`.
    """

    def single(terms: Sequence[str]) -> str | None:
        found = set(match_terms(text, terms))
        return found.pop() if len(found) == 1 else None

    presence = set(match_terms(text, DETAIL_WORDS["presence"]))
    lesion = None if len(presence) != 1 else presence == {"lesion"}
    return {
        "modality": single(MODALITIES),
        "region": single(REGIONS),
        "plane": single(PLANES),
        "lesion": lesion,
        "side": single(DETAIL_WORDS["side"]),
        "size": single(SIZES),
        "density": single(DETAIL_WORDS["density"]),
    }


# -- sampling -----------------------------------------------------------------------------------


def _balanced(rng: np.random.Generator, values: Sequence[T], n: int) -> list[T]:
    """``n`` values in shuffled blocks that each hold every value once: counts differ by at most one."""
    out: list[T] = []
    while len(out) < n:
        out.extend(values[int(i)] for i in rng.permutation(len(values)))
    return out[:n]


def sample_attributes(n: int, rng: np.random.Generator) -> list[SliceAttributes]:
    """``n`` attribute sets, each attribute balanced on its own (lesion attributes among lesions)."""
    modality = _balanced(rng, MODALITIES, n)
    region = _balanced(rng, REGIONS, n)
    plane = _balanced(rng, PLANES, n)
    lesion = _balanced(rng, (True, False), n)
    k = sum(lesion)
    half = iter(_balanced(rng, (0, 1), k))
    size = iter(_balanced(rng, SIZES, k))
    bright = iter(_balanced(rng, (0, 1), k))
    out: list[SliceAttributes] = []
    for m, r, p, has_lesion in zip(modality, region, plane, lesion, strict=True):
        if has_lesion:
            out.append(SliceAttributes(m, r, p, True, SIDES[p][next(half)], next(size), DENSITIES[m][next(bright)]))
        else:
            out.append(SliceAttributes(m, r, p, False))
    return out


# -- rendering ----------------------------------------------------------------------------------

# Tissue intensities in [0, 1]: CT as a soft-tissue window, MR as a T2-like contrast. Lung is kept
# mid-dark (as in a lung window) so that a hypodense/hypointense lung lesion is still visible.
_TISSUE: dict[str, dict[str, float]] = {
    "ct": {
        "air": 0.02,
        "fat": 0.28,
        "muscle": 0.50,
        "brain": 0.45,
        "csf": 0.30,
        "bone": 0.95,
        "marrow": 0.80,
        "lung": 0.24,
        "blood": 0.58,
        "liver": 0.55,
        "spleen": 0.52,
        "kidney": 0.62,
        "bowel": 0.48,
    },
    "mr": {
        "air": 0.03,
        "fat": 0.80,
        "muscle": 0.32,
        "brain": 0.50,
        "csf": 0.92,
        "bone": 0.06,
        "marrow": 0.55,
        "lung": 0.24,
        "blood": 0.12,
        "liver": 0.30,
        "spleen": 0.55,
        "kidney": 0.60,
        "bowel": 0.45,
    },
}


class _Canvas:
    """Normalised coordinates (image spans [-1, 1], image left is u < 0) with per-slice jitter.

    ``host`` marks where a lesion may go: pixels fully inside a shape painted with ``host=True``
    and untouched by any non-host shape painted after it.
    """

    def __init__(self, size: int, rng: np.random.Generator, modality: str) -> None:
        self.size = size
        scale = rng.uniform(0.92, 1.04)
        du, dv = rng.uniform(-0.04, 0.04, size=2)
        centres = (np.arange(size) + 0.5 - size / 2) / (size / 2)
        v, u = np.meshgrid(centres, centres, indexing="ij")
        self.u, self.v = (u - du) / scale, (v - dv) / scale
        self.px = size / 2 * scale  # pixels per shape unit
        gain = 1 + rng.normal(0, 0.03)
        self.tissue = {k: float(np.clip(val * gain, 0, 1)) for k, val in _TISSUE[modality].items()}
        self.image = np.full((size, size), self.tissue["air"], dtype=np.float64)
        self.host = np.zeros((size, size), dtype=bool)

    def shape(self, cx: float, cy: float, a: float, b: float, power: float = 2.0) -> np.ndarray:
        """Soft mask (about 1 px edge) of a superellipse; ``power`` 2 is an ellipse."""
        f = (np.abs((self.u - cx) / a) ** power + np.abs((self.v - cy) / b) ** power) ** (1 / power)
        return np.clip(0.5 - (f - 1) * min(a, b) * self.px, 0.0, 1.0)

    def paint(self, mask: np.ndarray, tissue: str, *, host: bool = False) -> np.ndarray:
        self.image = self.image * (1 - mask) + self.tissue[tissue] * mask
        if host:  # the edge of a host shape drawn over host tissue stays host
            self.host |= mask > 0.99
        else:
            self.host &= mask < 0.01
        return mask


def _smooth_field(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in about [-1, 1]: a random ``cells``² grid, bilinearly upsampled."""
    grid = rng.normal(0, 1, size=(cells + 1, cells + 1))
    pos = np.linspace(0, cells, size)
    i = np.minimum(pos.astype(int), cells - 1)
    t = pos - i
    rows = grid[i] * (1 - t)[:, None] + grid[i + 1] * t[:, None]
    return rows[:, i] * (1 - t)[None, :] + rows[:, i + 1] * t[None, :]


def _head(c: _Canvas, plane: str, rng: np.random.Generator) -> np.ndarray:
    if plane == "axial":
        cx, cy, a, b = 0.0, 0.0, 0.62, 0.78
    elif plane == "coronal":
        cx, cy, a, b = 0.0, -0.12, 0.64, 0.68
        c.paint(c.shape(0.0, 0.72, 0.30, 0.32, 3.0), "muscle")  # neck
    else:
        cx, cy, a, b = 0.05, -0.12, 0.72, 0.62
        c.paint(c.shape(-0.58, 0.22, 0.22, 0.30), "muscle")  # face
        c.paint(c.shape(0.22, 0.70, 0.28, 0.32, 3.0), "muscle")  # neck
    c.paint(c.shape(cx, cy, a, b), "fat")  # scalp
    c.paint(c.shape(cx, cy, a - 0.05, b - 0.05), "bone")  # skull
    brain = c.paint(c.shape(cx, cy, a - 0.10, b - 0.10), "brain", host=True)
    c.image += brain * 0.05 * _smooth_field(rng, c.size, 6)  # grey/white matter mottling
    if plane == "sagittal":
        c.paint(c.shape(cx, cy - 0.02, 0.26, 0.06), "csf")  # lateral ventricle
        c.image += c.shape(cx + 0.36, cy + 0.30, 0.20, 0.12) * 0.06  # cerebellum
    else:
        for s in (-1, 1):  # lateral ventricles
            c.paint(c.shape(cx + s * 0.09, cy - 0.04, 0.05, 0.20 if plane == "axial" else 0.12), "csf")
    return c.host


def _chest(c: _Canvas, plane: str, rng: np.random.Generator) -> np.ndarray:
    if plane == "axial":
        c.paint(c.shape(0.0, 0.05, 0.88, 0.60, 2.5), "fat")
        c.paint(c.shape(0.0, 0.05, 0.82, 0.54, 2.5), "muscle")
        lungs = [c.paint(c.shape(s * 0.42, 0.0, 0.30, 0.42), "lung", host=True) for s in (-1, 1)]
        c.paint(c.shape(0.12, -0.10, 0.22, 0.20), "blood")  # heart
        c.paint(c.shape(0.08, 0.24, 0.07, 0.07), "blood")  # aorta
        c.paint(c.shape(0.0, 0.42, 0.10, 0.10), "bone")  # vertebra
        c.paint(c.shape(0.0, -0.46, 0.08, 0.04), "bone")  # sternum
    elif plane == "coronal":
        c.paint(c.shape(0.0, 0.05, 0.80, 0.92, 3.0), "fat")
        c.paint(c.shape(0.0, 0.05, 0.74, 0.86, 3.0), "muscle")
        lungs = [c.paint(c.shape(s * 0.38, -0.15, 0.28, 0.55), "lung", host=True) for s in (-1, 1)]
        c.paint(c.shape(-0.30, 0.72, 0.45, 0.22), "liver")
        c.paint(c.shape(0.10, 0.25, 0.28, 0.22), "blood")  # heart
        c.paint(c.shape(0.0, -0.62, 0.04, 0.28), "air")  # trachea
    else:
        c.paint(c.shape(0.0, 0.05, 0.62, 0.92, 3.0), "fat")
        c.paint(c.shape(0.0, 0.05, 0.56, 0.86, 3.0), "muscle")
        lungs = [c.paint(c.shape(0.02, -0.10, 0.44, 0.58), "lung", host=True)]
        c.paint(c.shape(-0.22, 0.22, 0.25, 0.22), "blood")  # heart
        for k in range(7):  # vertebral bodies, posterior
            c.paint(c.shape(0.50, -0.72 + 0.24 * k, 0.07, 0.09, 3.0), "bone")
        c.paint(c.shape(-0.50, -0.15, 0.03, 0.40), "bone")  # sternum
    c.image += 0.03 * _smooth_field(rng, c.size, 8) * np.maximum.reduce(lungs)  # vessels, roughly
    return c.host


def _abdomen(c: _Canvas, plane: str, rng: np.random.Generator) -> np.ndarray:
    if plane == "axial":
        c.paint(c.shape(0.0, 0.05, 0.86, 0.62, 2.2), "fat")
        inner = c.paint(c.shape(0.0, 0.05, 0.78, 0.54, 2.2), "bowel", host=True)
        c.paint(c.shape(-0.36, -0.05, 0.38, 0.36), "liver", host=True)
        c.paint(c.shape(0.52, 0.02, 0.15, 0.22), "spleen", host=True)
        for s in (-1, 1):
            c.paint(c.shape(s * 0.32, 0.30, 0.11, 0.15), "kidney")
        c.paint(c.shape(0.0, 0.40, 0.10, 0.10), "bone")  # vertebra
        c.paint(c.shape(0.06, 0.22, 0.05, 0.05), "blood")  # aorta
        gas_box = (-0.25, 0.35, -0.40, -0.25)
        core = c.shape(0.0, 0.05, 0.66, 0.44, 2.2)
    elif plane == "coronal":
        c.paint(c.shape(0.0, 0.0, 0.80, 0.92, 3.0), "fat")
        inner = c.paint(c.shape(0.0, 0.0, 0.72, 0.84, 3.0), "bowel", host=True)
        c.paint(c.shape(-0.30, -0.50, 0.42, 0.30), "liver", host=True)
        c.paint(c.shape(0.45, -0.48, 0.18, 0.20), "spleen", host=True)
        for s in (-1, 1):
            c.paint(c.shape(s * 0.34, 0.0, 0.11, 0.20), "kidney")
        c.paint(c.shape(0.0, 0.05, 0.07, 0.75, 3.0), "bone")  # spine
        gas_box = (-0.50, 0.50, 0.30, 0.70)
        core = c.shape(0.0, 0.0, 0.62, 0.74, 3.0)
    else:
        c.paint(c.shape(0.0, 0.0, 0.76, 0.92, 3.0), "fat")
        inner = c.paint(c.shape(0.0, 0.0, 0.70, 0.86, 3.0), "bowel", host=True)
        c.paint(c.shape(-0.15, -0.50, 0.40, 0.28), "liver", host=True)
        for k in range(7):  # vertebral bodies, posterior
            c.paint(c.shape(0.58, -0.72 + 0.24 * k, 0.08, 0.09, 3.0), "bone")
        c.paint(c.shape(0.45, 0.05, 0.035, 0.70, 3.0), "blood")  # aorta
        gas_box = (-0.50, 0.05, 0.10, 0.65)
        core = c.shape(0.0, 0.0, 0.62, 0.76, 3.0)
    c.image += 0.04 * _smooth_field(rng, c.size, 10) * inner  # bowel texture
    u0, u1, v0, v1 = gas_box
    for _ in range(int(rng.integers(2, 5))):  # bowel gas
        c.paint(c.shape(rng.uniform(u0, u1), rng.uniform(v0, v1), 0.045, 0.035), "air")
    return c.host & (core > 0.99)  # keep lesions off the abdominal wall


_REGION: dict[str, Callable[[_Canvas, str, np.random.Generator], np.ndarray]] = {"head": _head, "chest": _chest, "abdomen": _abdomen}


@dataclass(frozen=True, eq=False)
class SyntheticSlice:
    image: np.ndarray  # float32 (size, size) in [0, 1]
    attributes: SliceAttributes
    lesion_mask: np.ndarray  # float32 (size, size): lesion weight per pixel, all zero without a lesion
    lesion_center: tuple[float, float] | None  # (row, column) in pixels
    lesion_radius: float | None  # pixels


def render_slice(attributes: SliceAttributes, *, size: int = 128, seed: int | Sequence[int] = 0) -> SyntheticSlice:
    """Draw one slice. The lesion is added to the noise-free anatomy, wholly inside the host organ
    (brain, lung, abdominal soft tissue) and wholly inside its image half."""
    if size < 64:
        raise ValueError(f"size must be at least 64 px, got {size}")
    key = [int(s) for s in seed] if isinstance(seed, Sequence) else [int(seed)]
    anatomy_rng = np.random.default_rng([*key, 0])
    canvas = _Canvas(size, anatomy_rng, attributes.modality)
    host = _REGION[attributes.region](canvas, attributes.plane, anatomy_rng)
    base = canvas.image
    mask = np.zeros((size, size), dtype=np.float64)
    center: tuple[float, float] | None = None
    radius: float | None = None
    if attributes.lesion:
        mask, center, radius = _place_lesion(attributes, host, size, np.random.default_rng([*key, 1]))
        level = float(np.median(base[mask > 0.5]))
        bright = attributes.density == DENSITIES[attributes.modality][0]
        delta = min(0.30, 0.97 - level) if bright else max(-0.22, 0.02 - level)
        base = base + delta * mask
    if attributes.modality == "ct":
        image = base + anatomy_rng.normal(0, 0.012, size=base.shape)
    else:  # smooth coil bias, then Rician noise
        gy, gx = anatomy_rng.normal(0, 0.08, size=2)
        ramp = np.linspace(-1, 1, size)
        bias = 1 + gy * ramp[:, None] + gx * ramp[None, :]
        noisy = base * bias
        image = np.hypot(noisy + anatomy_rng.normal(0, 0.015, base.shape), anatomy_rng.normal(0, 0.015, base.shape))
    return SyntheticSlice(np.clip(image, 0, 1).astype(np.float32), attributes, mask.astype(np.float32), center, radius)


def _place_lesion(
    attributes: SliceAttributes, host: np.ndarray, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, tuple[float, float], float]:
    low, high = _SMALL_RADIUS if attributes.size == "small" else _LARGE_RADIUS
    radius = float(rng.uniform(low, high)) * size / 128
    reach = int(np.ceil(radius + 1))
    left = image_half(attributes) == "left"
    cols = np.arange(size)
    half_ok = (cols + 0.5 + radius + 1 < size / 2) if left else (cols + 0.5 - radius - 1 > size / 2)
    candidates = np.argwhere(host & half_ok[None, :])
    yy, xx = np.mgrid[-reach : reach + 1, -reach : reach + 1]
    disc = yy**2 + xx**2 <= (radius + 1) ** 2
    for index in rng.permutation(len(candidates))[:500]:
        r, col = candidates[index]
        if (
            reach <= r < size - reach
            and reach <= col < size - reach
            and host[r - reach : r + reach + 1, col - reach : col + reach + 1][disc].all()
        ):
            rows, columns = np.mgrid[0:size, 0:size]
            distance = np.hypot(rows - r, columns - col)
            return np.clip(radius + 0.5 - distance, 0.0, 1.0), (float(r), float(col)), radius
    raise RuntimeError(f"no room for a {attributes.size} lesion in {attributes} at size {size}")


# -- dataset files ------------------------------------------------------------------------------


def generate_dataset(
    out_dir: str | Path,
    n_train: int,
    n_val: int,
    n_test: int,
    size: int = 128,
    seed: int = 0,
    *,
    bit_depth: int = 8,
    overwrite: bool = False,
) -> Path:
    """Write ``images/{split}-{index:05d}.png`` and ``captions.jsonl`` (`read_table` format) under
    ``out_dir``; return the path of ``captions.jsonl``. ``size`` must be at least 64 px.

    Each jsonl row also carries ``attributes`` (the `SliceAttributes` ground truth) and ``lesion``
    (centre and radius in pixels, or null). Splits use separate random streams, so changing
    ``n_test`` leaves the training images unchanged.
    """
    if bit_depth not in (8, 16):
        raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth}")
    if seed < 0 or min(n_train, n_val, n_test) < 0:
        raise ValueError("seed and the split sizes must be non-negative")
    out = Path(out_dir)
    captions_path = out / "captions.jsonl"
    if captions_path.exists() and not overwrite:
        raise FileExistsError(f"{captions_path} exists; pass overwrite=True to regenerate")
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows: list[str] = []
    for split_index, (split, n) in enumerate((("train", n_train), ("validation", n_val), ("test", n_test))):
        for index, attributes in enumerate(sample_attributes(n, np.random.default_rng([seed, split_index, 0]))):
            image_id = f"{split}-{index:05d}"
            rendered = render_slice(attributes, size=size, seed=(seed, split_index, index + 1))
            _write_png(out / "images" / f"{image_id}.png", rendered.image, bit_depth)
            lesion = None
            if rendered.lesion_center is not None and rendered.lesion_radius is not None:
                lesion = {"center_rc": [round(x, 3) for x in rendered.lesion_center], "radius_px": round(rendered.lesion_radius, 3)}
            row = {
                "image": f"images/{image_id}.png",
                "caption": caption_for(attributes),
                "split": split,
                "image_id": image_id,
                "source": "synthetic",
                "attributes": attributes.as_dict(),
                "lesion": lesion,
            }
            rows.append(json.dumps(row))
    meta = {
        "generator": "medcap-synthetic",
        "version": 1,
        "seed": seed,
        "size": size,
        "bit_depth": bit_depth,
        "counts": {"train": n_train, "validation": n_val, "test": n_test},
    }
    (out / "synthetic.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    captions_path.write_text("".join(r + "\n" for r in rows), encoding="utf-8")
    return captions_path


def _write_png(path: Path, image: np.ndarray, bit_depth: int) -> None:
    top = 255 if bit_depth == 8 else 65535
    pixels = np.round(np.clip(image, 0, 1) * top).astype(np.uint8 if bit_depth == 8 else np.uint16)
    Image.fromarray(pixels).save(path, format="PNG")
