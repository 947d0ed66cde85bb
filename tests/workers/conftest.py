"""The workers' tests use the pipeline helpers in tests/pipeline.py and the fixtures in tests/conftest.py."""

from tests.pipeline import CT, MR, make_drafter, runner

__all__ = ["CT", "MR", "make_drafter", "runner"]
