"""The caption task's routing: the rule file read once per worker process, named models loaded once each."""

from __future__ import annotations

import pytest

from workers import tasks
from workers.drafting import PermanentJobError


@pytest.fixture
def fresh_process(monkeypatch):
    """The per-process caches of workers/tasks.py as a newly started worker has them."""
    monkeypatch.setattr(tasks, "_rules", None)
    monkeypatch.setattr(tasks, "_named", {})


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_worker_reads_the_rules_once_and_loads_each_named_model_once(fresh_process, make_settings, tmp_path, tiny_model):
    path = tmp_path / "rules.toml"
    path.write_text(f"[models]\nsmall = '{tiny_model}'\n[[rules]]\nname = 'all'\nmodel = 'small'\n")
    settings = make_settings(routing_rules=path)
    rules = tasks.routing_rules(settings)
    assert [r.name for r in rules.rules] == ["all"] and rules.source == str(path)
    path.write_text("[[rules]]\nname = 'changed'\n")  # read at start: a change needs a restart
    assert tasks.routing_rules(settings) is rules
    first = tasks.named_model(settings, "small")
    assert tasks.named_model(settings, "small") is first
    assert first.identity.model_type == "msmedcap"


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_rule_file_broken_after_start_up_fails_the_job_naming_it(fresh_process, make_settings, tmp_path):
    path = tmp_path / "rules.toml"
    path.write_text("[[rules]]\nname = 'a'\nmodel = 'gone'\n")
    with pytest.raises(PermanentJobError, match=r"routing rules: .*rules.toml: rule 'a': model: 'gone' is not defined in \[models\]"):
        tasks.routing_rules(make_settings(routing_rules=path))
    assert tasks.routing_rules(make_settings()).source == "built-in default"
