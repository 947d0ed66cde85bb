"""What a series' DICOM header states for certain: modality, body region, plane, contrast, laterality.

A draft must never contradict these (models/grounding.py removes sentences that do), so each fact
comes from a documented rule (docs/header-facts.md) and stays ``None`` when the header does not
settle it: a fact is never guessed.

- **modality**: ``Modality``.
- **region**: the first source that names one, in this order: ``AnatomicRegionSequence`` (coded;
  also in the shared functional groups' ``FrameAnatomySequence``), ``BodyPartExamined`` (DICOM
  CID 4031 defined terms), then words of ``SeriesDescription``, ``ProtocolName`` and
  ``StudyDescription`` through :data:`REGIONS`. A later source that names a region sharing no body
  area with the chosen one is recorded as a conflict; the earlier (more formal) source wins. One
  description naming regions with no area in common (``HEAD/CHEST``) settles nothing.
- **plane**: from ``ImageOrientationPatient`` only, never from names: the slice normal's angle to
  the nearest patient axis; within :data:`PLANE_TOLERANCE_DEG` it is that axis' plane (a gantry
  tilt of up to 30° is still axial), else ``oblique``.
- **contrast**: ``with`` when the Contrast/Bolus module names an agent (``ContrastBolusAgent``,
  ``ContrastBolusAgentSequence``, ``ContrastBolusIngredient``, a volume or dose above 0) or
  ``ContrastBolusUsageSequence`` says administered; ``without`` when the agent is "none" or usage
  says not administered; else from series description / protocol name words ("plain", "w/o",
  "post contrast", ...); a study description may only say ``without`` (a study "with contrast"
  still has its pre-contrast series). Absence of the module is not taken as "without".
- **laterality**: ``Laterality``, ``ImageLaterality`` or ``FrameLaterality`` (R, L, B); U
  (unpaired) and disagreeing values leave it unknown.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydicom import Dataset

from dicom_io.series import Series

PLANES = ("axial", "coronal", "sagittal", "oblique")
CONTRASTS = ("with", "without")
LATERALITIES = ("right", "left", "bilateral")
PLANE_TOLERANCE_DEG = 30.0
FACTS = ("modality", "region", "plane", "contrast", "laterality")

# Coarse body areas: two regions are compatible when they share one.
AREAS = ("head", "neck", "chest", "breast", "abdomen", "pelvis", "spine", "upper limb", "lower limb")
# Areas next to each other: an organ named in the next area is not a contradiction (a chest CT shows the liver dome).
ADJACENT = frozenset(
    frozenset(pair)
    for pair in (
        ("head", "neck"),
        ("neck", "chest"),
        ("chest", "abdomen"),
        ("abdomen", "pelvis"),
        ("chest", "breast"),
        ("chest", "upper limb"),
        ("pelvis", "lower limb"),
        ("spine", "neck"),
        ("spine", "chest"),
        ("spine", "abdomen"),
        ("spine", "pelvis"),
    )
)

_MODALITY = re.compile(r"^[A-Z][A-Z0-9_]{0,15}$")


@dataclass(frozen=True)
class Code:
    """A coded concept: (value, scheme designator, meaning), e.g. ("69536005", "SCT", "Head")."""

    value: str
    scheme: str
    meaning: str

    def __post_init__(self) -> None:
        for name in ("value", "scheme", "meaning"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise ValueError(f"Code.{name} must be non-empty text, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class Region:
    """A body region of the vocabulary, or one read from a code the vocabulary does not know (``areas`` empty)."""

    term: str  # how drafts name it, e.g. "head", "chest, abdomen and pelvis"
    code: Code | None  # SNOMED CT, as in DICOM CID 4031
    areas: frozenset[str]  # the coarse areas it covers; empty: unknown area, never used to judge a sentence
    body_parts: tuple[str, ...] = ()  # BodyPartExamined defined terms (CID 4031)
    words: tuple[str, ...] = ()  # phrases in descriptions and in model text (lower case, whole words)
    organ: bool = False  # a part inside an area (brain, lung): tolerated in an adjacent area's draft

    def __post_init__(self) -> None:
        if not isinstance(self.term, str) or not self.term.strip():
            raise ValueError(f"Region.term must be non-empty text, got {self.term!r}")
        if self.code is not None and not isinstance(self.code, Code):
            raise ValueError(f"Region.code must be a Code or None, got {self.code!r}")
        unknown = set(self.areas) - set(AREAS)
        if unknown:
            raise ValueError(f"Region.areas: unknown area(s) {sorted(unknown)} (known: {', '.join(AREAS)})")
        object.__setattr__(self, "areas", frozenset(self.areas))

    def compatible(self, other: Region) -> bool:
        """Both cover a common area (or either area is unknown: nothing to judge by)."""
        return not self.areas or not other.areas or bool(self.areas & other.areas)

    def tolerated_in(self, examined: Region) -> bool:
        """A mention of this region in a draft of ``examined`` is not a contradiction."""
        if self.compatible(examined):
            return True
        return self.organ and any(frozenset((a, b)) in ADJACENT for a in self.areas for b in examined.areas)


def _sct(value: str, meaning: str) -> Code:
    return Code(value, "SCT", meaning)


def _r(
    term: str, code: Code | None, areas: Iterable[str], parts: Iterable[str] = (), words: Iterable[str] = (), organ: bool = False
) -> Region:
    return Region(term, code, frozenset(areas), tuple(parts), tuple(words), organ)


# The vocabulary. Codes are SNOMED CT as DICOM CID 4031 "Common Anatomic Regions" lists them;
# body_parts are CID 4031's BodyPartExamined code strings. Multi-word phrases are matched before
# their parts ("head and neck" before "head").
REGIONS: tuple[Region, ...] = (
    _r("whole body", _sct("38266002", "Entire body"), AREAS, ["WHOLEBODY"], ["whole body", "wholebody"]),
    _r(
        "chest, abdomen and pelvis",
        _sct("416775004", "Chest, Abdomen and Pelvis"),
        ["chest", "abdomen", "pelvis"],
        ["CHESTABDPELVIS"],
        ["chest abdomen and pelvis", "chest abdomen pelvis", "chest abd pelvis", "thorax abdomen pelvis", "cap"],
    ),
    _r(
        "abdomen and pelvis",
        _sct("818982008", "Abdomen and Pelvis"),
        ["abdomen", "pelvis"],
        ["ABDOMENPELVIS"],
        ["abdomen and pelvis", "abdomen pelvis", "abd pelvis", "abdo pelvis", "abdominopelvic"],
    ),
    _r(
        "chest and abdomen",
        _sct("416550000", "Chest and Abdomen"),
        ["chest", "abdomen"],
        ["CHESTABDOMEN"],
        ["chest and abdomen", "chest abdomen"],
    ),
    _r("head and neck", _sct("774007", "Head and Neck"), ["head", "neck"], ["HEADNECK"], ["head and neck", "head neck"]),
    _r("neck and chest", _sct("417437006", "Neck and Chest"), ["neck", "chest"], ["NECKCHEST"], ["neck and chest"]),
    _r("cervical spine", _sct("122494005", "Cervical spine"), ["spine", "neck"], ["CSPINE"], ["cervical spine", "c spine", "cspine"]),
    _r(
        "thoracic spine",
        _sct("122495006", "Thoracic spine"),
        ["spine", "chest"],
        ["TSPINE"],
        ["thoracic spine", "t spine", "tspine", "dorsal spine"],
    ),
    _r("lumbar spine", _sct("122496007", "Lumbar spine"), ["spine", "abdomen"], ["LSPINE"], ["lumbar spine", "l spine", "lspine"]),
    _r("spine", _sct("421060004", "Spine"), ["spine"], ["SPINE"], ["spine", "spinal"]),
    _r("head", _sct("69536005", "Head"), ["head"], ["HEAD"], ["head", "cranial", "cranium", "skull"]),
    _r(
        "brain",
        _sct("12738006", "Brain"),
        ["head"],
        ["BRAIN"],
        ["brain", "cerebral", "cerebrum", "cerebellum", "hemisphere", "hemispheres"],
        organ=True,
    ),
    _r("orbit", _sct("363654007", "Orbit"), ["head"], ["ORBIT"], ["orbit", "orbits", "orbital"], organ=True),
    _r("neck", _sct("45048000", "Neck"), ["neck"], ["NECK"], ["neck"]),
    _r("chest", _sct("816094009", "Chest"), ["chest"], ["CHEST", "THORAX"], ["chest", "thorax", "thoracic"]),
    _r("lung", _sct("39607008", "Lung"), ["chest"], ["LUNG"], ["lung", "lungs", "pulmonary"], organ=True),
    _r("heart", _sct("80891009", "Heart"), ["chest"], ["HEART"], ["heart", "cardiac"], organ=True),
    _r("breast", _sct("76752008", "Breast"), ["breast"], ["BREAST"], ["breast", "breasts"], organ=True),
    _r("abdomen", _sct("818981001", "Abdomen"), ["abdomen"], ["ABDOMEN"], ["abdomen", "abdominal", "abd"]),
    _r("liver", _sct("10200004", "Liver"), ["abdomen"], ["LIVER"], ["liver", "hepatic"], organ=True),
    _r("kidney", _sct("64033007", "Kidney"), ["abdomen"], ["KIDNEY"], ["kidney", "kidneys", "renal"], organ=True),
    _r("pancreas", _sct("15776009", "Pancreas"), ["abdomen"], ["PANCREAS"], ["pancreas", "pancreatic"], organ=True),
    _r("pelvis", _sct("816092008", "Pelvis"), ["pelvis"], ["PELVIS"], ["pelvis", "pelvic"]),
    _r("prostate", _sct("41216001", "Prostate"), ["pelvis"], ["PROSTATE"], ["prostate"], organ=True),
    _r("hip", _sct("29836001", "Hip"), ["pelvis", "lower limb"], ["HIP"], ["hip", "hips"]),
    _r("shoulder", _sct("16982005", "Shoulder"), ["upper limb"], ["SHOULDER"], ["shoulder", "shoulders"]),
    _r("knee", _sct("72696002", "Knee"), ["lower limb"], ["KNEE"], ["knee", "knees"]),
)
_BY_BODY_PART = {part: r for r in REGIONS for part in r.body_parts}
_BY_CODE = {(r.code.scheme, r.code.value): r for r in REGIONS if r.code is not None}
# Older SNOMED-RT ("SRT") codes the same regions had before DICOM moved to SNOMED CT.
_BY_CODE.update(
    {
        ("SRT", "T-D1100"): _BY_BODY_PART["HEAD"],
        ("SRT", "T-A0100"): _BY_BODY_PART["BRAIN"],
        ("SRT", "T-D3000"): _BY_BODY_PART["CHEST"],
        ("SRT", "T-D4000"): _BY_BODY_PART["ABDOMEN"],
        ("SRT", "T-D6000"): _BY_BODY_PART["PELVIS"],
        ("SRT", "T-D1600"): _BY_BODY_PART["NECK"],
        ("SRT", "T-D04FF"): _BY_BODY_PART["SPINE"],
        ("SRT", "T-D0010"): _BY_BODY_PART["WHOLEBODY"],
        ("SRT", "T-15710"): _BY_BODY_PART["KNEE"],
    }
)
_BY_CODE[("SCT", "51185008")] = _BY_BODY_PART["CHEST"]  # "Thoracic structure", CID 4031's code before 2019
_BY_CODE[("SCT", "113345001")] = _BY_BODY_PART["ABDOMEN"]
_BY_CODE[("SCT", "12921003")] = _BY_BODY_PART["PELVIS"]

# Where a region word means something else: the femoral head is no head, the bladder neck no neck.
NOT_A_REGION = (
    "femoral head", "humeral head", "radial head", "metacarpal head", "metatarsal head", "pancreatic head", "head of the",
    "head of", "femoral neck", "bladder neck", "gallbladder neck", "neck of the", "neck of", "surgical neck", "anatomical neck",
)  # fmt: skip

LATERALITY_CODES = {
    "right": _sct("24028007", "Right"),
    "left": _sct("7771000", "Left"),
    "bilateral": _sct("51440002", "Right and left"),
}
# "Procedure reported" (TID 2000) from the modality: SNOMED CT procedures where there is one, else the
# modality itself as DICOM codes it (CID 29).
PROCEDURES = {
    "CT": _sct("77477000", "Computed tomography"),
    "MR": _sct("113091000", "Magnetic resonance imaging"),
}
MODALITY_MEANINGS = {"CR": "Computed Radiography", "DX": "Digital Radiography", "US": "Ultrasound", "PT": "Positron emission tomography",
                     "NM": "Nuclear Medicine", "MG": "Mammography", "XA": "X-Ray Angiography", "RF": "Radio Fluoroscopy"}  # fmt: skip


def procedure_code(modality: str) -> Code:
    """The coded procedure of a modality: SNOMED CT for CT and MR, DICOM's modality code otherwise."""
    if modality in PROCEDURES:
        return PROCEDURES[modality]
    return Code(modality, "DCM", MODALITY_MEANINGS.get(modality, modality))


