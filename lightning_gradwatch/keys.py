"""The vocabulary: every metric key and prefix the package logs, reads or lets a rule name, and the
defaults that several modules share. Everyone who names a figure imports it from here, so a key is
spelled once.

Per-block keys are ``<prefix><block>`` (``grad_norm/blocks.3``), per-parameter keys
``grad_param_norm/<param>``, summaries ``grad_flow/<stat>`` and statistics ``grad_stats/<stat>``.
"""

from __future__ import annotations

import re
from typing import Optional

__all__ = [
    "ADAPTIVE_CLIP_METRICS",
    "ALERTS_PREFIX",
    "CLIPPED_KEY",
    "DEFAULT_EPS",
    "END_TO_END_KEY",
    "FLOW_PREFIX",
    "GAIN_PREFIX",
    "GRAD_STAT_KEYS",
    "CURVATURE_KEYS",
    "CURVATURE_PREFIX",
    "HESSIAN_MAX_EIG_KEY",
    "HESSIAN_TRACE_KEY",
    "HESSIAN_TRACE_SE_KEY",
    "HIST_BLOCK_PREFIX",
    "HIST_PARAM_PREFIX",
    "KEY_PREFIXES",
    "KNOWN_KEYS",
    "LOG_GAIN_PREFIX",
    "LOSS",
    "LOSS_KEY",
    "NOISE_BATCH_KEY",
    "NOISE_B_SIMPLE_KEY",
    "NOISE_GRAD_SQ_KEY",
    "NOISE_KEYS",
    "NOISE_PREFIX",
    "NOISE_TRACE_KEY",
    "NONFINITE",
    "NORM_PREFIX",
    "PARAM_NORM_PREFIX",
    "PRECONDITIONED_MAX_EIG_KEY",
    "SHARPNESS_RATIO_KEY",
    "SHARPNESS_THRESHOLD_KEY",
    "STATS_PREFIX",
    "SUMMARY_KEYS",
    "TOTAL_NORM_KEY",
    "UPDATE_FAMILIES",
    "UPDATE_GRAD_COSINE_KEY",
    "UPDATE_KEY_PREFIXES",
    "UPDATE_NORM_TOTAL_KEY",
    "UPDATE_RATIO_PREFIX",
    "UPDATE_RATIO_TOTAL_KEY",
    "UPDATE_TOTAL_KEYS",
    "EPS_FRACTION_KEY",
    "MOMENT_NORM_KEY",
    "OPTIM_PREFIX",
    "WEIGHT_NORM_PREFIX",
    "WEIGHT_NORM_TOTAL_KEY",
    "alert_key",
    "clip_threshold_key",
    "flow_key",
    "gain_key",
    "interval_max_key",
    "interval_mean_key",
    "log_gain_key",
    "norm_key",
    "param_norm_key",
    "stats_key",
    "for_optimizer",
    "optimizer_of",
    "total_norm_key",
    "is_update_metric",
    "update_ratio_key",
    "weight_norm_key",
]

#: Norms at or below this count as zero (a gain into them is ``inf``: vanishing).
DEFAULT_EPS = 1e-30

NORM_PREFIX = "grad_norm/"
GAIN_PREFIX = "grad_gain/"
LOG_GAIN_PREFIX = "grad_log_gain/"
PARAM_NORM_PREFIX = "grad_param_norm/"
FLOW_PREFIX = "grad_flow/"
STATS_PREFIX = "grad_stats/"
ALERTS_PREFIX = "grad_alerts/"
#: Gradient noise scale (``noise_scale=True``): EMA-smoothed estimates, see ``noise_scale.py``.
NOISE_PREFIX = "grad_noise/"
#: TensorBoard histogram tags: block-output gradients and parameter gradients.
HIST_BLOCK_PREFIX = "grad_hist_block/"
HIST_PARAM_PREFIX = "grad_hist_param/"

#: The norm over all parameter gradients (what ``clip_grad_norm_`` sees).
TOTAL_NORM_KEY = "grad_norm_total"
#: Logged at steps where a ``clip`` rule acted: the total norm after clipping.
CLIPPED_KEY = "grad_norm_total_clipped"
#: The metric name of "any NaN or Inf in parameter or block-output gradients, or in the loss"
#: (rules only).
NONFINITE = "nonfinite"
#: The metric name of the training loss of the optimizer step (rules only: it is logged under
#: :data:`LOSS_KEY`, so that it never collides with a ``self.log("loss", ...)`` of the user's own).
LOSS = "loss"
#: The training loss of the step, as the rules read it, logged on measured steps when a rule reads it.
LOSS_KEY = "gradwatch/loss"
#: The only metrics an adaptive ``clip`` rule (no ``clip_to``) may watch: it clips the total norm
#: to the rule's own threshold, which only means something in the units of the total norm.
ADAPTIVE_CLIP_METRICS: tuple[str, ...] = (TOTAL_NORM_KEY,)
#: Suffixes of keys logged for charts only (rules read the figure itself): the interval's maximum
#: and mean of an every-step figure, and the threshold an adaptive clip rule had in force.
_INTERVAL_MAX = "_max"
_INTERVAL_MEAN = "_mean"
_CLIP_THRESHOLD = "_clip_threshold"

