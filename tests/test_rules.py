"""``Rule`` validation (each bad rule fails at construction naming the field), LightningCLI YAML, and
the pure ``RuleEngine``: bounds, wildcards, z-score windows and warm-up, patience, state round trip,
plus the NaN localisation of ``diagnosis`` against hand-built cases."""

from __future__ import annotations

import dataclasses
import math
import random
import statistics
from pathlib import Path
from typing import Any

import pytest
from expected_warnings import RULE_TRIPS
from faults import FaultNet, fit_steps
from reference import callback_from_cli_config

from lightning_gradwatch import GradientFlowCallback, Rule
from lightning_gradwatch.governance import (
    SCALER_NONFINITE_PATIENCE,
    RuleEngine,
    strongest,
)
from lightning_gradwatch.measure.nonfinite import locate_nonfinite

# -- validation ----------------------------------------------------------------------------------

pytestmark = RULE_TRIPS


@pytest.mark.parametrize(
    ("kwargs", "error", "field"),
    [
        ({"metric": "grad_norm_total", "max": 1.0, "action": "explode"}, ValueError, "action"),
        ({"metric": "grad_norm_total"}, ValueError, "min"),  # neither bound nor zscore
        ({"metric": "grad_norm_total", "max": 5.0, "action": "clip"}, ValueError, "clip_to"),
        (
            {"metric": "grad_norm_total", "max": 5.0, "action": "clip", "clip_to": -1.0},
            ValueError,
            "clip_to",
        ),
        ({"metric": "grad_norm_total", "zscore": 3.0, "window": -5}, ValueError, "window"),
        ({"metric": "grad_norm_total", "zscore": 3.0, "window": 1}, ValueError, "window"),
        ({"metric": "grad_norm_total", "zscore": -3.0}, ValueError, "zscore"),
        ({"metric": "grad_norm_total", "max": 1.0, "patience": 0}, ValueError, "patience"),
        ({"metric": "grad_norm_total", "max": 1.0, "patience": 1.5}, TypeError, "patience"),
        ({"metric": "grad_norm_total", "min": 2.0, "max": 1.0}, ValueError, "min"),
        ({"metric": "grad_norm_total", "max": "big"}, TypeError, "max"),
        ({"metric": "grad_norm_total", "max": 1.0, "clip_mode": "abs"}, ValueError, "clip_mode"),
        ({"metric": "", "max": 1.0}, ValueError, "metric"),
        ({"metric": None, "max": 1.0}, TypeError, "metric"),
        ({"metric": "nonfinite", "max": 1.0}, ValueError, "nonfinite"),
        ({"metric": "nonfinite", "action": "clip", "clip_to": 1.0}, ValueError, "clip"),
        (
            {"metric": "grad_norm_total", "zscore": 3.0, "window": 10, "warmup": 11},
            ValueError,
            "warmup",
        ),
    ],
)
def test_bad_rules_fail_at_construction(kwargs: dict[str, Any], error: type, field: str) -> None:
    with pytest.raises(error, match=f"`?{field}`?"):
        Rule(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"metric": "grad_norm_total", "zscore": 2.5, "ema": 0.97, "window": 100},
            ValueError,
            r"`ema` .*`window`",
        ),
        ({"metric": "grad_norm_total", "zscore": 2.5, "ema": 1.0}, ValueError, r"`ema`.*\(0, 1\)"),
        ({"metric": "grad_norm_total", "zscore": 2.5, "ema": 0.0}, ValueError, r"`ema`.*\(0, 1\)"),
        ({"metric": "grad_norm_total", "zscore": 2.5, "ema": "0.9"}, TypeError, r"`ema`"),
        ({"metric": "grad_norm_total", "max": 5.0, "ema": 0.9}, ValueError, r"`ema`.*`zscore`"),
        (
            {"metric": "grad_norm/blocks.0", "zscore": 3.0, "action": "clip"},
            ValueError,
            r"adaptive clip.*`metric` must be one of \['grad_norm_total'\].*`clip_to`",
        ),
        ({"metric": "loss", "zscore": 3.0, "action": "clip"}, ValueError, r"`metric`.*'loss'"),
        (
            {"metric": "grad_norm_total", "zscore": 3.0, "action": "clip", "clip_mode": "value"},
            ValueError,
            r"adaptive clip.*`clip_mode`",
        ),
        (
            {"metric": "grad_norm_total", "zscore": 3.0, "min": 0.1, "action": "clip"},
            ValueError,
            r"adaptive clip.*`min`",
        ),
        (
            {"metric": "grad_norm_total", "max": 3.0, "action": "clip"},
            ValueError,
            r"`clip_to`.*`zscore`",
        ),
        ({"metric": "nonfinite", "window": 1.5}, TypeError, r"Rule on 'nonfinite': `window`"),
    ],
)
def test_bad_adaptive_and_ema_rules_name_the_arguments(
    kwargs: dict[str, Any], error: type, message: str
) -> None:
    with pytest.raises(error, match=message):
        Rule(**kwargs)