_LATERALITY_VALUES = {"R": "right", "L": "left", "B": "bilateral"}

# Description words for contrast (regular expressions on lower-case text).
CONTRAST_WORDS: Mapping[str, tuple[str, ...]] = {
    "without": (
        r"\bw/o\b", r"\bwo\b", r"\bwithout\b", r"\bnon[- ]?contrast", r"\bno contrast", r"\bplain\b", r"\bunenhanced\b",
        r"\bnon[- ]?enhanced\b", r"\bnative\b", r"\bpre[- ]?contrast", r"\bnect\b", r"\bc-(?![a-z0-9])",
    ),
    "with": (
        r"\bwith contrast", r"\bw/ ?contrast", r"\bw/c\b", r"\bpost[- ]?contrast", r"\bcontrast[- ]enhanced", r"\bpost[- ]?gad",
        r"\bgadolinium\b", r"\bcect\b", r"(?<![a-z0-9])c\+", r"\+c\b", r"\bcontrast\b",
    ),
}  # fmt: skip
_AGENT_NONE = {"", "none", "no", "n", "nil", "no contrast", "non", "without"}


def _words(text: str) -> str:
    """Lower case, every non-alphanumeric character a space: ``t1_gre_fsp_3d_sag`` → ``t1 gre fsp 3d sag``."""
    return " " + " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split()) + " "


