"""Drafts that never contradict the DICOM header: a heading from the header facts, contradicting sentences out.

A model sentence contradicts a series' header facts (dicom_io/header_facts.py) when it names
another modality, a plane other than the computed one, a body region with no area in common with
the examined one (an organ of an adjacent area is tolerated), or contrast the header rules out.
Such sentences are removed and each removal is kept with its reasons, for the reviewer and the
audit trail. What the header does not state is never judged. The rules and their word lists are
in docs/header-facts.md.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dicom_io.header_facts import HeaderFacts, regions_in

# Words that name a modality, grouped by the DICOM Modality values they stand for.
MODALITY_WORDS: Mapping[str, tuple[tuple[str, ...], frozenset[str]]] = {
    "CT": ((r"\bct\b", r"\bcta\b", r"\bcomputed tomograph", r"\bcat scan"), frozenset({"CT"})),
    "MR": (
        (r"\bmr\b", r"\bmri\b", r"\bmra\b", r"\bmagnetic resonance", r"\bt[12][- ]weighted", r"\bflair\b", r"\bdiffusion[- ]weighted"),
        frozenset({"MR"}),
    ),
    "X-ray": ((r"\bx[- ]?ray", r"\bradiograph"), frozenset({"CR", "DX", "DR", "RG", "RF", "XA"})),
    "ultrasound": ((r"\bultrasound", r"\bsonograph", r"\bsonogram"), frozenset({"US"})),
    "PET": ((r"\bpet\b",), frozenset({"PT"})),
    "scintigraphy": ((r"\bscintigra", r"\bspect\b"), frozenset({"NM"})),
    "mammography": ((r"\bmammogra",), frozenset({"MG"})),
}
_KNOWN_MODALITIES = frozenset().union(*(values for _, values in MODALITY_WORDS.values()))
_HYBRIDS = {frozenset({"PT", "CT"}), frozenset({"PT", "MR"}), frozenset({"NM", "CT"})}  # PET/CT, PET/MR, SPECT/CT

PLANE_WORDS: Mapping[str, tuple[str, ...]] = {
    "axial": (r"\baxial\b", r"\btransverse\b", r"\btransaxial\b"),
    "coronal": (r"\bcoronal\b",),
    "sagittal": (r"\bsagittal\b",),
}
# Contrast as a sentence states it: stricter than the description words of dicom_io/header_facts.py,
# where "plain" or a bare "contrast" mean contrast, and a draft's "grey-white contrast" does not.
SENTENCE_CONTRAST: Mapping[str, tuple[str, ...]] = {
    "without": (r"\bwithout (iv |intravenous |oral )?contrast", r"\bnon[- ]?contrast", r"\bunenhanced\b", r"\bnon[- ]?enhanced\b", r"\bpre[- ]?contrast"),
    "with": (
        r"\bwith (iv |intravenous |oral )?contrast", r"\bcontrast[- ]enhanced", r"\bpost[- ]?contrast", r"\b(after|following) (iv |intravenous )?contrast",
        r"\bgadolinium[- ]enhanced",
    ),
}  # fmt: skip
# Anatomy and morphology that use a plane's word without naming the image plane.
NOT_A_PLANE = (
    r"\bsagittal (sinus|suture|band|split)", r"\bcoronal suture", r"\baxial (skeleton|load|loading)", r"\btransverse (process|sinus|colon|myelitis|fracture|ligament|diameter)",
)  # fmt: skip


@dataclass(frozen=True)
class Removal:
    """A model sentence taken out of a draft, and why (one reason per contradicted fact)."""

    sentence: str
    reasons: tuple[str, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.sentence, str) or not self.sentence.strip():
            raise ValueError(f"Removal.sentence must be non-empty text, got {self.sentence!r}")
        if isinstance(self.reasons, str) or not self.reasons or not all(isinstance(r, str) and r for r in self.reasons):
            raise ValueError(f"Removal.reasons must be non-empty texts, got {self.reasons!r}")
        object.__setattr__(self, "reasons", tuple(self.reasons))

    def as_dict(self) -> dict[str, Any]:
        return {"sentence": self.sentence, "reasons": list(self.reasons)}


@dataclass(frozen=True)
class GroundedDraft:
    """One series' draft: the heading made from the header facts, the model's sentences kept, those removed."""

    heading: str
    kept: tuple[str, ...]
    removed: tuple[Removal, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.heading, str) or not self.heading.endswith(":"):
            raise ValueError(f"GroundedDraft.heading must be text ending in ':', got {self.heading!r}")
        object.__setattr__(self, "kept", tuple(self.kept))
        object.__setattr__(self, "removed", tuple(self.removed))
        for i, r in enumerate(self.removed):
            if not isinstance(r, Removal):
                raise ValueError(f"GroundedDraft.removed[{i}] must be a Removal, got {type(r).__name__}")

    @property
    def body(self) -> str:
        """The model's kept sentences, as one text (what caption metrics score)."""
        return ". ".join(self.kept) + ("." if self.kept else "")

    @property
    def text(self) -> str:
        """The draft as the SR and the reviewer get it."""
        if self.kept:
            return f"{self.heading} {self.body}"
        if self.removed:
            return f"{self.heading} (every sentence of the model contradicted the DICOM header and was removed)"
        return f"{self.heading} (the model produced no text for this series)"


