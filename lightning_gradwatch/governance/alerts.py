"""Alert records: the one builder that turns a decision into a complete :class:`Alert`, and the one
conversion of values to strict JSON. Writing and reading the trail: :mod:`.trail`."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np

from lightning_gradwatch.keys import NONFINITE, PARAM_NORM_PREFIX

if TYPE_CHECKING:  # types only: the records stay importable without the engine
    from lightning_gradwatch.governance.engine import Check, Decision
    from lightning_gradwatch.measure.nonfinite import NonFiniteReport

__all__ = ["ALERTS_FILENAME", "Alert", "build_alert", "json_safe"]

#: File name of the audit trail inside the logger's ``log_dir`` (else ``trainer.default_root_dir``).
ALERTS_FILENAME = "gradwatch_alerts.jsonl"


@dataclass
class Alert:
    """One trip of one rule.

    Attributes:
        time: UTC time in ISO 8601.
        step: optimizer step (``trainer.global_step`` before the update).
        epoch: current epoch.
        rank: the rank on which the rule tripped (the lowest of ``ranks``; the JSONL is written
            by rank 0 whichever rank tripped).
        ranks: the ranks on which the rule tripped.
        rule: the rule's name (``Rule.label``).
        rule_repr: ``repr`` of the rule.
        metric: the key that tripped (the worst one for a ``*`` pattern), or ``"nonfinite"``.
        value: its value (``1.0`` for ``nonfinite``; NaN/Inf are written as the strings ``"nan"``,
            ``"inf"``, ``"-inf"`` in JSON).
        threshold: the bound it crossed (``zscore`` rules: the z-score bound).
        condition: ``"min"``, ``"max"``, ``"zscore"`` or ``"nonfinite"``.
        action: the action taken: ``"warn"``, ``"clip"``, ``"skip"``, ``"halt"`` or ``"none"``
            (patience not reached, or the AMP GradScaler skips the step itself).
        consecutive: trips of this rule in a row, this one included; ``patience``: trips needed to act.
        block: the block where the problem starts (non-finite: the block whose backward produced it).
        blocks: blocks concerned (every violating block key; non-finite: blocks with a NaN/Inf
            output gradient, in forward order).
        params: parameters concerned (non-finite: parameters with a NaN/Inf gradient; rules on
            ``grad_param_norm/<param>``: the violating parameters).
        where: everything above in one list: ``block`` first, then ``blocks``, then ``params``.
        keys: every violating key with its value.
        loss_nonfinite: whether the loss was already NaN/Inf (non-finite alerts).
        checkpoint: path of the checkpoint saved by ``halt`` (also under the key
            ``checkpoint_path`` in :meth:`to_dict` and the JSONL line).
        clip_to: what a ``clip`` action clipped to: the total norm (an adaptive clip: the rule's
            threshold at that step), or the absolute value with ``clip_mode="value"``.
        batch_idx: the batch the step came from (Lightning's ``batch_idx`` in the epoch), or the
            list of the step's micro-batch indices under gradient accumulation.
        dataloader_idx: the dataloader it came from, where that is known (``None`` otherwise:
            Lightning's fit loop combines several training dataloaders into one batch).
        fingerprints: one hex digest per rank (rank order) of that rank's batch content
            (:mod:`lightning_gradwatch.governance.fingerprints`; ``None`` for a rank whose batch
            was not kept).
        origin_rank: the rank whose own contribution drove the trip
            (:func:`~lightning_gradwatch.governance.forensics.find_origin`).
        local: the per-rank figures behind ``origin_rank`` (``loss``: each rank's own loss;
            ``grad_norm``: each rank's norm over every watched block's output gradient, before
            the reduction; the tripped block's own norms for a ``grad_norm/<block>`` rule).
        rerun: for a rule with ``rerun=True``: ``verdict`` (``"reproducible"``, ``"transient"``
            or ``"unavailable"``), ``ranks`` (where transient), ``first`` and ``rerun`` (both
            executions' figures per rank), ``tolerance`` and, when unavailable, ``reason``.
        skip_list: the skip list this step went into (a ``skip`` or ``halt``) or came from (a
            step skipped from the list).
        message: a one-line human summary.
    """

    step: int
    rule: str
    metric: str
    value: Optional[float]
    action: str
    threshold: Optional[float] = None
    condition: str = ""
    epoch: int = 0
    rank: int = 0
    ranks: list[int] = field(default_factory=list)
    rule_repr: str = ""
    consecutive: int = 1
    patience: int = 1
    block: Optional[str] = None
    blocks: list[str] = field(default_factory=list)
    params: list[str] = field(default_factory=list)
    where: list[str] = field(default_factory=list)
    keys: dict[str, float] = field(default_factory=dict)
    zscore: Optional[float] = None
    loss_nonfinite: Optional[bool] = None
    checkpoint: Optional[str] = None
    clip_to: Optional[float] = None
    batch_idx: Optional[Union[int, list[int]]] = None
    dataloader_idx: Optional[int] = None
    fingerprints: list[Optional[str]] = field(default_factory=list)
    origin_rank: Optional[int] = None
    local: dict[str, Any] = field(default_factory=dict)
    rerun: Optional[dict[str, Any]] = None
    skip_list: Optional[str] = None
    message: str = ""
    time: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())

    def __getitem__(self, key: str) -> Any:
        """``alert["step"]`` reads like a line of the JSONL trail (same keys as :meth:`to_dict`)."""
        if key == "checkpoint_path":
            return self.checkpoint
        if key not in self.__dataclass_fields__:
            raise KeyError(key)
        return getattr(self, key)

    def to_dict(self) -> dict[str, Any]:
        """The record as a plain dict (the keys of a JSONL line)."""
        return asdict(self) | {"checkpoint_path": self.checkpoint}

    def to_json(self) -> str:
        """One line of strict JSON (NaN and Inf become the strings ``"nan"``, ``"inf"``, ``"-inf"``)."""
        return json.dumps(json_safe(self.to_dict()), sort_keys=True, allow_nan=False)


def build_alert(
    decision: Decision,
    *,
    label: str,
    epoch: int,
    rank: int,
    block_names: Sequence[str],
    report: Optional[NonFiniteReport] = None,
    scaler: bool = False,
    step_action: Optional[str] = None,
    checkpoint: Optional[str] = None,
    peer_value: float = math.nan,
    forensics: Optional[dict[str, Any]] = None,
    notes: Sequence[str] = (),
) -> Alert:
    """The complete :class:`Alert` of one decision.

    Args:
        decision: the agreed trip.
        label: the rule's name.
        epoch: the current epoch.
        rank: this rank (recorded where the rule did not trip on any named rank).
        block_names: the watched blocks, in forward order.
        report: where a non-finite gradient started, if one was seen.
        scaler: whether an enabled AMP GradScaler handles non-finite steps.
        step_action: the strongest action taken at this step, by any rule.
        checkpoint: the halt checkpoint written at this step, if any.
        peer_value: the value a tripping rank saw (when this rank's own check did not trip).
        forensics: the incident's fields (``batch_idx``, ``dataloader_idx``, ``fingerprints``,
            ``origin_rank``, ``local``, ``rerun``, ``skip_list``), where known.
        notes: sentences for the message, between the figures and the outcome (the batch and
            rank it came from, the rerun's verdict).
    """
    what = _what(decision, peer_value)
    nonfinite = report if what["condition"] == NONFINITE else None
    halt_checkpoint = checkpoint if decision.action == "halt" else None
    ranks = list(decision.ranks)
    summary = nonfinite.message() if nonfinite else _describe(what)
    done = _outcome(decision, what["condition"], scaler, step_action, halt_checkpoint)
    on = f" on rank(s) {ranks}" if ranks else ""
    said = "".join(f"; {note}" for note in notes if note)
    return Alert(
        step=decision.step,
        epoch=epoch,
        rank=ranks[0] if ranks else rank,
        ranks=ranks,
        rule=label,
        rule_repr=repr(decision.rule),
        action=decision.action,
        consecutive=decision.consecutive,
        patience=decision.patience,
        checkpoint=halt_checkpoint,
        clip_to=decision.clip_to if decision.action == "clip" else None,
        message=f"GradientFlowCallback: rule {label!r} tripped at step {decision.step}{on}: "
        f"{summary}{said}; {done}.",
        **what,
        **_where(decision.check, block_names, nonfinite),
        **(forensics or {}),
    )


def _what(decision: Decision, peer_value: float) -> dict[str, Any]:
    """``metric``, ``value``, ``threshold``, ``condition``, ``zscore`` and ``keys`` of an alert:
    the worst violating key on this rank, else (it tripped on another rank) the rule's metric."""
    rule, worst = decision.rule, decision.check.worst
    return {
        "metric": worst.key if worst else rule.metric,
        "value": worst.value if worst else peer_value,
        "threshold": worst.threshold if worst else None,
        "condition": worst.condition if worst else (NONFINITE if rule.is_nonfinite else ""),
        "zscore": worst.zscore if worst else None,
        "keys": {v.key: v.value for v in decision.check.violations},
    }


def _where(
    check: Check, block_names: Sequence[str], report: Optional[NonFiniteReport]
) -> dict[str, Any]:
    """``block``, ``blocks``, ``params``, ``where`` and ``loss_nonfinite`` of an alert."""
    loss_nonfinite = None
    if report is not None:
        block, blocks, params = report.block, list(report.blocks), list(report.params)
        loss_nonfinite = report.loss_nonfinite
    else:
        keys = [v.key for v in check.violations]
        blocks = [b for b in block_names if any(key.endswith("/" + b) for key in keys)]
        params = [k[len(PARAM_NORM_PREFIX) :] for k in keys if k.startswith(PARAM_NORM_PREFIX)]
        block = blocks[0] if blocks else None
    where = list(dict.fromkeys([*([block] if block else []), *blocks])) + params
    return {
        "block": block,
        "blocks": blocks,
        "params": params,
        "where": where,
        "loss_nonfinite": loss_nonfinite,
    }


def _describe(what: dict[str, Any]) -> str:
    text = f"{what['metric']} = {what['value']:.6g} ({what['condition']} {what['threshold']})"
    return text + (f", z = {what['zscore']:.3g}" if what["zscore"] is not None else "")


def _outcome(
    decision: Decision,
    condition: str,
    scaler: bool,
    step_action: Optional[str],
    checkpoint: Optional[str],
) -> str:
    if not decision.acts:
        if scaler and condition == NONFINITE:
            return "recorded; the AMP GradScaler skips this step"
        if decision.consecutive >= decision.patience:  # a clip with nothing finite to clip
            return "recorded; not clipped (a non-finite total norm cannot be clipped)"
        return f"recorded, not acting yet ({decision.consecutive}/{decision.patience} consecutive)"
    if decision.action == "halt":
        return f"training halted, weights before the update saved to {checkpoint}"
    if decision.action == "skip" or step_action in ("skip", "halt"):
        return "optimizer step skipped (no weight changed)"
    if decision.action == "clip":
        what = "total norm" if decision.rule.clip_mode == "norm" else "absolute value"
        return f"gradients clipped to {what} {decision.clip_to:.6g}"
    return "warning"


def json_safe(value: Any, nan: Any = "nan") -> Any:
    """``value`` as strict JSON types, the one conversion of every JSON this package writes:
    infinities as the strings ``"inf"``/``"-inf"``, numpy scalars as Python numbers, tuples as
    lists, keys as strings, and NaN as ``nan``: the string ``"nan"`` where it is a measured value
    (the alert trail), ``None`` where NaN marks a missing one (the report's arrays)."""
    if isinstance(value, dict):
        return {str(key): json_safe(v, nan) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v, nan) for v in value]
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (float, np.floating)):
        number = float(value)
        if math.isnan(number):
            return nan
        return number if math.isfinite(number) else str(number)
    return value
