"""The Markdown table and JSON file of a run, and the README's summary table."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
from collections.abc import Sequence
from typing import Any, Optional

import lightning
import torch

from gradwatch_bench.goals import MET, NOISE, NOT_MET

LABELS = {
    "baseline": "baseline (no instrumentation)",
    "measured": "gradwatch, measured step (every figure, TB + CSV)",
    "measured_no_stats": "gradwatch, measured step, `log_grad_stats=False`",
    "unmeasured": "gradwatch, unmeasured step (`rules=[]`)",
    "governance": "gradwatch, governance only (nonfinite halt, unmeasured step)",
    "every50_unmeasured": "gradwatch every 50 (`rules=[]`, derived)",
    "every50_governance": "gradwatch every 50 (default rules, derived)",
    "builtin": "Lightning `grad_norm` + `self.log_dict`",
    "backward_hooks": "per-Linear full backward hook + `.item()`",
    "floor": "floor: one `_foreach_norm` + one copy",
    "floor_blocks": "floor + block-output tensor-hook norms",
}


def _spread(goal: dict[str, Any]) -> str:
    """The goal's interval, or (not measurable) the 95 % CIs of the figures it is made of."""
    if goal["interval"] is not None:
        low, high = goal["interval"]
        return f"[{_f(low, 3)}, {_f(high, 3)}]"
    unit = "" if goal["how"] == "own time" else "Δ "
    return "; ".join(
        f"{unit}{name} [{_f(ci[0])}, {_f(ci[1])}] ms" for name, ci in goal["spread"].items()
    )


def _f(value: float, digits: int = 2) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    lines = _header(result)
    for model in result["models"]:
        lines += _model_section(model)
    lines += _scale_section(result["models"]) + _goals_section(result["goals"])
    lines += _memory_section(result.get("memory"))
    return "\n".join(lines) + "\n"


def _header(result: dict[str, Any]) -> list[str]:
    m = result["machine"]
    return [
        "# lightning-gradwatch overhead",
        "",
        f"{m['date']} · {m['cpu']} ({m['cores']} cores, {m['threads']} torch threads) · "
        f"torch {m['torch']} · lightning {m['lightning']} · Python {m['python']}"
        + (" · **quick mode (tiny models, not a measurement)**" if result["quick"] else ""),
        f"Load average at start: {m['loadavg_start']}; at end: {m['loadavg_end']}.",
        "",
        f"Produced by `{result.get('command', 'python benchmarks/overhead.py')}` on the machine"
        " above."
        + (
            f" Statistics and verdicts recomputed from its recorded steps by"
            f" `{result['rendered']['command']}` ({result['rendered']['date']})."
            if result.get("rendered")
            else ""
        ),
        "",
        "Step = wall time from one `on_train_batch_start` to the next (forward, backward, optimizer,"
        " logging). Δ = median over rounds of (variant step - baseline step of the same round), with"
        " a bootstrap 95 % CI and the min-max of the paired differences; ratio = 1 + Δ / median"
        " baseline step. Own = wall time inside the variant's own hooks per step (median).",
        "",
    ]