def regions_in(text: str) -> list[Region]:
    """The vocabulary regions a text names, longest phrases first, each once; phrases of :data:`NOT_A_REGION` excluded."""
    remaining = _words(text)
    for phrase in sorted(NOT_A_REGION, key=len, reverse=True):
        remaining = remaining.replace(_words(phrase), "  ")
    found: list[Region] = []
    phrases = sorted(((w, r) for r in REGIONS for w in r.words), key=lambda item: len(item[0]), reverse=True)
    for phrase, region in phrases:
        key = _words(phrase)
        if key in remaining:
            remaining = remaining.replace(key, "  ")
            if region not in found:
                found.append(region)
    return found


@dataclass(frozen=True)
class HeaderFacts:
    """The facts of one series; ``None`` is "the header does not say". ``sources`` names the
    attribute each known fact came from; ``conflicts`` what the header said otherwise, and was overruled."""

    modality: str | None = None
    region: Region | None = None
    plane: str | None = None
    contrast: str | None = None
    contrast_agent: str | None = None
    laterality: str | None = None
    sources: tuple[tuple[str, str], ...] = ()
    conflicts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.modality is not None and (not isinstance(self.modality, str) or not _MODALITY.match(self.modality)):
            raise ValueError(f"HeaderFacts.modality must be a DICOM modality such as 'CT', got {self.modality!r}")
        if self.region is not None and not isinstance(self.region, Region):
            raise ValueError(f"HeaderFacts.region must be a Region or None, got {self.region!r}")
        for name, allowed in (("plane", PLANES), ("contrast", CONTRASTS), ("laterality", LATERALITIES)):
            value = getattr(self, name)
            if value is not None and value not in allowed:
                raise ValueError(f"HeaderFacts.{name} must be one of {allowed} or None, got {value!r}")
        if self.contrast_agent is not None and (self.contrast != "with" or not isinstance(self.contrast_agent, str)):
            raise ValueError(f"HeaderFacts.contrast_agent is for contrast 'with' only, got {self.contrast_agent!r} with {self.contrast!r}")
        sources = tuple(tuple(pair) for pair in self.sources)
        for pair in sources:
            if len(pair) != 2 or pair[0] not in FACTS or not isinstance(pair[1], str) or not pair[1]:
                raise ValueError(f"HeaderFacts.sources: each entry must be (fact in {FACTS}, attribute), got {pair!r}")
        for fact, _ in sources:
            if self.fact(fact) is None:
                raise ValueError(f"HeaderFacts.sources names a source for {fact}, which is unknown")
        object.__setattr__(self, "sources", sources)
        if isinstance(self.conflicts, str) or not all(isinstance(c, str) and c for c in self.conflicts):
            raise ValueError(f"HeaderFacts.conflicts must be a sequence of non-empty texts, got {self.conflicts!r}")
        object.__setattr__(self, "conflicts", tuple(self.conflicts))

    def fact(self, name: str) -> Any:
        if name not in FACTS:
            raise ValueError(f"unknown fact {name!r}; facts are {FACTS}")
        return getattr(self, name)

    def source(self, name: str) -> str | None:
        return dict(self.sources).get(name)

    @property
    def laterality_code(self) -> Code | None:
        return LATERALITY_CODES[self.laterality] if self.laterality else None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (the drafts table, ``medcap caption --json``); :meth:`from_dict` reads it back."""
        region = self.region
        return {
            "modality": self.modality,
            "region": None
            if region is None
            else {
                "term": region.term,
                "code": None if region.code is None else [region.code.value, region.code.scheme, region.code.meaning],
                "areas": sorted(region.areas),
            },
            "plane": self.plane,
            "contrast": self.contrast,
            "contrast_agent": self.contrast_agent,
            "laterality": self.laterality,
            "sources": dict(self.sources),
            "conflicts": list(self.conflicts),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HeaderFacts:
        if not isinstance(data, Mapping):
            raise ValueError(f"header facts must be a mapping, got {type(data).__name__}")
        raw = data.get("region")
        region = None
        if raw is not None:
            if not isinstance(raw, Mapping) or not raw.get("term"):
                raise ValueError(f"header facts: region must be an object with a term, got {raw!r}")
            known = next((r for r in REGIONS if r.term == raw["term"]), None)
            code = Code(*raw["code"]) if raw.get("code") else None
            if known is not None and code in (None, known.code):
                region = known  # a vocabulary term: its code and areas
            else:
                region = Region(str(raw["term"]), code, frozenset(raw.get("areas", ())))
        return cls(
            modality=data.get("modality"),
            region=region,
            plane=data.get("plane"),
            contrast=data.get("contrast"),
            contrast_agent=data.get("contrast_agent"),
            laterality=data.get("laterality"),
            sources=tuple(dict(data.get("sources") or {}).items()),
            conflicts=tuple(data.get("conflicts") or ()),
        )


# -- deriving --------------------------------------------------------------------------------


def header_facts(header: Dataset, orientation: Sequence[float] | None = None) -> HeaderFacts:
    """The facts of the series whose (first) instance header is ``header``.

    ``orientation``: the series' six ImageOrientationPatient values where the caller has them
    (``dicom_io.series.Series``: also for Enhanced multi-frame); else read from the header.
    """
    if not isinstance(header, Dataset):
        raise ValueError(f"header must be a pydicom Dataset, got {type(header).__name__}")
    sources: list[tuple[str, str]] = []
    conflicts: list[str] = []

    modality = _text(header, "Modality").upper() or None
    if modality is not None and not _MODALITY.match(modality):
        conflicts.append(f"Modality {modality!r} is not a DICOM modality: modality unknown")
        modality = None
    if modality:
        sources.append(("modality", "Modality"))

    region, region_source = _region(header, conflicts)
    if region is not None:
        sources.append(("region", region_source))

    iop = list(orientation) if orientation is not None else _orientation(header)
    plane = plane_of(iop) if iop is not None else None
    if plane is not None:
        sources.append(("plane", "ImageOrientationPatient"))

    contrast, agent, contrast_source = _contrast(header, conflicts)
    if contrast is not None:
        sources.append(("contrast", contrast_source))

    laterality, laterality_source = _laterality(header, conflicts)
    if laterality is not None:
        sources.append(("laterality", laterality_source))
    return HeaderFacts(modality, region, plane, contrast, agent, laterality, tuple(sources), tuple(conflicts))


def plane_of(orientation: Sequence[float]) -> str:
    """axial / coronal / sagittal when the slice normal is within :data:`PLANE_TOLERANCE_DEG` of that axis, else oblique."""
    values = [float(v) for v in orientation]
    if len(values) != 6 or not all(math.isfinite(v) for v in values):
        raise ValueError(f"ImageOrientationPatient must be six finite numbers, got {list(orientation)!r}")
    r, c = values[:3], values[3:]
    n = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
    length = math.sqrt(sum(x * x for x in n))
    if length < 0.5:
        raise ValueError(f"ImageOrientationPatient {values} is degenerate: row and column are not orthogonal unit vectors")
    axis = max(range(3), key=lambda i: abs(n[i]))
    angle = math.degrees(math.acos(min(1.0, abs(n[axis]) / length)))
    if angle > PLANE_TOLERANCE_DEG:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]  # normal along x (left-right), y (front-back), z (feet-head)


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or (hasattr(value, "__iter__") and not isinstance(value, (str, bytes))):
        value = "\\".join(str(v) for v in value)
    return str(value).strip()


def _shared(header: Dataset, sequence: str) -> Dataset | None:
    """An item of the Enhanced multi-frame shared functional groups, if there."""
    shared = header.get("SharedFunctionalGroupsSequence")
    if not shared:
        return None
    seq = shared[0].get(sequence)
    return seq[0] if seq else None


def _orientation(header: Dataset) -> list[float] | None:
    iop = header.get("ImageOrientationPatient")
    if iop is None:
        item = _shared(header, "PlaneOrientationSequence")
        iop = item.get("ImageOrientationPatient") if item is not None else None
    if iop is None:
        return None
    try:
        values = [float(v) for v in iop]
        plane_of(values)
    except (TypeError, ValueError):
        return None  # malformed: the plane stays unknown rather than failing the draft
    return values


def _coded_region(header: Dataset) -> tuple[Region | None, str]:
    for holder, where in ((header, "AnatomicRegionSequence"), (_shared(header, "FrameAnatomySequence"), "FrameAnatomySequence")):
        if holder is None:
            continue
        seq = holder.get("AnatomicRegionSequence")
        if not seq:
            continue
        item = seq[0]
        scheme, value = str(item.get("CodingSchemeDesignator", "")).strip(), str(item.get("CodeValue", "")).strip()
        meaning = str(item.get("CodeMeaning", "")).strip()
        if not value or not scheme:
            continue
        known = _BY_CODE.get((scheme, value))
        if known is not None:
            return known, where
        # A code outside the vocabulary is still a fact: named as coded, with no area to judge sentences by.
        return Region((meaning or value).lower(), Code(value, scheme, meaning or value), frozenset()), where
    return None, ""


def _region(header: Dataset, conflicts: list[str]) -> tuple[Region | None, str]:
    candidates: list[tuple[Region, str, str]] = []  # (region, source, what it said)
    coded, where = _coded_region(header)
    if coded is not None:
        candidates.append((coded, where, coded.code.meaning if coded.code else coded.term))
    body_part = _text(header, "BodyPartExamined").upper()
    if body_part in _BY_BODY_PART:
        candidates.append((_BY_BODY_PART[body_part], "BodyPartExamined", body_part))
    for keyword in ("SeriesDescription", "ProtocolName", "StudyDescription"):
        text = _text(header, keyword)
        named = regions_in(text)
        if not named:
            continue
        if all(a.compatible(b) for a in named for b in named):
            candidates.append((named[0], keyword, text))
        else:
            conflicts.append(f"{keyword} {text!r} names regions with no area in common ({', '.join(r.term for r in named)}): not used")
    if not candidates:
        return None, ""
    chosen, source, said = candidates[0]
    for region, other, text in candidates[1:]:
        if not region.compatible(chosen):
            conflicts.append(f"{other} {text!r} suggests {region.term}; {source} ({said}) says {chosen.term}, which wins")
    return chosen, source


def _positive_number(ds: Dataset, keyword: str) -> bool:
    try:
        return float(ds.get(keyword) or 0) > 0
    except (TypeError, ValueError):
        return False


def _contrast_from_attributes(header: Dataset) -> tuple[str | None, str | None, str]:
    usage = header.get("ContrastBolusUsageSequence")
    if not usage:
        item = _shared(header, "ContrastBolusUsageSequence")
        usage = [item] if item is not None else None
    if usage:
        given = {str(u.get("ContrastBolusAgentAdministered", "")).upper() for u in usage}
        if "YES" in given:
            return "with", None, "ContrastBolusUsageSequence"
        if given == {"NO"}:
            return "without", None, "ContrastBolusUsageSequence"
    agent = _text(header, "ContrastBolusAgent")
    if agent:
        if agent.lower() in _AGENT_NONE:
            return "without", None, "ContrastBolusAgent"
        return "with", agent, "ContrastBolusAgent"
    agents = header.get("ContrastBolusAgentSequence")
    if agents:
        meaning = str(agents[0].get("CodeMeaning", "")).strip() or None
        return "with", meaning, "ContrastBolusAgentSequence"
    ingredient = _text(header, "ContrastBolusIngredient")
    if ingredient:
        return "with", ingredient.lower(), "ContrastBolusIngredient"
    for keyword in ("ContrastBolusVolume", "ContrastBolusTotalDose"):
        if _positive_number(header, keyword):
            return "with", None, keyword
    return None, None, ""


def contrast_in(text: str) -> set[str]:
    """``with`` / ``without`` as a text's words state it (both, when it says both)."""
    lowered = " ".join(text.lower().replace("_", " ").split())
    found: set[str] = set()
    for pattern in CONTRAST_WORDS["without"]:
        if re.search(pattern, lowered):
            found.add("without")
            lowered = re.sub(pattern, " ", lowered)  # "without contrast" is no "contrast"
    if any(re.search(pattern, lowered) for pattern in CONTRAST_WORDS["with"]):
        found.add("with")
    return found