def test_the_documented_adaptive_and_loss_rules_construct() -> None:
    zclip = Rule("grad_norm_total", zscore=2.5, ema=0.97, warmup=25, action="clip")
    assert zclip.adaptive_clip and zclip.window is None and zclip.min_history == 25
    assert Rule("grad_norm_total", zscore=2.5, ema=0.97, action="clip").min_history == 25
    windowed = Rule("grad_norm_total", zscore=3.0, window=100, action="clip")
    assert windowed.adaptive_clip and windowed.min_history == 20
    assert not Rule("grad_norm_total", max=5.0, action="clip", clip_to=1.0).adaptive_clip
    olmo = Rule("loss", zscore=6.0, window=128, warmup=64, action="skip")
    assert olmo.checks_every_step and olmo.matches("loss") and olmo.min_history == 64
    # Patterns match logged keys only, never the loss; a loss rule matches nothing else.
    assert not Rule("*", max=1.0).matches("loss") and not olmo.matches("grad_norm_total")
    assert Rule("grad_norm_total", zscore=6.0, window=128, warmup=64, action="skip").window == 128
    assert Rule("grad_norm_total", zscore=3.0).window == 100  # the default when no ema


def test_bad_rule_lists_fail_in_the_callback() -> None:
    with pytest.raises(TypeError, match="rules"):
        GradientFlowCallback(rules=[{"metric": "nonfinite"}])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="distinct names"):
        GradientFlowCallback(
            rules=[
                Rule("grad_norm_total", max=1.0, name="total"),
                Rule("grad_norm_total", min=0.0, name="total"),
            ]
        )
    with pytest.raises(ValueError, match="check_every_n_steps"):
        GradientFlowCallback(check_every_n_steps=0)
    # Two rules on one metric are fine with names.
    GradientFlowCallback(
        rules=[Rule("grad_norm_total", max=1.0), Rule("grad_norm_total", min=0.0, name="low")]
    )


def test_defaults() -> None:
    assert GradientFlowCallback().rules == [Rule("nonfinite", action="halt")]
    assert GradientFlowCallback(rules=[]).rules == []
    rule = Rule("grad_gain/*", max=2.0, patience=3, action="warn")
    assert rule.label == "grad_gain/*" and rule.matches("grad_gain/blocks.3")
    assert not rule.matches("grad_norm/blocks.3") and not rule.checks_every_step
    assert Rule("grad_norm_total", max=5.0, action="clip", clip_to=1.0).checks_every_step
    nonfinite = Rule("nonfinite", action="halt")
    assert nonfinite.effective_patience(False) == 1
    assert nonfinite.effective_patience(True) == SCALER_NONFINITE_PATIENCE
    assert Rule("nonfinite", action="halt", patience=2).effective_patience(True) == 2


