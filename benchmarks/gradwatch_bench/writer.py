"""The goals checked against the statistics, and the Markdown table and JSON file of a run."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
from typing import Any

import lightning
import torch

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


MEASURES = (
    ("own time", "own_median_ms"),
    ("paired wall Δ", "delta_ms"),
    ("paired CPU Δ", "cpu_delta_ms"),
)


def goals(model: dict[str, Any]) -> list[dict[str, Any]]:
    """The overhead goals, each by own time and by the paired wall-clock and CPU-time differences
    (a ratio whose denominator is not above zero, i.e. lost in the noise, is left out)."""
    s = model["stats"]
    out: list[dict[str, Any]] = []

    def ratio(goal: str, num: str, den: str, limit: float, at_least: bool = False) -> None:
        if num not in s or den not in s:
            return
        for how, key in MEASURES:
            top, bottom = s[num][key], s[den][key]
            if bottom > 0:
                value = top / bottom
                met = value >= limit if at_least else value <= limit
                out.append(
                    {
                        "model": model["name"],
                        "goal": goal,
                        "value": value,
                        "limit": limit,
                        "met": met,
                        "how": how,
                    }
                )

    for measured in ("measured", "measured_no_stats"):
        ratio(f"{measured} / (floor + block norms)", measured, "floor_blocks", 1.5)
        ratio(f"built-in / {measured} (at least)", "builtin", measured, 5.0, at_least=True)
    ratio("governance / floor", "governance", "floor", 1.2)
    if "unmeasured" in s:
        base = s["baseline"]["median_ms"]
        for how, key in MEASURES:
            value = 100 * s["unmeasured"][key] / base
            out.append(
                {
                    "model": model["name"],
                    "goal": "unmeasured step cost, % of the step",
                    "value": value,
                    "limit": 0.5,
                    "met": value <= 0.5,
                    "how": how,
                }
            )
    return out


def _f(value: float, digits: int = 2) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "# lightning-gradwatch overhead",
        "",
        f"{m['date']} · {m['cpu']} ({m['cores']} cores, {m['threads']} torch threads) · "
        f"torch {m['torch']} · lightning {m['lightning']} · Python {m['python']}"
        + (" · **quick mode (tiny models, not a measurement)**" if result["quick"] else ""),
        f"Load average at start: {m['loadavg_start']}; at end: {m['loadavg_end']}.",
        "",
        f"Produced by `{result.get('command', 'python benchmarks/overhead.py')}` on the machine"
        " above.",
        "",
        "Step = wall time from one `on_train_batch_start` to the next (forward, backward, optimizer,"
        " logging). Δ = median over rounds of (variant step - baseline step of the same round), with"
        " a bootstrap 95 % CI and the min-max of the paired differences; ratio = 1 + Δ / median"
        " baseline step. Own = wall time inside the variant's own hooks per step (median).",
        "",
    ]
    for model in result["models"]:
        s = model["stats"]
        base = s["baseline"]["median_ms"]
        lines += [
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
        lines.append("")
    lines += [
        "## Scale: own time per watched tensor",
        "",
        "Own time per step divided by (blocks + parameter tensors): the cost per tensor the"
        " callback reads, which should not grow with the model.",
        "",
        "| model | blocks | param tensors | measured us/tensor | measured, no stats us/tensor |"
        " unmeasured us/block | floor + blocks us/tensor |",
        "|---|---|---|---|---|---|---|",
    ]
    for model in result["models"]:
        s, n = model["stats"], model["blocks"] + model["param_tensors"]

        def per(name: str, count: int, s: dict[str, Any] = s) -> str:
            return _f(1e3 * s[name]["own_median_ms"] / count, 1) if name in s else "n/a"

        lines.append(
            f"| {model['name']} | {model['blocks']} | {model['param_tensors']} | "
            f"{per('measured', n)} | {per('measured_no_stats', n)} | "
            f"{per('unmeasured', model['blocks'])} | {per('floor_blocks', n)} |"
        )
    lines += [
        "",
        "## Goals",
        "",
        "| model | goal | value | limit | met | measured by |",
        "|---|---|---|---|---|---|",
    ]
    for goal in result["goals"]:
        lines.append(
            f"| {goal['model']} | {goal['goal']} | {_f(goal['value'], 3)} | {goal['limit']} | "
            f"{'yes' if goal['met'] else '**no**'} | {goal['how']} |"
        )
    mem = result.get("memory")
    if mem:
        lines += [
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
    return "\n".join(lines) + "\n"


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
