"""quant=auto's planner and exclude.by=sensitivity, on meta-device models (no weights)."""

from __future__ import annotations

import itertools
import random

import pytest
from omegaconf import OmegaConf

from qpipe.app import run_pipeline
from qpipe.backends import get_backend, weight_format_of
from qpipe.errors import ConfigError, DoesNotFit
from qpipe.evaluation.layer_kl import prior_sensitivity
from qpipe.memory import Workload, arch_dims, build_inventory
from qpipe.memory.bitplan import layer_bytes, plan_for_budget, solve_knapsack
from qpipe.memory.exclusion import plan_precision, validate_exclude
from qpipe.models import load_config
from qpipe.preflight import validate_config
from tests.conftest import compose_config

GB = 1e9


def _auto(**over) -> dict:
    cfg = compose_config("quant=auto")
    return {**OmegaConf.to_container(cfg.quant, resolve=True), **over}


def _setup(model: str = "tiny_llama"):
    cfg = compose_config(f"model={model}", "quant=auto")
    config = load_config(cfg.model)
    inventory = build_inventory(config, cfg.model.model_class)
    return cfg, inventory, arch_dims(config)


def _reserve_gb(dims) -> float:
    """The caching allocator's reserve the estimate adds on a GPU for this workload: the
    budgets below were chosen before it was priced, so they are given on top of it."""
    from qpipe.memory.estimator import activation_bytes, allocator_reserve_bytes

    act = activation_bytes(dims, Workload(batch_size=1, context_len=256), 2)
    return allocator_reserve_bytes(act, "cuda") / GB


def _plan(inventory, dims, usable_gb, sensitivity=None, exclude=None, quant=None):
    usable_gb += _reserve_gb(dims)
    exclude = exclude or {"lm_head": True, "embeddings": True, "patterns": []}
    rules = plan_precision(inventory, exclude, quantize=True)
    table = sensitivity or prior_sensitivity(inventory, rules.targets)
    quant = quant or _auto()
    return rules, plan_for_budget(
        inventory,
        rules,
        table,
        "test",
        quant,
        weight_format_of(quant, 2, "cuda"),
        dims,
        Workload(batch_size=1, context_len=256),
        2,
        0.5,
        usable_gb,
    )


def test_knapsack_is_optimal_and_never_overshoots() -> None:
    rng = random.Random(0)
    for _ in range(30):
        names = [f"l{i}" for i in range(5)]
        costs = {n: {4: c, 8: 2 * c + 7, 16: 4 * c} for n in names for c in [rng.randint(50, 500)]}
        losses = {n: {4: rng.random(), 8: rng.random() * 0.1, 16: 0.0} for n in names}
        budget = rng.randint(sum(c[4] for c in costs.values()), sum(c[16] for c in costs.values()))
        got = solve_knapsack(costs, losses, budget, resolution=100_000)
        assert sum(costs[n][b] for n, b in got.items()) <= budget
        best = min(
            sum(losses[n][b] for n, b in zip(names, pick, strict=True))
            for pick in itertools.product((4, 8, 16), repeat=len(names))
            if sum(costs[n][b] for n, b in zip(names, pick, strict=True)) <= budget
        )
        assert sum(losses[n][b] for n, b in got.items()) == pytest.approx(best)
    assert solve_knapsack({"a": {4: 10, 8: 20}}, {"a": {4: 1.0, 8: 0.0}}, 9) is None


def test_plan_fits_every_budget_and_uses_more_bits_when_there_is_room() -> None:
    _, inventory, dims = _setup()
    rules, (low_bits, low_plan, low_est) = _plan(inventory, dims, 0.554)
    _, (high_bits, _, high_est) = _plan(inventory, dims, 0.557)
    for bits, est, usable in ((low_bits, low_est, 0.554), (high_bits, high_est, 0.557)):
        assert est.total_gb <= usable + _reserve_gb(dims)
        assert set(bits.bits) == set(rules.targets)
        # The estimate of the carried-out plan is the planner's own arithmetic.
        assert bits.planned_bytes + bits.fixed_bytes == pytest.approx(est.total_gb * GB, abs=2)
    assert sum(high_bits.bits.values()) > sum(low_bits.bits.values())
    assert high_bits.predicted_loss < low_bits.predicted_loss
    assert low_plan.targets and all(low_plan.bits[n] in (4, 8) for n in low_plan.targets)
    with pytest.raises(DoesNotFit, match="even 4-bit everywhere"):
        _plan(inventory, dims, 0.5)