def test_rules_from_lightning_cli_yaml(tmp_path: Path) -> None:
    config = {
        "trainer": {
            "accelerator": "cpu",
            "logger": False,
            "callbacks": [
                {
                    "class_path": "lightning_gradwatch.GradientFlowCallback",
                    "init_args": {
                        "require_logger": False,
                        "rules": [
                            {"metric": "nonfinite", "action": "halt"},
                            {
                                "metric": "grad_norm_total",
                                "max": 5.0,
                                "action": "clip",
                                "clip_to": 1.0,
                            },
                            {"metric": "grad_gain/*", "max": 2.0, "patience": 3},
                            {
                                "metric": "grad_norm_total",
                                "zscore": 6.0,
                                "window": 200,
                                "action": "skip",
                                "name": "spike",
                            },
                        ],
                    },
                }
            ],
        }
    }
    callback = callback_from_cli_config(tmp_path, config)
    assert callback.rules == [
        Rule("nonfinite", action="halt"),
        Rule("grad_norm_total", max=5.0, action="clip", clip_to=1.0),
        Rule("grad_gain/*", max=2.0, patience=3),
        Rule("grad_norm_total", zscore=6.0, window=200, action="skip", name="spike"),
    ]
    # A bad rule in YAML fails with the rule's own message.
    del config["trainer"]["callbacks"][0]["init_args"]["rules"][1]["clip_to"]  # type: ignore[index]
    with pytest.raises((SystemExit, ValueError)):
        callback_from_cli_config(tmp_path, config)


# -- engine --------------------------------------------------------------------------------------


def run(engine: RuleEngine, values: dict[str, float], step: int, **kwargs: Any) -> list[Any]:
    checks = engine.evaluate(values, nonfinite=kwargs.pop("nonfinite", False))
    return engine.commit(checks, [c.tripped for c in checks], step=step, **kwargs)


def test_bounds_wildcards_and_patience() -> None:
    engine = RuleEngine([Rule("grad_gain/*", max=2.0, patience=2, action="skip", name="gain")])
    ok = {"grad_gain/b1": 1.0, "grad_gain/b2": 1.5, "grad_norm_total": 100.0}
    bad = {"grad_gain/b1": 3.0, "grad_gain/b2": 2.5}
    assert run(engine, ok, 0) == []
    first = run(engine, bad, 1)
    assert [(d.action, d.consecutive) for d in first] == [("none", 1)]
    assert {v.key for v in first[0].check.violations} == {"grad_gain/b1", "grad_gain/b2"}
    assert first[0].check.worst.key == "grad_gain/b1"  # the furthest beyond the bound
    assert [(d.action, d.consecutive) for d in run(engine, bad, 2)] == [("skip", 2)]
    assert [(d.action, d.consecutive) for d in run(engine, bad, 3)] == [("skip", 3)]
    assert run(engine, ok, 4) == []  # a clean step resets patience
    assert [d.action for d in run(engine, bad, 5)] == ["none"]
    assert engine.counters() == {"grad_alerts/gain": 4.0}
    # NaN is never within bounds; rules whose metric is absent are not checked.
    assert run(engine, {"grad_gain/b1": math.nan}, 6)[0].check.worst.condition == "nonfinite"
    assert engine.evaluate({"grad_norm_total": 1.0}, nonfinite=False) == []


