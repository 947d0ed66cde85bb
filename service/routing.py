"""Routing rules: which series of a study are captioned, by which model, and where the report goes.

Rules are data, never code: a TOML file (``MEDCAP_ROUTING_RULES``, read with :mod:`tomllib`)
holding ``[[rules]]`` tables, each a name, criteria and what to do with a series that meets them
(docs/routing.md). The file is validated in full when MedCap starts (``medcap rules check FILE``
does the same on demand); every error names the rule and the field. Regular expressions are
compiled at load. Without a file, :func:`default` reproduces what MedCap did before rules existed:
every CT and MR series captioned with the configured model, the SR to the configured destinations.

A series' decision is the first rule whose criteria all hold (a criterion not given holds for
every series); a series no rule meets is skipped. The caption worker decides each series of a
study version (:func:`study_facts`, then :meth:`RuleSet.decide`) before it reads any pixel data,
and records every decision with the job's outcome (:func:`record`): ``routing_decisions`` rows, and
a ``series.skipped`` audit event naming the rule for each skipped series. This module owns those
rows; the verified report a radiologist approves goes where they sent its draft
(:func:`report_destinations`).
"""

from __future__ import annotations

import difflib
import enum
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import regex  # type: ignore[import-untyped]  # re's syntax (V0) with a time limit per search
from pydicom import Dataset
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service import audit
from service.audit import Action
from service.schema import Association, Instance, RoutingDecision, SeriesRecord, Study, StudyVersion
from service.storage import Storage

if TYPE_CHECKING:
    from service.settings import Settings

DEFAULT_MODEL = "default"  # the model of MEDCAP_MODEL
NO_RULE = "(no rule)"  # the "rule" of a series no rule matched
MAX_PATTERN_LENGTH = 512  # a description pattern is a filter, not a program
MATCH_TIMEOUT_SECONDS = 0.1  # a search takes microseconds; one that backtracks without end must not hang a worker
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class RoutingError(ValueError):
    """A rule file that cannot be used; the message names the file, the rule and the field."""


class PatternTimeout(ValueError):
    """A pattern searched one value for longer than MATCH_TIMEOUT_SECONDS (catastrophic backtracking)."""


class RuleAction(enum.StrEnum):
    CAPTION = "caption"
    SKIP = "skip"


# -- the domain --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pattern:
    """A regular expression over a DICOM text value: searched (not anchored), case-insensitive,
    in Python's ``re`` syntax, each search bounded in time."""

    source: str
    compiled: Any = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source:
            raise ValueError("must be a non-empty regular expression string")
        if len(self.source) > MAX_PATTERN_LENGTH:
            raise ValueError(f"is longer than {MAX_PATTERN_LENGTH} characters")
        try:
            re.compile(self.source)  # the documented syntax: what re refuses is refused
            object.__setattr__(self, "compiled", regex.compile(self.source, regex.IGNORECASE | regex.VERSION0))
        except (re.error, regex.error) as exc:
            raise ValueError(f"is not a valid regular expression: {exc}") from None

    def search(self, value: str | None) -> bool:
        if value is None:
            return False
        try:
            return self.compiled.search(value, timeout=MATCH_TIMEOUT_SECONDS) is not None
        except TimeoutError:
            raise PatternTimeout(
                f"/{self.source}/ took longer than {MATCH_TIMEOUT_SECONDS} s on {value!r} (it backtracks without end: simplify it)"
            ) from None


@dataclass(frozen=True)
class SeriesFacts:
    """What the rules may look at in one series (from the database and one stored header)."""

    series_uid: str
    modality: str | None = None
    body_regions: frozenset[str] = frozenset()
    study_description: str | None = None
    series_description: str | None = None
    calling_ae_titles: frozenset[str] = frozenset()
    institution: str | None = None
    station: str | None = None
    instance_count: int = 0

    def __post_init__(self) -> None:
        if not self.series_uid:
            raise ValueError("SeriesFacts.series_uid must be given")
        if self.instance_count < 0:
            raise ValueError("SeriesFacts.instance_count must not be negative")


def _upper_set(values: Iterable[str]) -> frozenset[str]:
    return frozenset(v.strip().upper() for v in values if v and v.strip())