def test_plan_respects_exclusions_and_prefers_sensitive_layers() -> None:
    _, inventory, dims = _setup()
    exclude = {"lm_head": True, "embeddings": True, "patterns": [r"layers\.0\.mlp"]}
    rules = plan_precision(inventory, exclude, quantize=True)
    table = {n: {"kl": 1e-4, "noise_ratio_8": 0.004, "numel": 1.0} for n in rules.targets}
    hot = "model.layers.2.self_attn.o_proj"
    table[hot] = {"kl": 5.0, "noise_ratio_8": 0.004, "numel": 1.0}
    _, (bits, plan, est) = _plan(inventory, dims, 0.555, table, exclude)
    assert not any("layers.0.mlp" in n or "lm_head" in n for n in bits.bits)
    assert all(n not in plan.targets for n in rules.skip)
    assert bits.bits[hot] == 16  # the only layer whose loss matters gets the most bits
    assert plan.skip[hot] == "quant=auto: kept at 16"
    assert 4 in bits.bits.values()  # ...while the budget forces others down to 4 bits


def test_weights_cap_binds_below_the_card() -> None:
    _, inventory, dims = _setup()
    free = _plan(inventory, dims, 80.0)[1]
    assert set(free[0].bits.values()) == {16}  # a big card: nothing needs rounding
    capped = _plan(inventory, dims, 80.0, quant=_auto(weights_gb=0.054))[1]
    assert capped[2].weights_gb <= 0.054 and set(capped[0].bits.values()) != {16}


def test_layer_bytes_match_the_estimator() -> None:
    q = _auto(algorithm="rtn", act_order="none")
    two, four = weight_format_of(q, 2, "cuda"), weight_format_of(q, 4, "cuda")
    assert layer_bytes((576, 1536), 0, 16, two, 2) == 576 * 1536 * 2
    # [out 576, in 1536], groups of 64: payload + a scale (run's dtype) and a uint8 zero per group
    assert layer_bytes((576, 1536), 0, 8, two, 2) == 576 * 1536 + 576 * 24 * 3
    assert layer_bytes((576, 1536), 0, 4, four, 4) == 576 * 1536 // 2 + 576 * 24 * 5
    gptq = weight_format_of({**q, "algorithm": "gptq", "act_order": "group"}, 2, "cuda")
    assert layer_bytes((576, 1536), 5, 4, gptq, 2) == (
        576 * 1536 // 2 + 576 * 24 * 3 + 1536 * 4 + 5 * 2
    )


@pytest.mark.parametrize("card", ["rtx4060_8gb", "rtx3060_12gb", "t4_16gb"])
def test_internvl_plans_for_8_12_16_gb_cards_each_fit(card, tmp_path) -> None:
    cfg = compose_config(
        "+model=internvl",
        "model.weights=random",
        "+quant=auto",
        "pipeline=estimate",
        f"hardware={card}",
    )
    report = run_pipeline(cfg, tmp_path / "run")
    assert report.status == "FINISHED", report.error
    out = report.results["memory_budget"].outputs
    assert out["fits"] and out["estimate"]["total_gb"] <= out["usable_gb"]
    plan = out["bit_plan"]
    assert plan["sensitivity_source"] == "prior"
    assert plan["planned_bytes"] + plan["fixed_bytes"] <= plan["budget_bytes"]
    # Vision tower, projector, lm_head stay out of the plan (name rules).
    assert not any("vision" in n or "projector" in n or "lm_head" in n for n in plan["bits"])
    assert len(plan["bits"]) == 36 * 7
    names = {p.name for p in report.results["memory_budget"].artifacts}
    assert {"bit_plan.md", "bit_plan.png"} <= names