def test_zscore_window_warmup_and_accepted_values_only() -> None:
    rule = Rule("grad_norm_total", zscore=4.0, window=10, warmup=5, action="skip")
    engine = RuleEngine([rule])
    values = [1.0, 1.1, 0.9, 1.05, 0.95]
    # Warm-up: the first 5 values may not trip, however odd.
    for step, value in enumerate([*values[:4], 50.0]):
        assert run(engine, {"grad_norm_total": value}, step) == []
    window = engine.state_dict()["grad_norm_total"]["windows"]["grad_norm_total"]
    assert window == [*values[:4], 50.0]
    engine = RuleEngine([rule])
    for step, value in enumerate(values):
        run(engine, {"grad_norm_total": value}, step)
    mean, std = statistics.fmean(values), statistics.pstdev(values)
    spike = mean + 4.5 * std
    [decision] = run(engine, {"grad_norm_total": spike}, 5)
    assert decision.check.worst.zscore == pytest.approx(4.5)
    assert decision.check.worst.threshold == 4.0
    # The spike entered capped at the bound in force (mean + 4 std), not as itself; a value below
    # the band does not trip (spikes are upward).
    window = engine.statistics[0]["grad_norm_total"].values
    assert list(window)[:5] == values and window[5] == pytest.approx(mean + 4.0 * std)
    assert run(engine, {"grad_norm_total": mean - 10 * std}, 6) == []
    assert run(engine, {"grad_norm_total": math.inf}, 7)[0].check.worst.zscore == math.inf
    # The window keeps only the last `window` accepted values.
    for step in range(20):
        run(engine, {"grad_norm_total": 1.0 + step / 100}, 8 + step)
    assert len(engine.statistics[0]["grad_norm_total"]) == 10


def test_nonfinite_rule_and_scaler_patience() -> None:
    engine = RuleEngine([Rule("nonfinite", action="halt")])
    assert run(engine, {}, 0, nonfinite=False) == []
    assert engine.evaluate({}, nonfinite=None) == []  # unknown: not checked
    for step in range(1, SCALER_NONFINITE_PATIENCE):
        [d] = run(engine, {}, step, nonfinite=True, scaler_active=True)
        assert d.action == "none"
    [d] = run(engine, {}, 99, nonfinite=True, scaler_active=True)
    assert d.action == "halt" and d.consecutive == SCALER_NONFINITE_PATIENCE


def test_state_round_trip_and_ranks() -> None:
    rules = [
        Rule("grad_norm_total", zscore=3.0, window=20, name="z"),
        Rule("grad_norm/*", max=1.0, patience=5),
    ]
    engine = RuleEngine(rules)
    for step in range(7):
        run(engine, {"grad_norm_total": 1.0 + step, "grad_norm/b0": 2.0}, step)
    restored = RuleEngine(rules)
    restored.load_state_dict(engine.state_dict())
    assert restored.state_dict() == engine.state_dict()
    assert restored.consecutive == [0, 7] and restored.counts == [0, 7]
    checks = restored.evaluate({"grad_norm/b0": 0.5}, nonfinite=False)
    [decision] = restored.commit(checks, [True], step=7, ranks=[[1]])  # tripped on rank 1 only
    assert decision.ranks == [1] and decision.consecutive == 8 and decision.action == "warn"


def test_adaptive_clip_with_a_window_against_hand_computed_numbers() -> None:
    rule = Rule("grad_norm_total", zscore=2.0, window=5, warmup=4, action="clip")
    engine = RuleEngine([rule])
    for step, value in enumerate([1.0, 2.0, 3.0, 4.0]):
        assert run(engine, {"grad_norm_total": value}, step) == []
    # mean 2.5, population std sqrt(1.25): the bar is 2.5 + 2 * 1.1180... = 4.7360...
    bar = 2.5 + 2.0 * math.sqrt(1.25)
    checks = engine.evaluate({"grad_norm_total": 10.0}, nonfinite=False)
    assert checks[0].bars == {"grad_norm_total": pytest.approx(bar)}
    assert engine.clip_thresholds(checks) == {"grad_norm_total_clip_threshold": pytest.approx(bar)}
    [decision] = engine.commit(checks, [True], step=4)
    assert decision.action == "clip" and decision.clip_to == pytest.approx(bar)
    # The clipped value, not the spike, entered the window; the next bar is computed with it.
    window = engine.statistics[0]["grad_norm_total"].values
    assert list(window) == pytest.approx([1.0, 2.0, 3.0, 4.0, bar])
    values = [1.0, 2.0, 3.0, 4.0, bar]
    mean = sum(values) / 5
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / 5)
    [check] = engine.evaluate({"grad_norm_total": 3.0}, nonfinite=False)
    assert check.bars["grad_norm_total"] == pytest.approx(mean + 2.0 * std) and not check.tripped
    # A value below the bar is accepted as it is; the window keeps its last 5.
    engine.commit([check], [False], step=5)
    assert list(engine.statistics[0]["grad_norm_total"].values) == pytest.approx([*values[1:], 3.0])


