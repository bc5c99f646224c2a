"""What ``log_updates=True`` costs: a measured step with the update figures against the same step
without them, on the benchmark's MLP and GPT (AdamW). The package is ``gradwatch_bench`` (next to
this file); the method is in :mod:`gradwatch_bench.updates`.

Usage::

    .venv/bin/python benchmarks/updates.py            # MLP and GPT, 10 rounds (a few minutes)
    .venv/bin/python benchmarks/updates.py --quick    # tiny models, 3 rounds (< 1 minute)

A full run writes ``updates.md`` and ``updates.json`` to ``benchmarks/results/`` (committed);
``--quick`` writes to ``benchmarks/results/quick/`` (scratch); ``--out`` chooses.
"""

from gradwatch_bench.updates import main  # run as a script, this file's folder is on sys.path

if __name__ == "__main__":
    main()
