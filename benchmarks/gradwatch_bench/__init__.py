"""What ``GradientFlowCallback`` costs per training step, against the built-in way and two floors.

Every variant runs inside ONE ``lightning.Trainer`` fit per model, switched per optimizer step: each
round is a shuffled sequence of one step per variant (the baseline included), so the machine's drift
(this kind of shared machine moves by 5-10 % over minutes) hits every variant alike, and each variant
step is paired with the baseline step of the same round. A variant is attached (hooks registered) at
the start of its step and fully detached afterwards, outside the timed window; the baseline step has
no hook at all.

Reported per variant: median step time (wall clock) and its min-max over rounds, the paired
difference to the baseline step of the same round (median, bootstrap 95 % CI), the ratio to the
baseline, the same difference in process CPU time, and the variant's *own* time per step: wall time
spent inside its Lightning hooks, forward hooks, tensor hooks and module backward hooks (measured by
wrapping them; autograd's own machinery for full backward hooks is not in it, so the
``backward_hooks`` own time is a lower bound).

Modules, in the order a run uses them:

* :mod:`~gradwatch_bench.models`: the benchmarked models and the ``LightningModule`` around them.
* :mod:`~gradwatch_bench.variants`: the compared ways of watching gradients.
* :mod:`~gradwatch_bench.timing`: own-time instrumentation of hooks.
* :mod:`~gradwatch_bench.harness`: the interleaved schedule, the switchboard callback, one fit.
* :mod:`~gradwatch_bench.stats`: medians, paired differences, bootstrap CIs, derived variants.
* :mod:`~gradwatch_bench.memory`: memory held after many measured steps.
* :mod:`~gradwatch_bench.goals`: the goals and their verdicts (met, not met, not measurable at
  this noise).
* :mod:`~gradwatch_bench.writer`: the Markdown table, the JSON file, the README's summary table.
* :mod:`~gradwatch_bench.cli`: the command line (``benchmarks/overhead.py`` calls it).
"""