def test_adaptive_clip_with_an_ema_against_hand_computed_numbers() -> None:
    rule = Rule("grad_norm_total", zscore=2.0, ema=0.5, warmup=2, action="clip", max=50.0)
    engine = RuleEngine([rule])
    # Warm-up: only `max` bounds the clip, and 1 and 3 set mean 2 and variance 1.
    [check] = engine.evaluate({"grad_norm_total": 1.0}, nonfinite=False)
    assert check.bars == {"grad_norm_total": 50.0}
    engine.commit([check], [False], step=0)
    assert run(engine, {"grad_norm_total": 3.0}, 1) == []
    ema = engine.statistics[0]["grad_norm_total"]
    assert (ema.count, ema.mean, ema.var) == (2, 2.0, 1.0)
    # 2.5: mean 0.5 * 2 + 0.5 * 2.5 = 2.25, variance 0.5 * 1 + 0.5 * (2.5 - 2.25)**2 = 0.53125.
    assert run(engine, {"grad_norm_total": 2.5}, 2) == []
    assert (ema.mean, ema.var) == pytest.approx((2.25, 0.53125))
    bar = 2.25 + 2.0 * math.sqrt(0.53125)
    [decision] = run(engine, {"grad_norm_total": 100.0}, 3)
    assert decision.clip_to == pytest.approx(bar) and decision.check.worst.condition == "max"
    # The EMA took the clipped value in.
    mean = 0.5 * 2.25 + 0.5 * bar
    assert (ema.mean, ema.var) == pytest.approx((mean, 0.5 * 0.53125 + 0.5 * (bar - mean) ** 2))
    # State round trip of the EMA (plain data).
    restored = RuleEngine([rule])
    restored.load_state_dict(engine.state_dict())
    assert restored.state_dict() == engine.state_dict()
    assert engine.state_dict()["grad_norm_total"]["windows"]["grad_norm_total"] == {
        "count": 4,
        "mean": pytest.approx(mean),
        "var": pytest.approx(0.5 * 0.53125 + 0.5 * (bar - mean) ** 2),
        "pending": [],
    }


def test_a_non_clip_ema_rule_takes_trips_in_capped_and_loss_is_a_metric() -> None:
    engine = RuleEngine([Rule("loss", zscore=3.0, ema=0.9, warmup=3, action="skip")])
    for step, value in enumerate([2.0, 2.1, 1.9]):
        assert run(engine, {"loss": value, "grad_norm_total": 1e6}, step) == []
    ema = engine.statistics[0]["loss"]
    mean, var = ema.mean, ema.var
    bound = mean + 3.0 * math.sqrt(var)
    [decision] = run(engine, {"loss": 50.0}, 3)
    assert decision.action == "skip" and decision.clip_to is None
    # The spike entered as the bound in force, not as 50 (ZClip's update with the capped value).
    new_mean = 0.9 * mean + 0.1 * bound
    assert ema.mean == pytest.approx(new_mean)
    assert ema.var == pytest.approx(0.9 * var + 0.1 * (bound - new_mean) ** 2)
    assert engine.reads_loss and engine.needs_every_step