#: ``grad_flow/<key>``: the GradientGainMonitor summary, then the end-to-end gain.
SUMMARY_KEYS: tuple[str, ...] = (
    "mean_gain",
    "min_gain",
    "max_gain",
    "mean_log_gain",
    "num_amplifying",
    "num_damping",
    "num_healthy",
    "num_vanishing",
    "num_missing",
)
END_TO_END_KEY = "end_to_end_gain"

#: ``grad_stats/<key>``: statistics over all parameter-gradient elements, in logging order.
GRAD_STAT_KEYS: tuple[str, ...] = (
    "mean",
    "std",
    "min",
    "max",
    "zero_fraction",
    "large_fraction",
    "nonfinite_count",
)

#: The simple noise scale tr(Sigma) / |G|^2: the critical batch size estimate, in samples.
NOISE_B_SIMPLE_KEY = NOISE_PREFIX + "b_simple"
#: The unbiased estimate of |G|^2, the squared norm of the true (full-data) gradient.
NOISE_GRAD_SQ_KEY = NOISE_PREFIX + "grad_sq"
#: The unbiased estimate of tr(Sigma), the per-sample gradient covariance's trace.
NOISE_TRACE_KEY = NOISE_PREFIX + "trace_sigma"
#: The global batch of the step the estimate was made at (``B_big``, in samples).
NOISE_BATCH_KEY = NOISE_PREFIX + "batch_size"
NOISE_KEYS: tuple[str, ...] = (
    NOISE_B_SIMPLE_KEY,
    NOISE_GRAD_SQ_KEY,
    NOISE_TRACE_KEY,
    NOISE_BATCH_KEY,
)

CURVATURE_PREFIX = "curvature/"
#: The top eigenvalue of the Hessian of the step's training loss (all trainable parameters).
HESSIAN_MAX_EIG_KEY = CURVATURE_PREFIX + "hessian_max_eig"
#: Hutchinson's estimate of that Hessian's trace, and its standard error.
HESSIAN_TRACE_KEY = CURVATURE_PREFIX + "hessian_trace"
HESSIAN_TRACE_SE_KEY = CURVATURE_PREFIX + "hessian_trace_stderr"
#: Adam/AdamW: the top eigenvalue of diag(sqrt(v_hat) + eps)^-1 H (Cohen et al. 2022).
PRECONDITIONED_MAX_EIG_KEY = CURVATURE_PREFIX + "preconditioned_max_eig"
#: The optimizer's stability threshold on that sharpness (2/lr for SGD, 38/lr for Adam(0.9), ...).
SHARPNESS_THRESHOLD_KEY = CURVATURE_PREFIX + "sharpness_threshold"
#: The sharpness over its threshold: 1 is the edge of stability.
SHARPNESS_RATIO_KEY = CURVATURE_PREFIX + "sharpness_ratio"
CURVATURE_KEYS: tuple[str, ...] = (
    HESSIAN_MAX_EIG_KEY,
    HESSIAN_TRACE_KEY,
    HESSIAN_TRACE_SE_KEY,
    PRECONDITIONED_MAX_EIG_KEY,
    SHARPNESS_THRESHOLD_KEY,
    SHARPNESS_RATIO_KEY,
)

#: What the optimizer step did (``log_updates=True``), measured around ``optimizer.step()``:
#: ``update_ratio/<block>`` = ||theta_after - theta_before|| / ||theta_before|| over the block's
#: parameters, ``weight_norm/<block>`` = ||theta_before||, and the same over all the stepping
#: optimizer's parameters; ``update_norm_total`` = ||theta_after - theta_before|| (always L2).
UPDATE_RATIO_PREFIX = "update_ratio/"
WEIGHT_NORM_PREFIX = "weight_norm/"
UPDATE_RATIO_TOTAL_KEY = "update_ratio_total"
WEIGHT_NORM_TOTAL_KEY = "weight_norm_total"
UPDATE_NORM_TOTAL_KEY = "update_norm_total"
#: The optimizer's state: the share of elements whose bias-corrected sqrt(v_hat) is below the
#: optimizer's eps and ||m|| (Adam-style state only), and the cosine between the applied update and
#: the negative gradient (every optimizer).
OPTIM_PREFIX = "optim/"
EPS_FRACTION_KEY = OPTIM_PREFIX + "eps_fraction"
MOMENT_NORM_KEY = OPTIM_PREFIX + "moment_norm"
UPDATE_GRAD_COSINE_KEY = OPTIM_PREFIX + "update_grad_cosine"
#: The update figures over all of a step's parameters: with several optimizers each is logged per
#: optimizer, ``<key>/<optimizer>`` (:func:`for_optimizer`), as ``grad_norm_total`` is.
UPDATE_TOTAL_KEYS: tuple[str, ...] = (
    UPDATE_RATIO_TOTAL_KEY,
    WEIGHT_NORM_TOTAL_KEY,
    UPDATE_NORM_TOTAL_KEY,
    EPS_FRACTION_KEY,
    MOMENT_NORM_KEY,
    UPDATE_GRAD_COSINE_KEY,
)
#: Every update key starts with one of these.
UPDATE_KEY_PREFIXES: tuple[str, ...] = (UPDATE_RATIO_PREFIX, WEIGHT_NORM_PREFIX, *UPDATE_TOTAL_KEYS)
#: The stems of every update key: a rule whose metric starts with one is checked after the step.
UPDATE_FAMILIES: tuple[str, ...] = (
    "update_ratio",
    "weight_norm",
    UPDATE_NORM_TOTAL_KEY,
    OPTIM_PREFIX,
)

