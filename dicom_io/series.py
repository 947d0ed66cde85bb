"""CT/MR series as ordered 2-D slices in modality units, sorted along the slice normal.

Headers are read up front (pixel data deferred); each slice decodes its pixels when asked, so a
1000-slice series costs only what the caller actually looks at. Single-frame and multi-frame
(Enhanced / Legacy Converted Enhanced, PS3.3 C.7.6.16) instances give the same :class:`Slice`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pydicom
from pydicom import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels.utils import pixel_array
from pydicom.uid import UID

from dicom_io.instance import expected_native_length
from dicom_io.sop_classes import CAPTIONABLE

PathLike = str | os.PathLike[str]
Vector = tuple[float, float, float]

_DEFER = "64 KB"  # leave pixel data on disk while reading headers
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_PIXEL_GROUP = 0x7FE00000  # pixel data of every kind and its offset tables
_PER_FRAME_GROUPS = 0x52009230
# Direction cosines are written with about 7 decimals; a localizer or a second stack differs by far more.
_ORIENTATION_TOLERANCE = 1e-4
# Two slices closer than this along the normal are the same location (echoes, phases, repeats).
_MIN_GAP_MM = 1e-3


class SeriesError(ValueError):
    """Input that cannot become an ordered series; the message names the file or series and the field."""


@dataclass(frozen=True)
class Skipped:
    """A file that was not loaded, and why (not DICOM, not a CT/MR image class, duplicate instance)."""

    path: Path
    reason: str


@dataclass(frozen=True)
class Slice:
    """One 2-D image of a series: a single-frame instance, or one frame of a multi-frame instance."""

    path: Path
    sop_instance_uid: str
    frame: int | None  # 1-based frame number in a multi-frame instance (as an SR references it); None otherwise
    position: float  # mm along the series' slice normal
    image_position: Vector  # ImagePositionPatient of the first transmitted pixel
    rows: int
    columns: int
    rescale_slope: float
    rescale_intercept: float
    invert_sum: int | None  # MONOCHROME1 (non-CT): stored value s becomes invert_sum - s; None: no inversion
    window: tuple[float, float] | None  # the header's first (WindowCenter, WindowWidth), if any
    instance_number: int | None

    def __post_init__(self) -> None:
        if self.frame is not None and self.frame < 1:
            raise ValueError(f"Slice.frame must be >= 1 (DICOM frame numbers are 1-based), got {self.frame}")
        if self.rows < 1 or self.columns < 1:
            raise ValueError(f"Slice.rows/columns must be >= 1, got {self.rows}x{self.columns}")
        if not math.isfinite(self.rescale_slope) or self.rescale_slope == 0:
            raise ValueError(f"Slice.rescale_slope must be finite and non-zero, got {self.rescale_slope}")

    @property
    def pixels(self) -> np.ndarray:
        """The (rows, columns) float32 image in modality units (HU for CT); higher is brighter.

        Decoded from the file on every access (compressed syntaxes via the pylibjpeg plugins):
        keep the result if you need it twice.
        """
        try:
            stored = pixel_array(self.path, index=None if self.frame is None else self.frame - 1)
        except Exception as exc:  # pydicom and its plugins raise many types on bad pixel data
            raise SeriesError(f"{self.path}: cannot decode pixel data{self._frame_text}: {type(exc).__name__}: {exc}") from exc
        if stored.shape != (self.rows, self.columns):
            raise SeriesError(
                f"{self.path}: decoded pixels{self._frame_text} have shape {stored.shape}, Rows/Columns say {(self.rows, self.columns)}"
            )
        values = stored.astype(np.float32)
        if self.invert_sum is not None:
            values = np.float32(self.invert_sum) - values
        if self.rescale_slope != 1 or self.rescale_intercept != 0:
            values = values * np.float32(self.rescale_slope) + np.float32(self.rescale_intercept)
        return values

    @property
    def _frame_text(self) -> str:
        return "" if self.frame is None else f" of frame {self.frame}"


@dataclass(frozen=True)
class Series:
    """The image slices of one SeriesInstanceUID, ordered by position along the slice normal."""

    series_uid: str
    study_uid: str
    modality: str
    sop_class_uid: str
    description: str | None
    series_number: int | None
    body_part: str | None
    slices: tuple[Slice, ...]
    row_cosines: Vector
    column_cosines: Vector
    pixel_spacing: tuple[float, float] | None  # (row spacing, column spacing) in mm
    # The header of one instance (the first read) as :func:`report_header` keeps it: what a report on
    # the series copies (patient, study, equipment), so that writing one needs no second read of the files.
    header: Dataset = dataclasses.field(compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.slices:
            raise ValueError(f"Series.slices is empty for series {self.series_uid}")
        positions = [s.position for s in self.slices]
        if any(b - a < _MIN_GAP_MM for a, b in zip(positions, positions[1:], strict=False)):
            raise ValueError(f"Series.slices of series {self.series_uid} are not in strictly increasing position along the normal")
        if len({(s.rows, s.columns) for s in self.slices}) != 1:
            raise ValueError(f"Series.slices of series {self.series_uid} differ in Rows/Columns")

    def __len__(self) -> int:
        return len(self.slices)

    @property
    def sop_instance_uids(self) -> tuple[str, ...]:
        """Each instance of the series once (a multi-frame instance holds several slices), in slice order."""
        return tuple(dict.fromkeys(s.sop_instance_uid for s in self.slices))

    @property
    def normal(self) -> Vector:
        """Unit slice normal: cross(row direction, column direction), as ImageOrientationPatient defines them."""
        n = np.cross(self.row_cosines, self.column_cosines)
        return _vector(n / np.linalg.norm(n))

    @property
    def positions(self) -> tuple[float, ...]:
        return tuple(s.position for s in self.slices)

    @property
    def gaps_mm(self) -> tuple[float, ...]:
        """Distances between neighbouring slices along the normal, from ImagePositionPatient (not SpacingBetweenSlices)."""
        p = self.positions
        return tuple(b - a for a, b in zip(p, p[1:], strict=False))

    @property
    def spacing_mm(self) -> float | None:
        """Median gap along the normal; None for a single slice. Check :attr:`gaps_mm` when it may vary."""
        gaps = self.gaps_mm
        return statistics.median(gaps) if gaps else None

    @property
    def gantry_tilt_deg(self) -> float | None:
        """Angle in degrees (0–45) between the slice normal and the patient z axis, for axial-ish slices.

        None when the normal is nearer x or y (sagittal/coronal), where a "tilt" means nothing.
        Unsigned: the sign in GantryDetectorTilt depends on vendor convention.
        """
        nz = abs(self.normal[2])
        if nz < math.cos(math.radians(45)):
            return None
        return math.degrees(math.acos(min(1.0, nz)))

    @property
    def window(self) -> tuple[float, float] | None:
        """The header window (center, width) of the central slice, where a series' windows differ per slice."""
        return self.slices[len(self.slices) // 2].window


@dataclass(frozen=True)
class LoadResult:
    series: tuple[Series, ...]
    skipped: tuple[Skipped, ...]


@dataclass(frozen=True)
class _Header:
    """Per-series facts of one instance, compared across the instances of a series."""

    series_uid: str
    study_uid: str
    modality: str
    sop_class_uid: str
    description: str | None
    series_number: int | None
    body_part: str | None
    pixel_spacing: tuple[float, float] | None


@dataclass(frozen=True)
class _Frame:
    header: _Header
    orientation: tuple[float, ...]  # the six ImageOrientationPatient values
    slice: Slice  # position is filled in once the series normal is known


def load_series(source: PathLike | Iterable[PathLike]) -> LoadResult:
    """Read CT/MR image instances from files or folders (searched recursively; names need no extension).

    Non-DICOM files and non-image SOP classes (SR, presentation states, secondary capture, ...) are
    returned in ``skipped`` with a reason. Raises :class:`SeriesError` for no input files, an image
    without pixel data or geometry, or a series that is not one stack (mixed orientations or sizes,
    repeated positions).
    """
    paths = _expand(source)
    if not paths:
        raise SeriesError(f"no input files in {source!r}")
    frames: dict[str, list[_Frame]] = defaultdict(list)
    headers: dict[str, Dataset] = {}  # series UID -> the header of its first instance read
    skipped: list[Skipped] = []
    seen: dict[str, Path] = {}
    for path in paths:
        try:
            ds = pydicom.dcmread(path, defer_size=_DEFER)
        except InvalidDicomError:
            skipped.append(Skipped(path, "not a DICOM Part 10 file"))
            continue
        except Exception as exc:
            raise SeriesError(f"{path}: cannot parse DICOM: {type(exc).__name__}: {exc}") from exc
        sop_class = str(ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID") or "")
        if sop_class not in CAPTIONABLE:
            name = UID(sop_class).name if sop_class else "no SOP Class UID"
            skipped.append(Skipped(path, f"{name}: not a CT/MR image class"))
            continue
        sop_uid = _required_text(ds, "SOPInstanceUID", path)
        if sop_uid in seen:
            skipped.append(Skipped(path, f"duplicate of SOP instance {sop_uid} in {seen[sop_uid]}"))
            continue
        seen[sop_uid] = path
        for frame in _read_frames(ds, path, sop_class, sop_uid):
            frames[frame.header.series_uid].append(frame)
            if frame.header.series_uid not in headers:
                headers[frame.header.series_uid] = report_header(ds)
    built = [_build_series(uid, group, headers[uid]) for uid, group in frames.items()]
    built.sort(key=lambda s: (s.study_uid, s.series_number if s.series_number is not None else math.inf, s.series_uid))
    return LoadResult(tuple(built), tuple(skipped))


def read_series(source: PathLike | Iterable[PathLike]) -> list[Series]:
    """:func:`load_series` without the skipped files."""
    return list(load_series(source).series)


def _expand(source: PathLike | Iterable[PathLike]) -> list[Path]:
    items = [source] if isinstance(source, str | os.PathLike) else list(source)
    paths: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            paths.extend(sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")))
        elif path.is_file():
            paths.append(path)
        else:
            raise SeriesError(f"{path}: no such file or folder")
    return list(dict.fromkeys(paths))  # the same path twice is one file


def _read_frames(ds: Dataset, path: Path, sop_class: str, sop_uid: str) -> list[_Frame]:
    rows, columns = _required_int(ds, "Rows", path), _required_int(ds, "Columns", path)
    _check_pixel_data(ds, path)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise SeriesError(
            f"{path}: SamplesPerPixel {samples} / PhotometricInterpretation {photometric!r}: only grayscale images are supported"
        )
    modality = _required_text(ds, "Modality", path)
    header = _Header(
        series_uid=_required_text(ds, "SeriesInstanceUID", path),
        study_uid=_required_text(ds, "StudyInstanceUID", path),
        modality=modality,
        sop_class_uid=sop_class,
        description=_text(ds, "SeriesDescription"),
        series_number=_int(ds.get("SeriesNumber")),
        body_part=_text(ds, "BodyPartExamined"),
        pixel_spacing=None,
    )
    # CT stays in HU whatever the photometric interpretation: windows map HU to brightness, and
    # inverted HU would make every preset wrong. Other modalities flip within the stored range.
    invert_sum = None
    if photometric == "MONOCHROME1" and modality != "CT":
        bits = _required_int(ds, "BitsStored", path)
        invert_sum = -1 if int(ds.get("PixelRepresentation", 0)) else (1 << bits) - 1
    instance_number = _int(ds.get("InstanceNumber"))

    def make(
        frame: int | None, position: Dataset, orientation: Dataset, measures: Dataset | None, transform: Dataset | None, voi: Dataset | None
    ) -> _Frame:
        where = f"{path}" + ("" if frame is None else f" frame {frame}")
        ipp = _floats(position, "ImagePositionPatient", 3, where)
        iop = _floats(orientation, "ImageOrientationPatient", 6, where)
        spacing = _floats(measures, "PixelSpacing", 2, where) if measures is not None and "PixelSpacing" in measures else None
        slope = _float(transform.get("RescaleSlope")) if transform is not None else None
        intercept = _float(transform.get("RescaleIntercept")) if transform is not None else None
        try:
            image = Slice(
                path=path,
                sop_instance_uid=sop_uid,
                frame=frame,
                position=math.nan,
                image_position=_vector(ipp),
                rows=rows,
                columns=columns,
                rescale_slope=1.0 if slope is None else slope,
                rescale_intercept=0.0 if intercept is None else intercept,
                invert_sum=invert_sum,
                window=_window(voi) if voi is not None else None,
                instance_number=instance_number,
            )
        except ValueError as exc:  # e.g. RescaleSlope 0: say which file
            raise SeriesError(f"{where}: {exc}") from exc
        spacing_pair = None if spacing is None else (spacing[0], spacing[1])
        return _Frame(header=replace(header, pixel_spacing=spacing_pair), orientation=iop, slice=image)

    if "PerFrameFunctionalGroupsSequence" not in ds and "SharedFunctionalGroupsSequence" not in ds:
        frames = _int(ds.get("NumberOfFrames")) or 1
        if frames != 1:
            raise SeriesError(f"{path}: NumberOfFrames {frames} without functional groups: cannot place the frames")
        return [make(None, ds, ds, ds, ds, ds)]

    # Enhanced and Legacy Converted Enhanced: each macro is per-frame or shared (PS3.3 C.7.6.16).
    n_frames = _required_int(ds, "NumberOfFrames", path)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if len(per_frame) != n_frames:
        raise SeriesError(f"{path}: PerFrameFunctionalGroupsSequence has {len(per_frame)} items for NumberOfFrames {n_frames}")
    shared = (ds.get("SharedFunctionalGroupsSequence") or [Dataset()])[0]

    def group(item: Dataset, keyword: str) -> Dataset | None:
        for source in (item, shared):
            seq = source.get(keyword)
            if seq:
                first: Dataset = seq[0]
                return first
        return None

    result = []
    for i, item in enumerate(per_frame):
        frame = i + 1
        position = group(item, "PlanePositionSequence")
        orientation = group(item, "PlaneOrientationSequence")
        if position is None or orientation is None:
            missing = "PlanePositionSequence" if position is None else "PlaneOrientationSequence"
            raise SeriesError(f"{path} frame {frame}: {missing} is missing from the functional groups")
        # Older Enhanced MR may have no Pixel Value Transformation: top-level rescale, or identity.
        transform = group(item, "PixelValueTransformationSequence") or ds
        result.append(
            make(frame, position, orientation, group(item, "PixelMeasuresSequence"), transform, group(item, "FrameVOILUTSequence"))
        )
    return result


def report_header(ds: Dataset) -> Dataset:
    """The top-level header of ``ds`` without what a report never copies: pixel data, the per-frame
    functional groups (megabytes in a large Enhanced instance) and values left on disk (over 64 KB).

    Elements are shared with ``ds``, not copied: ``ds`` is read for this header and then dropped.
    """
    header = Dataset()
    for tag in ds.keys():
        if tag >= _PIXEL_GROUP or tag == _PER_FRAME_GROUPS:
            continue
        raw = ds.get_item(tag, keep_deferred=True)
        if getattr(raw, "value", True) is None and getattr(raw, "length", 0) != 0:
            continue  # deferred: reading it would open the file again
        header.add(ds[tag])
    return header


def _build_series(series_uid: str, frames: list[_Frame], header: Dataset) -> Series:
    first = frames[0]
    for frame in frames[1:]:
        if not _same_orientation(frame.orientation, first.orientation):
            counts: dict[tuple[float, ...], int] = defaultdict(int)
            for f in frames:
                counts[tuple(round(v, 4) for v in f.orientation)] += 1
            summary = "; ".join(f"{n} at {list(o)}" for o, n in counts.items())
            raise SeriesError(
                f"series {series_uid}: mixed ImageOrientationPatient ({summary}); a localizer or a second stack in the series?"
            )
        for field in ("study_uid", "modality", "sop_class_uid"):
            if getattr(frame.header, field) != getattr(first.header, field):
                raise SeriesError(
                    f"series {series_uid}: {frame.slice.path} has a different {field} ({getattr(frame.header, field)} vs {getattr(first.header, field)})"
                )
        if (frame.slice.rows, frame.slice.columns) != (first.slice.rows, first.slice.columns):
            raise SeriesError(
                f"series {series_uid}: mixed Rows/Columns ({frame.slice.rows}x{frame.slice.columns} in {frame.slice.path}, {first.slice.rows}x{first.slice.columns} in {first.slice.path})"
            )
    row, col = np.array(first.orientation[:3]), np.array(first.orientation[3:])
    normal = np.cross(row, col)
    if np.linalg.norm(normal) < 0.5:
        raise SeriesError(
            f"series {series_uid}: ImageOrientationPatient {list(first.orientation)} is degenerate (row and column directions are not orthogonal)"
        )
    normal /= np.linalg.norm(normal)
    placed = sorted(
        (replace(f.slice, position=float(np.dot(f.slice.image_position, normal))) for f in frames),
        key=lambda s: (s.position, s.instance_number or 0, s.frame or 0),
    )
    for a, b in zip(placed, placed[1:], strict=False):
        if b.position - a.position < _MIN_GAP_MM:
            raise SeriesError(
                f"series {series_uid}: {_describe(a)} and {_describe(b)} share the position {a.position:.3f} mm along the normal "
                "(echoes, phases or repeats in one series are not supported)"
            )
    h = first.header
    return Series(
        series_uid=series_uid,
        study_uid=h.study_uid,
        modality=h.modality,
        sop_class_uid=h.sop_class_uid,
        description=h.description,
        series_number=h.series_number,
        body_part=h.body_part,
        slices=tuple(placed),
        row_cosines=_vector(row / np.linalg.norm(row)),
        column_cosines=_vector(col / np.linalg.norm(col)),
        pixel_spacing=h.pixel_spacing,
        header=header,
    )


def _check_pixel_data(ds: Dataset, path: Path) -> None:
    keyword = next((k for k in _PIXEL_KEYWORDS if k in ds), None)
    if keyword is None:
        raise SeriesError(f"{path}: image instance without pixel data (no PixelData)")
    element = ds.get_item(keyword, keep_deferred=True)  # keeps a deferred value on disk
    length = getattr(element, "length", None)
    if length is None:  # already read: a DataElement
        value = getattr(element, "value", None)
        length = len(value) if value is not None else 0
    if length == 0:
        raise SeriesError(f"{path}: {keyword} is empty")
    if keyword == "PixelData" and not UID(ds.file_meta.get("TransferSyntaxUID", "")).is_compressed and length != 0xFFFFFFFF:
        expected = expected_native_length(ds)
        if expected is not None and length < expected:
            raise SeriesError(f"{path}: PixelData holds {length} bytes but Rows/Columns/BitsAllocated/frames need {expected}: truncated")


def _same_orientation(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return all(abs(x - y) <= _ORIENTATION_TOLERANCE for x, y in zip(a, b, strict=True))


def _describe(s: Slice) -> str:
    return f"{s.path.name}" + ("" if s.frame is None else f" frame {s.frame}")


def _vector(values: Iterable[float]) -> Vector:
    x, y, z = (float(v) + 0.0 for v in values)  # + 0.0 turns -0.0 into 0.0
    return (x, y, z)


def _floats(ds: Dataset, keyword: str, count: int, where: object) -> tuple[float, ...]:
    value = ds.get(keyword)
    if value is None or value == "":
        raise SeriesError(f"{where}: {keyword} is missing")
    try:
        values = tuple(float(v) for v in (value if isinstance(value, list | tuple | MultiValue) else [value]))
    except (TypeError, ValueError) as exc:
        raise SeriesError(f"{where}: {keyword} {value!r} is not numeric") from exc
    if len(values) != count or not all(math.isfinite(v) for v in values):
        raise SeriesError(f"{where}: {keyword} must have {count} finite values, got {list(values)}")
    return values


def _window(ds: Dataset) -> tuple[float, float] | None:
    center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    if center is None or width is None or width <= 0:
        return None
    return (center, width)


def _first(value: object) -> float | None:
    if isinstance(value, list | tuple | MultiValue):
        value = value[0] if value else None
    return _float(value)


def _float(value: object) -> float | None:
    if value is None or value == "":
        return None
    try:
        result = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return result if math.isfinite(result) else None


def _int(value: object) -> int | None:
    try:
        return int(value) if value not in (None, "") else None  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None


def _required_int(ds: Dataset, keyword: str, path: Path) -> int:
    value = _int(ds.get(keyword))
    if value is None:
        raise SeriesError(f"{path}: {keyword} is missing or not an integer")
    return value


def _required_text(ds: Dataset, keyword: str, path: Path) -> str:
    value = _text(ds, keyword)
    if value is None:
        raise SeriesError(f"{path}: {keyword} is missing")
    return value


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None:
        return None
    return str(value).strip().rstrip("\x00") or None
