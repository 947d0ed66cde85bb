"""Routing rules: the file format and its errors, each criterion, first match wins, explain, the default."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset

from service import routing
from service.routing import Match, Pattern, RoutingError, Rule, RuleAction, RuleSet, SeriesFacts
from tests.conftest import series_files

HEAD_CT = SeriesFacts(
    "1.2.3.1",
    modality="CT",
    body_regions=frozenset({"HEAD"}),
    study_description="CT HEAD W/O CONTRAST",
    series_description="Axial 5mm",
    calling_ae_titles=frozenset({"PACS1"}),
    institution="General Hospital",
    station="CT4",
    instance_count=28,
)


def rules(text: str, tmp_path: Path | None = None) -> RuleSet:
    return routing.parse(text, source="rules.toml", base_dir=tmp_path)


# -- the file and its errors -------------------------------------------------------------------


def test_a_full_rule_file_parses_into_rules_in_order(tmp_path, tiny_model):
    parsed = rules(
        f"""
        [models]
        neuro = "{tiny_model}"

        [[rules]]
        name = "no-scouts"
        action = "skip"
        series_description = "scout|localizer|topogram"

        [[rules]]
        name = "head-ct"
        modality = ["CT"]
        body_region = ["HEAD", "brain"]
        study_description = "head"
        calling_ae = "pacs1"
        institution = "general"
        station = "^CT[0-9]$"
        min_instances = 10
        max_instances = 2000
        model = "neuro"
        destinations = ["NEURO@127.0.0.1:4242"]
        """
    )
    assert [r.name for r in parsed.rules] == ["no-scouts", "head-ct"]
    skip, head = parsed.rules
    assert skip.action is RuleAction.SKIP and skip.match.series_description == Pattern("scout|localizer|topogram")
    assert head.match.modality == {"CT"} and head.match.body_region == {"HEAD", "BRAIN"} and head.match.calling_ae == {"PACS1"}
    assert (head.match.min_instances, head.match.max_instances, head.model) == (10, 2000, "neuro")
    assert head.destinations == ("NEURO@127.0.0.1:4242",) and parsed.models == {"neuro": tiny_model}
    assert routing.describe(parsed) == [
        "1. no-scouts: series_description=/scout|localizer|topogram/ -> skip",
        "2. head-ct: modality=CT body_region=BRAIN,HEAD calling_ae=PACS1 study_description=/head/ institution=/general/ "
        "station=/^CT[0-9]$/ min_instances=10 max_instances=2000 -> caption with neuro, SR to NEURO@127.0.0.1:4242",
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[rules]]\nname = 'a'\nmodalty = ['CT']", "rule 'a': unknown field 'modalty' (did you mean 'modality'?)"),
        ("[[rules]]\nname = 'a'\nseries_description = '(unclosed'", "rule 'a': series_description: is not a valid regular expression"),
        ("[[rules]]\nname = 'a'\nstudy_description = 3", "rule 'a': study_description: must be a regular expression string"),
        ("[[rules]]\nname = 'a'\nseries_description = ''", "rule 'a': series_description: must be a non-empty regular expression"),
        (f"[[rules]]\nname = 'a'\nstation = '{'x' * 600}'", "rule 'a': station: is longer than 512 characters"),
        ("[[rules]]\nmodality = 'CT'", "rule #1: name: every rule needs a name"),
        ("[[rules]]\nname = 'has space'", "rule 'has space': name: 'has space' must be 1-64 letters"),
        ("[[rules]]\nname = 'a'\n[[rules]]\nname = 'a'", "rule 'a': name: used by an earlier rule too"),
        ("[[rules]]\nname = 'a'\naction = 'delete'", "rule 'a': action: 'delete' must be one of caption, skip"),
        ("[[rules]]\nname = 'a'\naction = 'skip'\nmodel = 'x'", "rule 'a': action: a skip rule captions nothing"),
        ("[[rules]]\nname = 'a'\nmodel = 'neuro'", "rule 'a': model: 'neuro' is not defined in [models] (known: default)"),
        ("[[rules]]\nname = 'a'\nmodality = []", "rule 'a': modality: must list at least one value"),
        ("[[rules]]\nname = 'a'\nmodality = [1]", "rule 'a': modality: must be a string or a list of strings"),
        ("[[rules]]\nname = 'a'\nmin_instances = -1", "rule 'a': min_instances: must be a whole number of at least 0"),
        ("[[rules]]\nname = 'a'\nmin_instances = true", "rule 'a': min_instances: must be a whole number"),
        ("[[rules]]\nname = 'a'\nmin_instances = 5\nmax_instances = 2", "rule 'a': max_instances: 2 is below min_instances 5"),
        ("[[rules]]\nname = 'a'\ndestinations = 'X@h:1'", "rule 'a': destinations: must be a list of destinations"),
        ("[[rules]]\nname = 'a'\ndestinations = ['']", "rule 'a': destinations: every destination must be a non-empty string"),
        ("rules = 'x'", "rules: the file needs at least one [[rules]] table"),
        ("", "rules: the file needs at least one [[rules]] table"),
        ("[[rule]]\nname = 'a'", "unknown field 'rule' (did you mean 'rules'?)"),
        ("[models]\ndefault = '/x'\n[[rules]]\nname = 'a'", "models.default: /x is not a MedCap checkpoint directory"),
        ("[models]\nneuro = '/nonexistent'\n[[rules]]\nname = 'a'", "models.neuro: /nonexistent is not a MedCap checkpoint directory"),
        ("[[rules]\nname = 'a'", "not valid TOML"),
    ],
)
def test_errors_name_the_file_the_rule_and_the_field(text, message):
    with pytest.raises(RoutingError) as raised:
        rules(text)
    assert str(raised.value).startswith("rules.toml: ")
    assert message in str(raised.value)


def test_default_cannot_be_redefined_as_a_named_model(tiny_model):
    with pytest.raises(RoutingError, match="'default' is MEDCAP_MODEL and cannot be redefined"):
        rules(f"[models]\ndefault = '{tiny_model}'\n[[rules]]\nname = 'a'")


def test_model_directories_are_relative_to_the_rule_file(tmp_path, tiny_model):
    (tmp_path / "rules.toml").write_text(f"[models]\nneuro = '{tiny_model.name}'\n[[rules]]\nname = 'a'\nmodel = 'neuro'\n")
    moved = tmp_path / tiny_model.name
    moved.mkdir()
    (moved / "config.json").write_text((tiny_model / "config.json").read_text())
    assert routing.load(tmp_path / "rules.toml").models == {"neuro": moved.resolve()}


def test_load_checks_destinations_and_reports_unreadable_files(tmp_path):
    path = tmp_path / "rules.toml"
    path.write_text("[[rules]]\nname = 'to-ris'\ndestinations = ['PACS@127.0.0.1:104', 'mllp://ris:2575']\n")

    def only_dicom(destination: str) -> None:
        if "@" not in destination:
            raise ValueError(f"destination {destination!r} is not one of any output kind's (dicom-sr)")

    with pytest.raises(RoutingError, match=r"rule 'to-ris': destinations: destination 'mllp://ris:2575' is not one of any"):
        routing.load(path, check_destination=only_dicom)
    with pytest.raises(RoutingError, match="cannot read the rule file"):
        routing.load(tmp_path / "missing.toml")
    path.write_bytes(b"\xff\xfe[[rules]]")
    with pytest.raises(RoutingError, match="cannot read the rule file"):
        routing.load(path)


def test_a_rule_file_is_data_a_value_that_looks_like_code_is_only_a_pattern(tmp_path):
    """No value is evaluated: a would-be payload is a regular expression that matches its own text."""
    marker = tmp_path / "pwned"
    parsed = rules(f"[[rules]]\nname = 'a'\nseries_description = '''__import__('os').system('touch {marker}')'''\n")
    assert parsed.rules[0].match.series_description is not None
    assert parsed.decide(HEAD_CT).rule == routing.NO_RULE and not marker.exists()


def test_typed_constructors_fail_fast_naming_the_field():
    with pytest.raises(ValueError, match="SeriesFacts.series_uid"):
        SeriesFacts("")
    with pytest.raises(ValueError, match="Decision.model is set exactly when"):
        routing.Decision("1.2", "a", RuleAction.SKIP, "why", model="default")
    with pytest.raises(ValueError, match="^name: "):
        Rule("")
    with pytest.raises(ValueError, match="max_instances: 1 is below min_instances 2"):
        Match(min_instances=2, max_instances=1)


# -- matching ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("match", "miss"),
    [
        (Match(modality=frozenset({"mr"})), "modality: modality CT is not one of MR"),
        (Match(body_region=frozenset({"CHEST"})), "body_region: body region HEAD is not one of CHEST"),
        (Match(study_description=Pattern("chest")), "study_description: 'CT HEAD W/O CONTRAST' does not match /chest/"),
        (Match(series_description=Pattern("^scout")), "series_description: 'Axial 5mm' does not match /^scout/"),
        (Match(calling_ae=frozenset({"OUTSIDE"})), "calling_ae: calling AE title PACS1 is not one of OUTSIDE"),
        (Match(institution=Pattern("county")), "institution: 'General Hospital' does not match /county/"),
        (Match(station=Pattern("^MR")), "station: 'CT4' does not match /^MR/"),
        (Match(min_instances=29), "min_instances: 28 instances, fewer than 29"),
        (Match(max_instances=27), "max_instances: 28 instances, more than 27"),
    ],
)
def test_each_criterion_matches_its_fact_and_says_why_not(match, miss):
    assert match.misses(HEAD_CT) == [miss]
    # the same criterion, met: sets and patterns ignore case, counts are inclusive
    met = {
        "modality": Match(modality=frozenset({"ct", "MR"})),
        "body_region": Match(body_region=frozenset({"head"})),
        "study_description": Match(study_description=Pattern("head")),
        "series_description": Match(series_description=Pattern("AXIAL")),
        "calling_ae": Match(calling_ae=frozenset({"pacs1"})),
        "institution": Match(institution=Pattern("general")),
        "station": Match(station=Pattern("^ct4$")),
        "min_instances": Match(min_instances=28),
        "max_instances": Match(max_instances=28),
    }[miss.split(":")[0]]
    assert met.misses(HEAD_CT) == []


def test_a_series_without_the_value_does_not_meet_a_criterion_on_it():
    bare = SeriesFacts("1.2.3.9", modality="CT")
    match = Match(body_region=frozenset({"HEAD"}), series_description=Pattern("."), calling_ae=frozenset({"PACS1"}), station=Pattern("."))
    assert match.misses(bare) == [
        "body_region: body region none is not one of HEAD",
        "series_description: the series has none",
        "calling_ae: calling AE title none is not one of PACS1",
        "station: the series has none",
    ]
    assert Match().misses(bare) == []  # no criteria: every series


def test_all_criteria_of_a_rule_must_hold():
    rule = Match(modality=frozenset({"CT"}), body_region=frozenset({"CHEST"}), min_instances=1)
    assert rule.misses(HEAD_CT) == ["body_region: body region HEAD is not one of CHEST"]


def test_body_region_reads_body_part_examined_and_the_anatomic_region_sequence():
    header = Dataset()
    assert routing.body_region(header) == frozenset()
    header.BodyPartExamined = "HEAD"
    region = Dataset()
    region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning = "T-D1100", "SRT", "Head"
    region2 = Dataset()
    region2.CodeValue, region2.CodingSchemeDesignator, region2.CodeMeaning = "69536005", "SCT", "Brain"
    header.AnatomicRegionSequence = [region, region2]
    assert routing.body_region(header) == {"HEAD", "T-D1100", "69536005", "BRAIN"}
    real = pydicom.dcmread(series_files("ct-phantom-philips")[0], stop_before_pixels=True)
    assert routing.body_region(real) == {"BRAIN"}


def test_the_first_matching_rule_decides_and_explain_says_why_the_others_did_not():
    parsed = rules(
        """
        [[rules]]
        name = "mr-only"
        modality = "MR"
        [[rules]]
        name = "outside-studies"
        action = "skip"
        calling_ae = ["OUTSIDE"]
        [[rules]]
        name = "heads"
        body_region = "HEAD"
        destinations = []
        [[rules]]
        name = "everything"
        """
    )
    explained = parsed.explain(HEAD_CT)
    d = explained.decision
    assert (d.rule, d.action, d.model, d.destinations, d.reason) == ("heads", RuleAction.CAPTION, "default", (), "captioned by rule heads")
    assert [(o.rule, o.matched, o.considered, o.misses) for o in explained.outcomes] == [
        ("mr-only", False, True, ("modality: modality CT is not one of MR",)),
        ("outside-studies", False, True, ("calling_ae: calling AE title PACS1 is not one of OUTSIDE",)),
        ("heads", True, True, ()),
        ("everything", True, False, ()),  # would match, but "heads" decided first
    ]
    outside = SeriesFacts("1.2.3.2", modality="CT", calling_ae_titles=frozenset({"OUTSIDE"}))
    assert parsed.decide(outside).rule == "outside-studies" and not parsed.decide(outside).captioned


def test_a_series_no_rule_matches_is_skipped():
    parsed = rules("[[rules]]\nname = 'mr'\nmodality = 'MR'\n")
    decision = parsed.decide(HEAD_CT)
    assert (decision.rule, decision.action, decision.model, decision.reason) == (routing.NO_RULE, RuleAction.SKIP, None, "no rule matched")


def test_the_default_captions_every_ct_and_mr_series_with_the_configured_model_and_destinations():
    default = routing.default()
    assert default.source == "built-in default" and not default.reads_headers
    for modality in ("CT", "MR", "ct"):
        decision = default.decide(SeriesFacts("1.2", modality=modality, instance_count=1))
        assert (decision.captioned, decision.model, decision.destinations) == (True, "default", None)
    assert not default.decide(SeriesFacts("1.2", modality="OT")).captioned
    assert routing.describe(default) == ["1. default: modality=CT,MR -> caption with default, SR to configured destinations"]


def test_rules_read_headers_only_when_a_criterion_needs_them():
    assert not rules("[[rules]]\nname = 'a'\nmodality = 'CT'\nseries_description = 'x'\ncalling_ae = 'P'\nmin_instances = 3").reads_headers
    for criterion in ("body_region = 'HEAD'", "institution = 'x'", "station = 'x'"):
        assert rules(f"[[rules]]\nname = 'a'\n{criterion}").reads_headers


def test_the_example_rule_file_in_docs_is_valid():
    example = Path(__file__).resolve().parents[2] / "docs" / "routing.example.toml"
    parsed = routing.load(example)
    assert [r.name for r in parsed.rules][:2] == ["no-scouts-or-dose-reports", "outside-studies"]
    assert json.dumps(routing.describe(parsed))  # prints


def test_a_pattern_that_backtracks_without_end_is_stopped_and_named_not_left_to_hang():
    import time

    parsed = rules("[[rules]]\nname = 'slow'\nseries_description = '(a|aa)+$'\n[[rules]]\nname = 'fine'\n")
    started = time.monotonic()
    with pytest.raises(RoutingError) as raised:
        parsed.decide(SeriesFacts("1.2", modality="CT", series_description="a" * 60 + "!"))
    assert time.monotonic() - started < 5
    assert str(raised.value).startswith("rules.toml: rule 'slow': series_description: /(a|aa)+$/ took longer than 0.1 s on 'aaaa")
    assert parsed.decide(SeriesFacts("1.2", modality="CT", series_description="aaaa")).rule == "slow"  # an ordinary value: fine


def test_patterns_use_the_re_syntax_searched_and_case_insensitive():
    assert Pattern(r"^t1_\w+ \d{1,2}mm$").search("T1_GRE 5mm")
    assert Pattern("gre").search("T1_GRE 5mm") and not Pattern("^gre").search("T1_GRE 5mm")
    assert Pattern(r"(?P<plane>sag|cor)").search("t1 SAG") and not Pattern("x").search(None)