def test_a_lasting_shift_is_accepted_after_some_trips() -> None:
    """A level shift (a new learning rate) trips a skip rule for a while, not forever: the trips
    enter the window capped at the bound, which rises until the new level is within it."""
    engine = RuleEngine([Rule("loss", zscore=6.0, window=128, warmup=64, action="skip")])
    g = random.Random(0)
    for step in range(128):
        run(engine, {"loss": 2.0 + g.gauss(0, 0.02)}, step)
    trips = [bool(run(engine, {"loss": 3.0 + g.gauss(0, 0.02)}, 128 + k)) for k in range(200)]
    assert trips[0] and not any(trips[-50:])
    assert 1 < sum(trips) < 150


def test_strongest_action() -> None:
    assert strongest(["warn", "none", "halt", "clip"]) == "halt"
    assert strongest(["clip", "skip"]) == "skip"
    assert strongest(["none"]) is None


# -- NaN localisation ----------------------------------------------------------------------------

BLOCKS = ["blocks.0", "blocks.1", "blocks.2", "blocks.3"]
NAN = math.nan


def params_up_to(k: int) -> list[str]:
    return ["stem.weight"] + [f"blocks.{i}.linear.weight" for i in range(k + 1)]


def test_locate_nonfinite_from_block_outputs_and_parameters() -> None:
    # NaN made inside block 2: block 2's parameters are NaN, its output gradient is not.
    report = locate_nonfinite(BLOCKS, params_up_to(2), [NAN, NAN, 1.0, 1.0], loss_nonfinite=False)
    assert (report.block, report.blocks) == ("blocks.2", ["blocks.0", "blocks.1"])
    # NaN arriving at block 2's output: block 2's own output gradient is the first bad one.
    report = locate_nonfinite(BLOCKS, params_up_to(2), [NAN, NAN, math.inf, 1.0])
    assert report.block == "blocks.2" and report.blocks == BLOCKS[:3]
    # No block norms (unmeasured step): the bad parameter closest to the output.
    assert locate_nonfinite(BLOCKS, params_up_to(1)).block == "blocks.1"
    # Only parameters outside the blocks: no block to name; a non-finite loss is reported.
    report = locate_nonfinite(BLOCKS, ["head.weight"], loss_nonfinite=True)
    assert report.block is None and report.loss_nonfinite and "loss itself" in report.message()
    # Block prefixes do not confuse blocks.1 with blocks.10.
    many = [f"blocks.{i}" for i in range(12)]
    assert locate_nonfinite(many, ["blocks.1.w"]).block == "blocks.1"


def test_rule_is_a_keyword_dataclass_with_the_documented_fields() -> None:
    assert dataclasses.is_dataclass(Rule)
    fields = {f.name for f in dataclasses.fields(Rule)}
    assert fields >= {
        "metric",
        "min",
        "max",
        "zscore",
        "window",
        "patience",
        "action",
        "clip_to",
        "clip_mode",
    }
    rule = Rule(
        metric="grad_norm_total",
        min=0.0,
        max=5,
        zscore=6,
        window=200,
        patience=3,
        action="clip",
        clip_to=1,
        clip_mode="value",
    )
    assert (rule.max, rule.zscore, rule.clip_to) == (5.0, 6.0, 1.0)
    # A bad value of the right type is a ValueError naming the field; a wrong type a TypeError.
    with pytest.raises(ValueError, match="`metric`"):
        Rule(metric="", max=1.0)
    with pytest.raises(TypeError, match="`metric`"):
        Rule(metric=3, max=1.0)  # type: ignore[arg-type]


def test_rules_from_yaml_with_class_path_entries(tmp_path: Path) -> None:
    callback = {
        "class_path": "lightning_gradwatch.GradientFlowCallback",
        "init_args": {
            "require_logger": False,
            "rules": [
                {
                    "class_path": "lightning_gradwatch.Rule",
                    "init_args": {"metric": "nonfinite", "action": "halt"},
                },
                {"metric": "grad_gain/*", "max": 2.0, "patience": 3, "action": "warn"},
            ],
        },
    }
    config = {"trainer": {"accelerator": "cpu", "logger": False, "callbacks": [callback]}}
    built = callback_from_cli_config(tmp_path, config)
    assert built.rules == [
        Rule("nonfinite", action="halt"),
        Rule("grad_gain/*", max=2.0, patience=3, action="warn"),
    ]