def _model_section(model: dict[str, Any]) -> list[str]:
    s = model["stats"]
    base = s["baseline"]["median_ms"]
    lines = [
        f"## {model['label']}",
        "",
        f"{model['param_tensors']} parameter tensors, {model['parameters']:,} parameters, "
        f"{model['blocks']} blocks; {model['rounds']} rounds; baseline step median "
        f"{_f(base)} ms (min-max {_f(s['baseline']['min_ms'])}-{_f(s['baseline']['max_ms'])}).",
        "",
        "| variant | step median (min-max) ms | Δ ms [95 % CI] | Δ min-max ms | ratio | Δ CPU ms | own ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in LABELS:
        if name not in s:
            continue
        v = s[name]
        span = "" if v["derived"] else f" ({_f(v['min_ms'])}-{_f(v['max_ms'])})"
        lines.append(
            f"| {LABELS[name]} | {_f(v['median_ms'])}{span} | {_f(v['delta_ms'])} "
            f"[{_f(v['delta_ci'][0])}, {_f(v['delta_ci'][1])}] | "
            + ("" if v["derived"] else f"{_f(v['delta_min'])} - {_f(v['delta_max'])}")
            + f" | x{_f(v['ratio'], 3)} | {_f(v['cpu_delta_ms'])} | {_f(v['own_median_ms'], 3)} |"
        )
    return [*lines, ""]


def _scale_section(models: Sequence[dict[str, Any]]) -> list[str]:
    lines = [
        "## Scale: own time per watched tensor",
        "",
        "Own time per step divided by (blocks + parameter tensors): the cost per tensor the"
        " callback reads, which should not grow with the model.",
        "",
        "| model | blocks | param tensors | measured us/tensor | measured, no stats us/tensor |"
        " unmeasured us/block | floor + blocks us/tensor |",
        "|---|---|---|---|---|---|---|",
    ]
    for model in models:
        s, n = model["stats"], model["blocks"] + model["param_tensors"]

        def per(name: str, count: int, s: dict[str, Any] = s) -> str:
            return _f(1e3 * s[name]["own_median_ms"] / count, 1) if name in s else "n/a"

        lines.append(
            f"| {model['name']} | {model['blocks']} | {model['param_tensors']} | "
            f"{per('measured', n)} | {per('measured_no_stats', n)} | "
            f"{per('unmeasured', model['blocks'])} | {per('floor_blocks', n)} |"
        )
    return lines


def _goals_section(goals: Sequence[dict[str, Any]]) -> list[str]:
    lines = [
        "",
        "## Goals",
        "",
        "A cost is *at the noise level* when the 95 % bootstrap CI of its median over the rounds"
        " (the spread of the repeated measurements) reaches zero or below. A goal whose figures"
        " are both above the noise gets an interval, from the smallest to the largest ratio their"
        " CIs allow: **met** when all of it meets the limit, **not met** when none of it does, else"
        " *not measurable at this noise*. A goal built on a figure at the noise level is *not"
        " measurable at this noise*, never met, and its spread column gives the figures' CIs. The"
        " unmeasured step's cost is taken over the median baseline step.",
        "",
        "| model | goal | value | spread (95 % CIs) | limit | verdict | measured by |",
        "|---|---|---|---|---|---|---|",
    ]
    shown = {MET: "yes", NOT_MET: "**no**", NOISE: "not measurable at this noise"}
    for goal in goals:
        lines.append(
            f"| {goal['model']} | {goal['goal']} | {_f(goal['value'], 3)} | {_spread(goal)} | "
            f"{goal['limit']} | {shown[goal['verdict']]} | {goal['how']} |"
        )
    return lines


def _memory_section(mem: Optional[dict[str, Any]]) -> list[str]:
    if not mem:
        return []
    return [
        "",
        "## Memory",
        "",
        f"{mem['steps']} measured steps (every figure, every step, TB + CSV), small MLP: "
        f"Python memory allocated in `lightning_gradwatch` and still held grew by "
        f"{_f(mem['gradwatch_traced_growth_bytes'], 0)} bytes between step "
        f"{mem['first'].get('step')} and step {mem['last'].get('step')} (tracemalloc); RSS grew by "
        f"{_f(mem['rss_growth_bytes'] / 2**20)} MiB (RSS includes Lightning, the loggers and the"
        " allocator).",
    ]


def machine_info(threads: int) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:  # pragma: no cover
        pass
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "python": platform.python_version(),
        "loadavg_start": loadavg(),
    }


def write_files(
    out: str, stem: str, text: str, result: dict[str, Any], *, compact: bool = False
) -> None:
    """``<stem>.md`` (``text``) and ``<stem>.json`` (``result``) in the folder ``out``; ``compact``
    JSON for results that hold long per-step series."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{stem}.md"), "w", encoding="utf-8") as handle:
        handle.write(text)
    layout: dict[str, Any] = {"separators": (",", ":")} if compact else {"indent": 1}
    with open(os.path.join(out, f"{stem}.json"), "w", encoding="utf-8") as handle:
        json.dump(result, handle, default=str, **layout)


def write_results(result: dict[str, Any], out: str) -> str:
    """Write ``overhead.md`` and ``overhead.json`` to the folder ``out``; return the Markdown."""
    text = markdown(result)
    write_files(out, "overhead", text, result)
    return text


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover
        return "n/a"


#: The variants of the README's summary table, in its order.
README_ROWS = (
    "measured",
    "measured_no_stats",
    "unmeasured",
    "governance",
    "every50_governance",
    "builtin",
    "backward_hooks",
    "floor",
    "floor_blocks",
)


def readme_table(result: dict[str, Any]) -> str:
    """The README's performance table: per model, the paired wall Δ and the own time, each median
    with its 95 % CI, from a results file (``tests/test_docs.py`` checks the README holds exactly
    this table of the committed ``overhead.json``)."""
    models = result["models"]
    head = ["variant"]
    for model in models:
        head += [f"{model['name']} Δ ms [95 % CI]", f"{model['name']} own ms [95 % CI]"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = ["baseline step, median ms"]
    for model in models:
        base += [_f(model["stats"]["baseline"]["median_ms"], 1), "-"]
    lines.append("| " + " | ".join(base) + " |")

    def cell(value: float, ci: Sequence[float], digits: int) -> str:
        return f"{_f(value, digits)} [{_f(ci[0], digits)}, {_f(ci[1], digits)}]"

    for name in README_ROWS:
        row = [LABELS[name]]
        for model in models:
            v = model["stats"].get(name)
            if v is None:
                row += ["n/a", "n/a"]
                continue
            row += [cell(v["delta_ms"], v["delta_ci"], 1), cell(v["own_median_ms"], v["own_ci"], 2)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"
