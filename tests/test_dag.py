"""The pipeline DAG: validation errors, order, and the built-in pipelines."""

from __future__ import annotations

import pytest

from qpipe.dag import PipelineError, load_dag, parse_dag


def test_order_follows_dependencies_not_yaml_order() -> None:
    dag = parse_dag(
        {
            "stages": {
                "benchmark": {"needs": ["load"]},
                "load": {"needs": ["env_check"]},
                "env_check": {},
            }
        }
    )
    assert dag.order == ["env_check", "load", "benchmark"]
    assert dag.upstream("benchmark") == ["env_check", "load"]


def test_cycle_is_reported_with_its_stages() -> None:
    with pytest.raises(PipelineError, match="cycle.*load.*quantize"):
        parse_dag({"stages": {"quantize": {"needs": ["load"]}, "load": {"needs": ["quantize"]}}})


def test_missing_dependency_names_it() -> None:
    with pytest.raises(PipelineError, match=r"needs \['pad_align'\]"):
        parse_dag({"stages": {"quantize": {"needs": ["pad_align"]}}})


def test_unknown_stage_lists_known_ones() -> None:
    with pytest.raises(PipelineError, match="unknown stage code 'quantise'.*quantize"):
        parse_dag({"stages": {"quantise": {}}})


def test_unknown_key_is_rejected() -> None:
    with pytest.raises(PipelineError, match="unknown keys"):
        parse_dag({"stages": {"env_check": {"need": []}}})


def test_uses_lets_a_node_reuse_stage_code() -> None:
    dag = parse_dag({"stages": {"check": {"uses": "env_check"}}})
    assert dag.stages["check"].module == "qpipe.stages.env_check"


def test_builtin_pipelines() -> None:
    default = load_dag("default")
    assert default.order[0] == "env_check" and default.order[-1] == "benchmark"
    for stage in (
        "memory_budget",
        "exclude_layers",
        "pad_align",
        "quantize",
        "load",
        "validate_vram",
    ):
        assert stage in default.order
    assert load_dag("estimate").order == ["env_check", "memory_budget"]
    # fit: the default's memory stages, in the same order, without quality and speed
    fit = load_dag("fit").order
    assert fit == [s for s in default.order if s not in ("baseline", "benchmark")]
    with pytest.raises(
        PipelineError, match="not found in ./pipelines or the built-ins; known: default"
    ):
        load_dag("nope")