@pytest.mark.parametrize(
    "metric", ["grad_norm_totl", "grad_stats/maximum", "grad_flow/mean", "losses", "grad_norm/"]
)
def test_rule_on_a_key_the_callback_never_logs_fails_at_construction(metric: str) -> None:
    with pytest.raises(ValueError, match=r"Rule `metric` .* is not a key the callback logs"):
        Rule(metric, max=1.0)


@pytest.mark.parametrize(
    "metric", ["gradwatch/loss", "grad_norm_total_max", "grad_norm_total_clip_threshold"]
)
def test_rule_on_a_chart_only_key_fails_naming_the_figure_to_use(metric: str) -> None:
    with pytest.raises(
        ValueError, match=r"Rule `metric` .* charts only.*'grad_norm_total' or 'loss'"
    ):
        Rule(metric, max=1.0)


def test_rule_whose_pattern_matches_nothing_is_warned_about_once(tmp_path: Path) -> None:
    callback = GradientFlowCallback(
        log_every_n_steps=1, rules=[Rule("grad_gian/*", max=0.0), Rule("grad_gain/*", max=1e9)]
    )
    with pytest.warns(UserWarning, match=r"rule 'grad_gian/\*' .*cannot trip") as record:
        fit_steps(tmp_path, FaultNet(), callback, steps=3)
    unmatched = [w for w in record if "cannot trip" in str(w.message)]
    assert len(unmatched) == 1  # once, not per step, and not for the rule that matches
    assert callback.alerts == []


@pytest.mark.parametrize("log_param_norms", [False, "*.bias"])
def test_rule_on_parameter_norms_that_are_not_logged_is_warned_about(
    tmp_path: Path, log_param_norms: Any
) -> None:
    weight = "blocks.1.linear.weight"
    rule = Rule(f"grad_param_norm/{weight}", max=0.0, action="warn")
    callback = GradientFlowCallback(
        log_every_n_steps=1, log_param_norms=log_param_norms, rules=[rule]
    )
    with pytest.warns(UserWarning, match=r"cannot trip\. .*`log_param_norms` selects"):
        fit_steps(tmp_path, FaultNet(), callback, steps=2)
    assert callback.alerts == []
    # Logged, the same rule trips at every step and names the parameter.
    callback = GradientFlowCallback(log_every_n_steps=1, log_param_norms=weight, rules=[rule])
    fit_steps(tmp_path / "logged", FaultNet(), callback, steps=2)
    assert [a.step for a in callback.alerts] == [0, 1]
    assert callback.alerts[0].params == [weight]


def test_locate_nonfinite_uses_the_chaining_of_blocks() -> None:
    blocks = ["blocks.0", "blocks.1", "blocks.2", "blocks.3"]
    nan = float("nan")
    norms = [nan, nan, 1.0, 1.0]
    params = ["blocks.0.linear.weight", "blocks.1.linear.weight"]
    # Block 2 took block 1's output directly: the NaN between them came from block 2's backward.
    chained = [False, True, True, True]
    assert locate_nonfinite(blocks, params, norms, chained=chained).block == "blocks.2"
    # Something outside the blocks sat between them: block 1's output is where it showed up.
    chained = [False, True, False, True]
    assert locate_nonfinite(blocks, params, norms, chained=chained).block == "blocks.1"
    assert locate_nonfinite(blocks, params, norms).block == "blocks.1"
    # Block 2 got no gradient at all: its backward did not run, so it made nothing.
    unused = [nan, nan, None, 1.0]
    assert locate_nonfinite(blocks, params, unused, chained=[True] * 4).block == "blocks.1"