def test_bigger_cards_get_more_bits(tmp_path) -> None:
    mean_bits = []
    for card in ("rtx4060_8gb", "t4_16gb"):
        cfg = compose_config(
            "+model=internvl",
            "model.weights=random",
            "+quant=auto",
            "pipeline=estimate",
            f"hardware={card}",
        )
        out = run_pipeline(cfg, tmp_path / card).results["memory_budget"].outputs
        bits = out["bit_plan"]["bits"]
        mean_bits.append(sum(bits.values()) / len(bits))
    assert mean_bits[1] > mean_bits[0]


def test_keep_top_k_and_budget_keep_the_most_sensitive_layers() -> None:
    _, inventory, _ = _setup()
    base = {"lm_head": True, "embeddings": True, "patterns": [], "by": "sensitivity"}
    rules = plan_precision(inventory, {**base, "by": "rules"}, quantize=True)
    table = {n: {"kl": float(i)} for i, n in enumerate(rules.targets)}  # last = most sensitive
    top2 = plan_precision(inventory, {**base, "keep_top_k": 2}, True, table)
    assert set(rules.targets) - set(top2.targets) == set(rules.targets[-2:])
    assert top2.skip[rules.targets[-1]].startswith("exclude.by=sensitivity: rank 1")
    # A budget of one o_proj (256x256 fp32) keeps the most sensitive layers that fit in it.
    one = plan_precision(inventory, {**base, "keep_budget_gb": 256 * 256 * 4 / GB}, True, table, 4)
    kept = set(rules.targets) - set(one.targets)
    assert len(kept) == 1 and next(iter(kept)).endswith(("o_proj", "q_proj"))
    with pytest.raises(ConfigError, match="needs the sensitivity stage"):
        plan_precision(inventory, {**base, "keep_top_k": 2}, True, None)


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"choices": [16, 3]}, "quant.choices"),
        ({"algorithm": "awq"}, "quant.algorithm"),
        ({"weights_gb": -1}, "quant.weights_gb"),
        ({"bits": 8}, "quant.bits=8 must be the lowest"),
    ],
)
def test_bad_auto_values_are_one_line_errors(over, message) -> None:
    with pytest.raises(ConfigError, match=message):
        get_backend("auto").validate(_auto(**over))


def test_bad_exclude_values_are_one_line_errors() -> None:
    with pytest.raises(ConfigError, match="exclude.by='size'"):
        validate_exclude({"by": "size"})
    with pytest.raises(ConfigError, match="set exclude.by=sensitivity"):
        validate_exclude({"by": "rules", "keep_top_k": 3})
    with pytest.raises(ConfigError, match="exclude.keep_top_k"):
        validate_config(compose_config("exclude.by=sensitivity", "exclude.keep_top_k=-1"))


def test_mixed_plan_recipe_has_a_config_group_per_bit_width() -> None:
    from qpipe.backends.llmc import build_recipe
    from qpipe.backends.mixed import inner_quant

    auto = _auto(algorithm="rtn")
    get_backend("auto").validate(auto)
    inner = inner_quant(auto)
    assert inner["method"] == "rtn" and not {"act_order", "choices", "weights_gb"} & set(inner)
    bits = {
        "model.layers.0.mlp.down_proj": 8,
        "model.layers.1.mlp.down_proj": 4,
        "model.layers.0.self_attn.q_proj": 4,
    }
    recipe = build_recipe(inner, list(bits), ["lm_head"], None, bits=bits)
    groups = recipe["quant_stage"]["quant_modifiers"]["QuantizationModifier"]["config_groups"]
    by_bits = {g["weights"]["num_bits"]: g["targets"] for g in groups.values()}
    assert by_bits[8] == ["model.layers.0.mlp.down_proj"]
    assert "model.layers.1.mlp.down_proj" in by_bits[4] and len(by_bits[4]) == 2
    assert all(g["weights"]["group_size"] == 64 for g in groups.values())
