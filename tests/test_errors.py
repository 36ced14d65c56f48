"""The error hierarchy (pipelines/core/errors.py): one base, four kinds, one parent per class,
and `permanent` deciding what a DAG step's retry does."""
from __future__ import annotations

import ast
import json
import pathlib

import pytest

from pipelines.core import errors
from pipelines.core.errors import (BadArtifactError, BadInputError, CatalogSearchError,
                                   RefusedError, UnavailableError)

ROOT = pathlib.Path(__file__).resolve().parents[1]
KINDS = {"BadInputError", "BadArtifactError", "UnavailableError", "RefusedError"}
#: Carriers that never reach a user as an error: a fetch failure becomes a dead-letter reason,
#: ApiError is an HTTP answer, DeadlineExceeded is asyncio's TimeoutError for one read.
OUTSIDE = {"FetchError", "ApiError", "DeadlineExceeded"}


def _error_classes() -> dict[str, tuple[str, list[str]]]:
    found: dict[str, tuple[str, list[str]]] = {}
    for package in ("pipelines", "serving", "catalog_search", "dags"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ClassDef) and (
                        node.name.endswith("Error") or node.name == "DeadlineExceeded"):
                    bases = [ast.unparse(b) for b in node.bases]
                    found[node.name] = (str(path.relative_to(ROOT)), bases)
    return found


def test_every_error_class_has_one_parent_in_the_hierarchy():
    classes = _error_classes()
    for name, (where, bases) in classes.items():
        if where == "pipelines/core/errors.py" or name in OUTSIDE:
            continue
        assert len(bases) == 1, f"{where}: {name}({', '.join(bases)}) has two parents"
        parent = bases[0].split(".")[-1]
        assert parent in KINDS or parent == "CatalogSearchError" or parent in classes, \
            f"{where}: {name} derives from {bases[0]}, outside the hierarchy"


def test_each_kind_keeps_its_builtin_parent():
    assert issubclass(BadInputError, ValueError) and issubclass(BadArtifactError, ValueError)
    assert issubclass(UnavailableError, RuntimeError) and issubclass(RefusedError, RuntimeError)
    assert BadInputError.permanent and RefusedError.permanent
    assert not BadArtifactError.permanent and not UnavailableError.permanent
    assert not CatalogSearchError.permanent


def test_source_and_field_are_named_first():
    e = BadArtifactError("expected int, got 'x'", "s/summary.json", "input_rows")
    assert str(e) == "s/summary.json: field 'input_rows': expected int, got 'x'"
    assert (e.source, e.field) == ("s/summary.json", "input_rows")
    assert str(errors.BadInputError("plain")) == "plain"


def test_permanent_errors_are_the_ones_a_retry_cannot_fix():
    from pipelines.adapter.artifact import AdapterError
    from pipelines.core.config import ConfigError
    from pipelines.core.contract import ContractError
    from pipelines.core.locks import RunLockedError
    from pipelines.duplicates.job import DuplicatesError
    from pipelines.embed.job import DeadLetterRateError, EmbedError
    from pipelines.embed.manifest import ManifestError
    from pipelines.embed.summary import SnapshotError, SummaryError
    from pipelines.index.build import IndexBuildError, RecallGateError
    from pipelines.index.deltas import DeltaError, DeltaIntegrityError
    from pipelines.index.manifest import (IndexArtifactError, IndexIntegrityError,
                                          ManifestFormatError)
    from pipelines.index.takedowns import TakedownError
    from pipelines.model.resolve import ModelError
    from pipelines.orchestration.errors import OrchestrationError, PermanentStepError, StepError
    from pipelines.orchestration.plan import PlanFormatError
    permanent = [OrchestrationError, PlanFormatError, PermanentStepError, ConfigError,
                 ManifestError, ModelError, SnapshotError, SummaryError, EmbedError,
                 DeadLetterRateError, IndexBuildError, RecallGateError, DuplicatesError,
                 DeltaError, DeltaIntegrityError, TakedownError]
    retried = [StepError, RunLockedError, ContractError, IndexArtifactError,
               IndexIntegrityError, ManifestFormatError, AdapterError]
    assert [c.__name__ for c in permanent if not c.permanent] == []
    assert [c.__name__ for c in retried if c.permanent] == []


def test_the_dags_fail_permanent_kinds_without_retry():
    from pipelines.orchestration.params import task_defaults
    rule = task_defaults()["retry_policy"].rules[0]
    from pipelines.orchestration.errors import OrchestrationError, PermanentStepError, StepError
    assert rule.matches(PermanentStepError("x")) and rule.matches(OrchestrationError("x"))
    assert rule.matches(RefusedError("x")) and rule.matches(BadInputError("x"))
    assert not rule.matches(StepError("x")) and not rule.matches(BadArtifactError("x"))


@pytest.mark.parametrize("error,rc", [("permanent", 3), ("retried", None)])
def test_a_step_subprocess_exits_3_only_for_a_permanent_error(tmp_path, monkeypatch, error,
                                                             rc):
    from pipelines.index.manifest import IndexIntegrityError
    from pipelines.orchestration import launcher
    from pipelines.orchestration.errors import OrchestrationError

    def fail(step, payload):
        if error == "permanent":
            raise OrchestrationError("bad params")
        raise IndexIntegrityError("shard 0 changed")

    monkeypatch.setattr(launcher, "_run_step", fail)
    inp, out = tmp_path / "in.json", tmp_path / "out.json"
    inp.write_text("{}")
    argv = [launcher.EMBED_STEP, "--input", str(inp), "--output", str(out)]
    if rc is None:
        with pytest.raises(IndexIntegrityError):
            launcher.main(argv)
        assert not out.exists()
        return
    assert launcher.main(argv) == rc
    result = json.loads(out.read_text())
    assert result == {"ok": False, "error": "bad params", "error_type": "OrchestrationError"}