def _contrast(header: Dataset, conflicts: list[str]) -> tuple[str | None, str | None, str]:
    contrast, agent, source = _contrast_from_attributes(header)
    described: list[tuple[str, str, str]] = []
    for keyword in ("SeriesDescription", "ProtocolName", "StudyDescription"):
        text = _text(header, keyword)
        said = contrast_in(text)
        if keyword == "StudyDescription":
            said &= {"without"}  # a study "with contrast" still holds its pre-contrast series
        if len(said) == 1:
            described.append((said.pop(), keyword, text))
        elif len(said) > 1 and keyword != "StudyDescription":
            conflicts.append(f"{keyword} {text!r} says both with and without contrast: not used")
    if contrast is not None:
        for value, keyword, text in described:
            if value != contrast:
                conflicts.append(f"{keyword} {text!r} says {value} contrast; {source} says {contrast}, which wins")
        return contrast, agent, source
    values = {value for value, _, _ in described}
    if len(values) > 1:
        conflicts.append("descriptions disagree on contrast (" + "; ".join(f"{k} {t!r}: {v}" for v, k, t in described) + "): unknown")
        return None, None, ""
    if described:
        return described[0][0], None, described[0][1]
    return None, None, ""


def _laterality(header: Dataset, conflicts: list[str]) -> tuple[str | None, str]:
    found: list[tuple[str, str]] = []
    frame = _shared(header, "FrameAnatomySequence")
    for holder, keyword in ((header, "Laterality"), (header, "ImageLaterality"), (frame, "FrameLaterality")):
        if holder is None:
            continue
        value = _text(holder, keyword).upper()
        if value in _LATERALITY_VALUES:
            found.append((_LATERALITY_VALUES[value], keyword))
    values = {v for v, _ in found}
    if len(values) > 1:
        conflicts.append("laterality attributes disagree (" + ", ".join(f"{k} {v}" for v, k in found) + "): unknown")
        return None, ""
    return found[0] if found else (None, "")


def series_facts(series: Series) -> HeaderFacts:
    """The facts of a loaded series: its kept header, and the orientation its slices share (Enhanced multi-frame too)."""
    return header_facts(series.header, (*series.row_cosines, *series.column_cosines))