def sentences(texts: Iterable[str]) -> list[str]:
    """Distinct sentences, in order, without their full stops (as ``models.captioner.summarise`` joins them)."""
    seen: list[str] = []
    for text in texts:
        for sentence in (s.strip() for s in text.replace("\n", " ").split(". ")):
            sentence = sentence.rstrip(".").strip()
            if sentence and sentence not in seen:
                seen.append(sentence)
    return seen


def _modalities_in(text: str) -> dict[str, frozenset[str]]:
    return {name: values for name, (patterns, values) in MODALITY_WORDS.items() if any(re.search(p, text) for p in patterns)}


def _planes_in(text: str) -> set[str]:
    for pattern in NOT_A_PLANE:
        text = re.sub(pattern, " ", text)
    return {plane for plane, patterns in PLANE_WORDS.items() if any(re.search(p, text) for p in patterns)}


def _contrast_in(text: str) -> set[str]:
    found = set()
    for pattern in SENTENCE_CONTRAST["without"]:
        if re.search(pattern, text):
            found.add("without")
            text = re.sub(pattern, " ", text)  # "without contrast" holds no "with contrast"
    if any(re.search(p, text) for p in SENTENCE_CONTRAST["with"]):
        found.add("with")
    return found


def contradictions(sentence: str, facts: HeaderFacts) -> list[str]:
    """Why ``sentence`` contradicts ``facts`` (empty: it does not). Only known facts are judged."""
    text = " ".join(sentence.lower().split())
    reasons: list[str] = []
    if facts.modality is not None and facts.modality in _KNOWN_MODALITIES:
        for name, values in _modalities_in(text).items():
            if facts.modality not in values and not any(frozenset({facts.modality, v}) in _HYBRIDS for v in values):
                reasons.append(f"names {name}; the header says {facts.modality} ({facts.source('modality')})")
    if facts.plane is not None:
        for plane in sorted(_planes_in(text)):
            if plane != facts.plane:
                reasons.append(f"names the {plane} plane; the slices are {facts.plane} ({facts.source('plane')})")
    if facts.region is not None and facts.region.areas:
        for region in regions_in(text):
            if not region.tolerated_in(facts.region):
                reasons.append(f"names the {region.term}; the series is of the {facts.region.term} ({facts.source('region')})")
    if facts.contrast is not None:
        for said in sorted(_contrast_in(text) - {facts.contrast}):
            reasons.append(f"says {said} contrast; the header says {facts.contrast} contrast ({facts.source('contrast')})")
    return reasons


def heading(facts: HeaderFacts) -> str:
    """E.g. "CT head, axial, without contrast:"; what the header does not state is left out."""
    first = " ".join(part for part in (facts.modality, facts.region.term if facts.region else None) if part)
    parts = [first or "Image series"]
    if facts.laterality:
        parts.append(facts.laterality)
    if facts.plane:
        parts.append(facts.plane)
    if facts.contrast:
        parts.append(f"{facts.contrast} contrast")
    return ", ".join(parts) + ":"


def ground(captions: Sequence[str], facts: HeaderFacts) -> GroundedDraft:
    """The grounded draft of one series from its key images' captions."""
    kept: list[str] = []
    removed: list[Removal] = []
    for sentence in sentences(captions):
        reasons = contradictions(sentence, facts)
        if reasons:
            removed.append(Removal(sentence, tuple(reasons)))
        else:
            kept.append(sentence)
    return GroundedDraft(heading(facts), tuple(kept), tuple(removed))


def prompt_for(facts: HeaderFacts) -> str:
    """The header facts as a prompt prefix, for captioners that take a prompt."""
    stated = heading(facts).rstrip(":")
    return f"DICOM header: {stated}. Describe the findings; do not contradict the header."


@dataclass(frozen=True)
class ContradictionCount:
    """Sentences of drafts that contradict their header facts, out of all their sentences."""

    contradicting: int = 0
    sentences: int = 0

    def __post_init__(self) -> None:
        if not (0 <= self.contradicting <= self.sentences):
            raise ValueError(f"ContradictionCount: need 0 <= contradicting <= sentences, got {self.contradicting}/{self.sentences}")

    def __add__(self, other: ContradictionCount) -> ContradictionCount:
        return ContradictionCount(self.contradicting + other.contradicting, self.sentences + other.sentences)

    @property
    def rate(self) -> float | None:
        return self.contradicting / self.sentences if self.sentences else None

    def as_dict(self) -> dict[str, Any]:
        return {"contradicting": self.contradicting, "sentences": self.sentences, "rate": self.rate}


def count_contradictions(draft_sentences: Sequence[str], facts: HeaderFacts) -> ContradictionCount:
    """The contradiction count of one draft's model sentences (a grounded draft: its ``kept``)."""
    return ContradictionCount(sum(1 for s in draft_sentences if contradictions(s, facts)), len(draft_sentences))