@dataclass(frozen=True)
class Match:
    """A rule's criteria; ``None`` means "any". Sets match any one of their values (case-insensitive)."""

    modality: frozenset[str] | None = None
    body_region: frozenset[str] | None = None
    study_description: Pattern | None = None
    series_description: Pattern | None = None
    calling_ae: frozenset[str] | None = None
    institution: Pattern | None = None
    station: Pattern | None = None
    min_instances: int | None = None
    max_instances: int | None = None

    def __post_init__(self) -> None:
        for name in ("modality", "body_region", "calling_ae"):
            values = getattr(self, name)
            if values is not None:
                if not values:
                    raise ValueError(f"{name}: must list at least one value (leave it out to match any)")
                object.__setattr__(self, name, _upper_set(values))
        for name in ("min_instances", "max_instances"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ValueError(f"{name}: must be a whole number of at least 0, got {value!r}")
        if self.min_instances is not None and self.max_instances is not None and self.min_instances > self.max_instances:
            raise ValueError(f"max_instances: {self.max_instances} is below min_instances {self.min_instances}")

    def misses(self, facts: SeriesFacts) -> list[str]:
        """Why ``facts`` do not meet these criteria, one reason per failed criterion; empty when they do."""
        why: list[str] = []

        def one_of(name: str, wanted: frozenset[str] | None, have: Iterable[str], label: str) -> None:
            have = _upper_set(have)
            if wanted is not None and not wanted & have:
                shown = ", ".join(sorted(have)) or "none"
                why.append(f"{name}: {label} {shown} is not one of {', '.join(sorted(wanted))}")

        def pattern(name: str, wanted: Pattern | None, have: str | None) -> None:
            if wanted is None:
                return
            try:
                found = wanted.search(have)
            except PatternTimeout as exc:
                raise PatternTimeout(f"{name}: {exc}") from None
            if not found:
                why.append(f"{name}: {have!r} does not match /{wanted.source}/" if have is not None else f"{name}: the series has none")

        one_of("modality", self.modality, [facts.modality] if facts.modality else [], "modality")
        one_of("body_region", self.body_region, facts.body_regions, "body region")
        pattern("study_description", self.study_description, facts.study_description)
        pattern("series_description", self.series_description, facts.series_description)
        one_of("calling_ae", self.calling_ae, facts.calling_ae_titles, "calling AE title")
        pattern("institution", self.institution, facts.institution)
        pattern("station", self.station, facts.station)
        if self.min_instances is not None and facts.instance_count < self.min_instances:
            why.append(f"min_instances: {facts.instance_count} instances, fewer than {self.min_instances}")
        if self.max_instances is not None and facts.instance_count > self.max_instances:
            why.append(f"max_instances: {facts.instance_count} instances, more than {self.max_instances}")
        return why


@dataclass(frozen=True)
class Rule:
    """A named rule: its criteria and what happens to a series that meets them."""

    name: str
    match: Match = Match()
    action: RuleAction = RuleAction.CAPTION
    model: str = DEFAULT_MODEL  # a name from the file's [models] table, or "default" (MEDCAP_MODEL)
    destinations: tuple[str, ...] | None = None  # None: the configured destinations (MEDCAP_DESTINATIONS)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ValueError(f"name: {self.name!r} must be 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit")
        try:
            object.__setattr__(self, "action", RuleAction(self.action))
        except ValueError:
            raise ValueError(f"action: {self.action!r} must be one of {', '.join(a.value for a in RuleAction)}") from None
        if not isinstance(self.model, str) or not _NAME.match(self.model):
            raise ValueError(f"model: {self.model!r} is not a model name")
        if self.action is RuleAction.SKIP and (self.model != DEFAULT_MODEL or self.destinations is not None):
            raise ValueError("action: a skip rule captions nothing, so it takes no model or destinations")
        if self.destinations is not None:
            if any(not isinstance(d, str) or not d.strip() for d in self.destinations):
                raise ValueError("destinations: every destination must be a non-empty string")
            object.__setattr__(self, "destinations", tuple(d.strip() for d in self.destinations))


@dataclass(frozen=True)
class Decision:
    """What became of one series: the rule that decided it and why."""

    series_uid: str
    rule: str  # the rule's name, or NO_RULE
    action: RuleAction
    reason: str
    model: str | None = None  # set when captioned
    destinations: tuple[str, ...] | None = None  # when captioned: None means the configured ones

    def __post_init__(self) -> None:
        if (self.action is RuleAction.CAPTION) != (self.model is not None):
            raise ValueError("Decision.model is set exactly when the series is captioned")

    @property
    def captioned(self) -> bool:
        return self.action is RuleAction.CAPTION


@dataclass(frozen=True)
class RuleOutcome:
    """One rule, tried on one series: whether it matched, and if not, why not."""

    rule: str
    matched: bool
    misses: tuple[str, ...]
    considered: bool  # False: an earlier rule had already decided the series


@dataclass(frozen=True)
class Explanation:
    facts: SeriesFacts
    decision: Decision
    outcomes: tuple[RuleOutcome, ...]


@dataclass(frozen=True)
class RuleSet:
    """The rules in order, the named models they may use, and where they came from."""

    rules: tuple[Rule, ...]
    models: Mapping[str, Path] = field(default_factory=dict)
    source: str = "built-in default"

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for rule in self.rules:
            if rule.name in seen:
                raise ValueError(f"rule {rule.name!r}: name: used by an earlier rule too")
            seen.add(rule.name)
            if rule.model != DEFAULT_MODEL and rule.model not in self.models:
                known = ", ".join([DEFAULT_MODEL, *sorted(self.models)])
                raise ValueError(f"rule {rule.name!r}: model: {rule.model!r} is not defined in [models] (known: {known})")
        if DEFAULT_MODEL in self.models:
            raise ValueError(f"models: {DEFAULT_MODEL!r} is MEDCAP_MODEL and cannot be redefined")

    def decide(self, facts: SeriesFacts) -> Decision:
        return self.explain(facts).decision

    def explain(self, facts: SeriesFacts) -> Explanation:
        outcomes: list[RuleOutcome] = []
        decision: Decision | None = None
        for rule in self.rules:
            try:
                misses = tuple(rule.match.misses(facts))
            except PatternTimeout as exc:  # the series cannot be decided: the job fails, naming the rule
                raise RoutingError(f"{self.source}: rule {rule.name!r}: {exc}") from None
            outcomes.append(RuleOutcome(rule.name, not misses, misses, decision is None))
            if decision is None and not misses:
                decision = _decision(rule, facts)
        if decision is None:
            decision = Decision(facts.series_uid, NO_RULE, RuleAction.SKIP, "no rule matched")
        return Explanation(facts, decision, tuple(outcomes))

    @property
    def reads_headers(self) -> bool:
        """Whether a criterion needs the stored header (body region, institution, station); the others are columns."""
        return any(r.match.body_region is not None or r.match.institution is not None or r.match.station is not None for r in self.rules)

    def models_used(self) -> list[str]:
        return sorted({r.model for r in self.rules if r.action is RuleAction.CAPTION})


def _decision(rule: Rule, facts: SeriesFacts) -> Decision:
    if rule.action is RuleAction.SKIP:
        return Decision(facts.series_uid, rule.name, RuleAction.SKIP, f"skipped by rule {rule.name}")
    return Decision(facts.series_uid, rule.name, RuleAction.CAPTION, f"captioned by rule {rule.name}", rule.model, rule.destinations)


def default() -> RuleSet:
    """Today's behaviour: every CT and MR series, the configured model, the configured destinations."""
    return RuleSet((Rule("default", Match(modality=frozenset({"CT", "MR"}))),))


# -- the rule file -------------------------------------------------------------------------------

_SET_CRITERIA = ("modality", "body_region", "calling_ae")
_PATTERN_CRITERIA = ("study_description", "series_description", "institution", "station")
_COUNT_CRITERIA = ("min_instances", "max_instances")
_RULE_KEYS = ("name", "action", "model", "destinations", *_SET_CRITERIA, *_PATTERN_CRITERIA, *_COUNT_CRITERIA)
_TOP_KEYS = ("models", "rules")


def _unknown(key: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f"unknown field {key!r}" + (f" (did you mean {close[0]!r}?)" if close else f"; known: {', '.join(known)}")


def _strings(value: Any, field_name: str) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
        raise ValueError(f"{field_name}: must be a string or a list of strings, got {value!r}")
    return items


def parse_rule(table: Any, position: int) -> Rule:
    """One ``[[rules]]`` table; errors name the rule (or its position) and the field."""
    label = f"rule #{position}"
    if not isinstance(table, dict):
        raise RoutingError(f"{label}: must be a table")
    if isinstance(table.get("name"), str):
        label = f"rule {table['name']!r}"
    try:
        for key in table:
            if key not in _RULE_KEYS:
                raise ValueError(_unknown(key, _RULE_KEYS))
        if "name" not in table:
            raise ValueError("name: every rule needs a name (it is what the audit trail records)")
        criteria: dict[str, Any] = {}
        for key in _SET_CRITERIA:
            if key in table:
                criteria[key] = frozenset(_strings(table[key], key))
        for key in _PATTERN_CRITERIA:
            if key in table:
                if not isinstance(table[key], str):
                    raise ValueError(f"{key}: must be a regular expression string, got {table[key]!r}")
                try:
                    criteria[key] = Pattern(table[key])
                except ValueError as exc:
                    raise ValueError(f"{key}: {exc}") from None
        for key in _COUNT_CRITERIA:
            if key in table:
                criteria[key] = table[key]
        destinations = table.get("destinations")
        if destinations is not None:
            if not isinstance(destinations, list):
                raise ValueError(f"destinations: must be a list of destinations, got {destinations!r}")
            destinations = tuple(_strings(destinations, "destinations"))
        return Rule(
            name=table["name"],
            match=Match(**criteria),
            action=table.get("action", RuleAction.CAPTION.value),
            model=table.get("model", DEFAULT_MODEL),
            destinations=destinations,
        )
    except ValueError as exc:
        raise RoutingError(f"{label}: {exc}") from None


def parse(text: str, *, source: str = "<rules>", base_dir: Path | None = None) -> RuleSet:
    """A rule file's text as a :class:`RuleSet`; every error is a :class:`RoutingError` naming ``source``."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RoutingError(f"{source}: not valid TOML: {exc}") from None
    try:
        for key in data:
            if key not in _TOP_KEYS:
                raise RoutingError(_unknown(key, _TOP_KEYS))
        models_table = data.get("models", {})
        if not isinstance(models_table, dict):
            raise RoutingError('models: must be a table of name = "checkpoint directory"')
        models: dict[str, Path] = {}
        for name, path in models_table.items():
            if not _NAME.match(name):
                raise RoutingError(f"models: {name!r} is not a model name (letters, digits, '_', '.', '-')")
            if not isinstance(path, str) or not path:
                raise RoutingError(f"models.{name}: must be a checkpoint directory, got {path!r}")
            resolved = Path(path) if base_dir is None or Path(path).is_absolute() else base_dir / path
            if not (resolved / "config.json").is_file():
                raise RoutingError(f"models.{name}: {resolved} is not a MedCap checkpoint directory (no config.json)")
            models[name] = resolved
        tables = data.get("rules")
        if not isinstance(tables, list) or not tables:
            raise RoutingError("rules: the file needs at least one [[rules]] table")
        rules = tuple(parse_rule(t, i) for i, t in enumerate(tables, 1))
        try:
            return RuleSet(rules, models, source)
        except ValueError as exc:
            raise RoutingError(str(exc)) from None
    except RoutingError as exc:
        raise RoutingError(f"{source}: {exc}") from None


def load(path: Path, *, check_destination: Callable[[str], object] | None = None) -> RuleSet:
    """Read and validate a rule file; ``check_destination`` raises ValueError for a destination nothing can send to."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RoutingError(f"{path}: cannot read the rule file: {exc}") from None
    rules = parse(text, source=str(path), base_dir=path.resolve().parent)
    if check_destination is not None:
        for rule in rules.rules:
            for destination in rule.destinations or ():
                try:
                    check_destination(destination)
                except ValueError as exc:
                    raise RoutingError(f"{path}: rule {rule.name!r}: destinations: {exc}") from None
    return rules


def configured(settings: Settings) -> RuleSet:
    """The rules of ``MEDCAP_ROUTING_RULES``, or the built-in default; raises :class:`RoutingError`."""
    if settings.routing_rules is None:
        return default()
    from service import outputs

    kinds = outputs.configured(settings)
    return load(settings.routing_rules, check_destination=kinds.for_destination)


def describe(rules: RuleSet) -> list[str]:
    """The rules as ``medcap rules check`` prints them, one line each."""
    lines = []
    for i, rule in enumerate(rules.rules, 1):
        m = rule.match
        parts = [f"{k}={','.join(sorted(v))}" for k in _SET_CRITERIA if (v := getattr(m, k)) is not None]
        parts += [f"{k}=/{p.source}/" for k in _PATTERN_CRITERIA if (p := getattr(m, k)) is not None]
        parts += [f"{k}={v}" for k in _COUNT_CRITERIA if (v := getattr(m, k)) is not None]
        then = "skip" if rule.action is RuleAction.SKIP else f"caption with {rule.model}"
        if rule.action is RuleAction.CAPTION:
            where = "configured destinations" if rule.destinations is None else (", ".join(rule.destinations) or "no destination")
            then += f", SR to {where}"
        lines.append(f"{i}. {rule.name}: {' '.join(parts) or 'every series'} -> {then}")
    return lines


# -- facts from a study ------------------------------------------------------------------------


def body_region(header: Dataset) -> frozenset[str]:
    """A series' body region: BodyPartExamined and the Anatomic Region Sequence's code value and meaning.

    The one place rules get a body region from, so that it can move to the header facts of
    dicom_io (when those exist) without touching the rules."""
    regions: set[str] = set()
    part = header.get("BodyPartExamined")
    if part:
        regions.add(str(part))
    for item in header.get("AnatomicRegionSequence") or ():
        for keyword in ("CodeValue", "CodeMeaning"):
            value = item.get(keyword)
            if value:
                regions.add(str(value))
    return _upper_set(regions)


def _text(header: Dataset, keyword: str) -> str | None:
    value = header.get(keyword)
    return str(value).strip() or None if value is not None else None


def study_facts(s: Session, storage: Storage, study_id: int, version_number: int | None, *, headers: bool = True) -> list[SeriesFacts]:
    """The facts of each series with captionable instances in the study (up to ``version_number``,
    or every received instance when None), reading one stored header per series when ``headers``
    (without, body region, institution and station are unknown: rules that need none skip the read)."""
    upto = Instance.version_number <= version_number if version_number is not None else Instance.id.is_not(None)
    study_description = s.scalar(select(Study.study_description).where(Study.id == study_id))
    rows = s.execute(
        select(
            SeriesRecord.id,
            SeriesRecord.series_uid,
            SeriesRecord.modality,
            SeriesRecord.series_description,
            func.count(),
            func.min(Instance.path),
        )
        .join(Instance, Instance.series_id == SeriesRecord.id)
        .where(Instance.study_id == study_id, Instance.captionable, upto)
        .group_by(SeriesRecord.id, SeriesRecord.series_uid, SeriesRecord.modality, SeriesRecord.series_description)
        .order_by(SeriesRecord.id)
    ).all()
    senders: dict[int, set[str]] = {}
    for series_id, calling_ae in s.execute(
        select(Instance.series_id, Association.calling_ae)
        .join(Association, Association.id == Instance.association_id)
        .where(Instance.study_id == study_id, Instance.captionable, upto)
        .distinct()
    ):
        senders.setdefault(series_id, set()).add(calling_ae)
    facts = []
    for series_id, series_uid, modality, description, count, path in rows:
        header = storage.read_dataset(path, stop_before_pixels=True) if headers else Dataset()
        facts.append(
            SeriesFacts(
                series_uid=series_uid,
                modality=modality,
                body_regions=body_region(header),
                study_description=study_description,
                series_description=description,
                calling_ae_titles=_upper_set(senders.get(series_id, ())),
                institution=_text(header, "InstitutionName"),
                station=_text(header, "StationName"),
                instance_count=count,
            )
        )
    return facts


def latest_version(s: Session, study_uid: str) -> tuple[int, int | None] | None:
    """(study id, its newest version number or None) of a received study; None if unknown."""
    row = s.execute(
        select(Study.id, func.max(StudyVersion.number))
        .outerjoin(StudyVersion, StudyVersion.study_id == Study.id)
        .where(Study.study_uid == study_uid)
        .group_by(Study.id)
    ).first()
    return None if row is None else (row[0], row[1])


# -- the record ------------------------------------------------------------------------------


def record(
    s: Session, now: datetime, actor: str, version_id: int, study_uid: str, decisions: Sequence[Decision], source: str, *, job_id: int
) -> None:
    """Every decision of a study version, in the caller's transaction (the job's outcome): a
    ``routing_decisions`` row each, and a ``series.skipped`` event per skipped series. Once per
    version: a job that runs again finds them recorded."""
    if s.scalar(select(func.count()).select_from(RoutingDecision).where(RoutingDecision.study_version_id == version_id)):
        return
    for d in decisions:
        s.add(
            RoutingDecision(
                study_version_id=version_id,
                series_uid=d.series_uid,
                rule=d.rule,
                action=d.action.value,
                model=d.model,
                destinations=list(d.destinations) if d.destinations is not None else None,
                reason=d.reason,
                rules_source=source[:300],
                decided_at=now,
            )
        )
        if not d.captioned:
            audit.record(
                s,
                now,
                actor,
                Action.SERIES_SKIPPED,
                "series",
                d.series_uid,
                study_uid=study_uid,
                rule=d.rule,
                reason=d.reason,
                job_id=job_id,
            )


def report_destinations(s: Session, version_id: int, series_uids: Iterable[str], configured: Sequence[str]) -> tuple[str, ...]:
    """Where a report on these series of a study version goes (the verified report follows its draft):
    the union of their recorded decisions' destinations, a decision without any meaning ``configured``.
    Series with no recorded decision (drafted before routing rules existed) go to ``configured``."""
    uids = set(series_uids)
    rows = s.execute(
        select(RoutingDecision.series_uid, RoutingDecision.destinations).where(
            RoutingDecision.study_version_id == version_id, RoutingDecision.action == RuleAction.CAPTION.value
        )
    ).all()
    chosen: dict[str, None] = {}
    decided = set()
    for series_uid, destinations in rows:
        if series_uid in uids:
            decided.add(series_uid)
            chosen.update(dict.fromkeys(configured if destinations is None else destinations))
    if uids - decided:
        chosen.update(dict.fromkeys(configured))
    return tuple(chosen)


@dataclass(frozen=True)
class RecordedDecision:
    study_version: int
    series_uid: str
    rule: str
    action: str
    model: str | None
    reason: str
    decided_at: datetime


def recorded(s: Session, study_id: int) -> list[RecordedDecision]:
    """The decisions recorded for a study, oldest version first."""
    rows = s.execute(
        select(StudyVersion.number, RoutingDecision)
        .join(StudyVersion, StudyVersion.id == RoutingDecision.study_version_id)
        .where(StudyVersion.study_id == study_id)
        .order_by(StudyVersion.number, RoutingDecision.id)
    ).all()
    return [RecordedDecision(n, d.series_uid, d.rule, d.action, d.model, d.reason, d.decided_at) for n, d in rows]


def skipped_counts(s: Session, version_ids: Iterable[int]) -> dict[int, int]:
    """Skipped series per study version id (versions with none are absent)."""
    ids = list(version_ids)
    if not ids:
        return {}
    rows = s.execute(
        select(RoutingDecision.study_version_id, func.count())
        .where(RoutingDecision.study_version_id.in_(ids), RoutingDecision.action == RuleAction.SKIP.value)
        .group_by(RoutingDecision.study_version_id)
    ).all()
    return {version_id: count for version_id, count in rows}


# -- explaining -------------------------------------------------------------------------------


@dataclass(frozen=True)
class StudyExplanation:
    """``medcap rules explain``: each series of a study under the current rules, and what was recorded."""

    study_uid: str
    version: int | None  # the newest version (None: nothing assembled yet, every received instance)
    rules_source: str
    series: tuple[Explanation, ...]
    recorded: tuple[RecordedDecision, ...]

    def lines(self) -> list[str]:
        out = [
            f"study {self.study_uid}, " + (f"version {self.version}" if self.version else "not yet assembled (every received instance)"),
            f"rules: {self.rules_source}",
        ]
        if not self.series:
            out.append("no series with CT or MR images: nothing for the rules to decide")
        for e in self.series:
            f = e.facts
            out.append("")
            out.append(
                f"series {f.series_uid}: {f.modality or '?'}, {f.instance_count} instances, "
                f"series description {f.series_description!r}, body region {', '.join(sorted(f.body_regions)) or 'none'}, "
                f"from {', '.join(sorted(f.calling_ae_titles)) or 'no association'}, "
                f"institution {f.institution!r}, station {f.station!r}"
            )
            d = e.decision
            then = f"caption with model {d.model}" if d.captioned else "skip"
            out.append(f"  decision: {then} ({d.reason})")
            for o in e.outcomes:
                if o.matched:
                    state = "matched" if o.considered else "would match, but an earlier rule decided"
                else:
                    state = "did not match: " + "; ".join(o.misses)
                mark = "->" if o.rule == d.rule else "  "
                out.append(f"  {mark} {o.rule}: {state}")
            if d.rule == NO_RULE:
                out.append("  -> no rule matched: the series is skipped")
        if self.recorded:
            out.append("")
            out.append("recorded when the study was processed:")
            for r in self.recorded:
                what = f"captioned with {r.model}" if r.action == RuleAction.CAPTION.value else "skipped"
                out.append(f"  version {r.study_version}, series {r.series_uid}: {what} by rule {r.rule} ({r.reason})")
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "study_uid": self.study_uid,
            "version": self.version,
            "rules": self.rules_source,
            "series": [
                {
                    "series_uid": e.facts.series_uid,
                    "facts": {
                        "modality": e.facts.modality,
                        "body_regions": sorted(e.facts.body_regions),
                        "study_description": e.facts.study_description,
                        "series_description": e.facts.series_description,
                        "calling_ae_titles": sorted(e.facts.calling_ae_titles),
                        "institution": e.facts.institution,
                        "station": e.facts.station,
                        "instance_count": e.facts.instance_count,
                    },
                    "decision": {
                        "rule": e.decision.rule,
                        "action": e.decision.action.value,
                        "model": e.decision.model,
                        "reason": e.decision.reason,
                    },
                    "rules": [
                        {"rule": o.rule, "matched": o.matched, "considered": o.considered, "misses": list(o.misses)} for o in e.outcomes
                    ],
                }
                for e in self.series
            ],
            "recorded": [
                {
                    "version": r.study_version,
                    "series_uid": r.series_uid,
                    "rule": r.rule,
                    "action": r.action,
                    "model": r.model,
                    "reason": r.reason,
                    "decided_at": r.decided_at.isoformat(),
                }
                for r in self.recorded
            ],
        }


def explain_study(s: Session, storage: Storage, rules: RuleSet, study_uid: str) -> StudyExplanation | None:
    """Each series of a received study under ``rules``; None for a study never received."""
    found = latest_version(s, study_uid)
    if found is None:
        return None
    study_id, version = found
    facts = study_facts(s, storage, study_id, version)
    return StudyExplanation(study_uid, version, rules.source, tuple(rules.explain(f) for f in facts), tuple(recorded(s, study_id)))


@dataclass(frozen=True)
class SkippedSeries:
    decided_at: datetime
    study_uid: str
    accession_number: str | None
    study_version: int
    series_uid: str
    rule: str
    reason: str


def recent_skips(s: Session, limit: int = 50) -> list[SkippedSeries]:
    """The most recently skipped series, newest first (the admin overview)."""
    rows = s.execute(
        select(RoutingDecision, Study.study_uid, Study.accession_number, StudyVersion.number)
        .join(StudyVersion, StudyVersion.id == RoutingDecision.study_version_id)
        .join(Study, Study.id == StudyVersion.study_id)
        .where(RoutingDecision.action == RuleAction.SKIP.value)
        .order_by(RoutingDecision.decided_at.desc(), RoutingDecision.id.desc())
        .limit(limit)
    ).all()
    return [SkippedSeries(d.decided_at, uid, accession, number, d.series_uid, d.rule, d.reason) for d, uid, accession, number in rows]