#: Every logged key a rule may name exactly.
KNOWN_KEYS: frozenset[str] = frozenset(
    [TOTAL_NORM_KEY, CLIPPED_KEY, *NOISE_KEYS, *CURVATURE_KEYS, *UPDATE_TOTAL_KEYS]
    + [FLOW_PREFIX + key for key in (*SUMMARY_KEYS, END_TO_END_KEY)]
    + [STATS_PREFIX + key for key in GRAD_STAT_KEYS]
)
#: Prefixes of the per-block / per-parameter / per-rule keys a rule may name.
KEY_PREFIXES: tuple[str, ...] = (
    NORM_PREFIX,
    GAIN_PREFIX,
    LOG_GAIN_PREFIX,
    PARAM_NORM_PREFIX,
    ALERTS_PREFIX,
    UPDATE_RATIO_PREFIX,
    WEIGHT_NORM_PREFIX,
)


def for_optimizer(key: str, optimizer: Optional[str]) -> str:
    """``key`` as logged for one optimizer's step in runs with several optimizers
    (``grad_norm_total/Adam-1``, ``grad_norm_total_clipped/Adam-1``); ``key`` itself with one."""
    return key if optimizer is None else f"{key}/{optimizer}"


def total_norm_key(optimizer: Optional[str] = None) -> str:
    """``grad_norm_total``, or ``grad_norm_total/<optimizer>`` in runs with several optimizers."""
    return for_optimizer(TOTAL_NORM_KEY, optimizer)


def optimizer_of(key: str) -> Optional[str]:
    """The optimizer a per-optimizer total-norm key names (``grad_norm_total/Adam-1`` ->
    ``Adam-1``), else ``None``."""
    head = TOTAL_NORM_KEY + "/"
    return key[len(head) :] if key.startswith(head) and len(key) > len(head) else None


def _with_suffix(key: str, suffix: str) -> str:
    """``key`` + ``suffix``, the suffix before a per-optimizer part (``grad_norm_total/Adam`` ->
    ``grad_norm_total_max/Adam``)."""
    optimizer = optimizer_of(key)
    return for_optimizer(TOTAL_NORM_KEY + suffix, optimizer) if optimizer else key + suffix


def is_update_metric(metric: str) -> bool:
    """Whether ``metric`` (a key or a ``*`` pattern) names an update figure, known only once the
    optimizer stepped: its literal head (before any ``*``, ``?`` or ``[``) and one of
    :data:`UPDATE_FAMILIES` start alike (``update_ratio/*``, ``update_ratio_total/Adam``)."""
    head = re.split(r"[*?\[]", metric, maxsplit=1)[0]
    return bool(head) and any(f.startswith(head) or head.startswith(f) for f in UPDATE_FAMILIES)


def update_ratio_key(block: str) -> str:
    return UPDATE_RATIO_PREFIX + block


def weight_norm_key(block: str) -> str:
    return WEIGHT_NORM_PREFIX + block


def norm_key(block: str) -> str:
    return NORM_PREFIX + block


def gain_key(block: str) -> str:
    return GAIN_PREFIX + block


def log_gain_key(block: str) -> str:
    return LOG_GAIN_PREFIX + block


def param_norm_key(param: str) -> str:
    return PARAM_NORM_PREFIX + param


def flow_key(stat: str) -> str:
    return FLOW_PREFIX + stat


def stats_key(stat: str) -> str:
    return STATS_PREFIX + stat


def alert_key(rule_label: str) -> str:
    return ALERTS_PREFIX + rule_label


def interval_max_key(key: str) -> str:
    """The largest value of every-step figure ``key`` since the previous measured step
    (``grad_norm_total_max``, ``gradwatch/loss_max``)."""
    return _with_suffix(key, _INTERVAL_MAX)


def interval_mean_key(key: str) -> str:
    """The mean of every-step figure ``key`` since the previous measured step."""
    return _with_suffix(key, _INTERVAL_MEAN)


def clip_threshold_key(metric: str) -> str:
    """The threshold an adaptive clip rule on ``metric`` had in force at a step
    (``grad_norm_total_clip_threshold``)."""
    return _with_suffix(metric, _CLIP_THRESHOLD)
