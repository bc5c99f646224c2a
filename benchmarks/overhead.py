"""What ``GradientFlowCallback`` costs per training step: the command-line entry of the benchmark
package ``gradwatch_bench`` (next to this file), where the models, variants, harness, statistics
and writers live.

Usage::

    .venv/bin/python benchmarks/overhead.py            # the full run (several minutes), or: make bench
    .venv/bin/python benchmarks/overhead.py --quick    # tiny models, a few steps (smoke test)

A full run writes ``overhead.md`` and ``overhead.json`` to ``benchmarks/results/`` (committed: the
README cites them); ``--quick`` writes to ``benchmarks/results/quick/`` (scratch); ``--out`` chooses.
"""

from gradwatch_bench.cli import main  # run as a script, this file's folder is on sys.path

if __name__ == "__main__":
    main()
