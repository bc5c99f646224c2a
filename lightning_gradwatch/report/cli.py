"""The ``gradwatch`` console script.

``gradwatch report LOGDIR [--format text|json] [--step N] [--out DIR] [--compare LOGDIR2 ...]``

``LOGDIR``, ``LOGDIR2`` and ``DIR`` may be local folders or URLs (``s3://``, ``gs://``,
``memory://``, ...), read and written through fsspec as Lightning writes its logs.

Bad input (missing directory, no event files, no gradwatch metrics, a step that was not measured)
prints one line to stderr and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from lightning_gradwatch.files import copy_file, filesystem, is_local, join
from lightning_gradwatch.keys import DEFAULT_EPS
from lightning_gradwatch.report.reader import ReportError, RunLog, read_logdir
from lightning_gradwatch.report.summary import RunReport, build_report
from lightning_gradwatch.report.text import format_comparison, format_text, to_dict

EXIT_BAD_INPUT = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradwatch", description="Offline reports over lightning-gradwatch logs."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    report = commands.add_parser(
        "report",
        help="report on a run's gradient flow",
        description=(
            "Read TensorBoard event files (or CSVLogger metrics.csv) and gradwatch_alerts.jsonl "
            "under LOGDIR and report per block: last/median/max norm, median gain, category "
            "counts, the GradientGainMonitor report of one step, the summary and the alert "
            "timeline. A LOGDIR holding several runs reports each of them."
        ),
    )
    report.add_argument(
        "logdir", metavar="LOGDIR", help="a run's log folder or URL (or a parent of runs)"
    )
    report.add_argument("--format", choices=("text", "json"), default="text")
    report.add_argument("--step", type=int, default=None, help="report this measured step only")
    report.add_argument(
        "--out", metavar="DIR", default=None, help="write PNGs and report.html (a folder or URL)"
    )
    report.add_argument(
        "--compare",
        metavar="LOGDIR2",
        nargs="+",
        default=[],
        help="more runs to put side by side",
    )
    for flag, default in (
        ("--damping-threshold", 0.5),
        ("--amplifying-threshold", 2.0),
        ("--eps", DEFAULT_EPS),
    ):
        report.add_argument(
            flag,
            type=float,
            default=None,
            help=f"default: the run's logged setting, else {default}",
        )
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``gradwatch``; returns the exit code (0 ok, 2 bad input)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # argparse already printed the usage and the error
        return int(exit_.code) if isinstance(exit_.code, int) else EXIT_BAD_INPUT
    try:
        return _report(args)
    except ReportError as error:
        print(f"gradwatch: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ImportError as error:  # matplotlib missing for --out
        print(f"gradwatch: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as error:  # unreadable log file, --out not writable
        print(f"gradwatch: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _report(args: argparse.Namespace) -> int:
    runs: list[RunLog] = []
    for logdir in [args.logdir, *args.compare]:
        runs.extend(read_logdir(logdir))
    _unique_names(runs)
    reports = [
        build_report(
            run,
            step=args.step,
            damping_threshold=args.damping_threshold,
            amplifying_threshold=args.amplifying_threshold,
            eps=args.eps,
        )
        for run in runs
    ]
    comparison = format_comparison(reports) if len(reports) > 1 else ""
    if args.format == "json":
        print(json.dumps({"runs": [to_dict(r) for r in reports]}, indent=2, allow_nan=False))
    else:
        texts = [format_text(r) for r in reports]
        print(("\n\n" + "#" * 72 + "\n\n").join(texts))
        if comparison:
            print("\n" + comparison)
    if args.out is not None:
        _write_out(runs, reports, args.out, comparison)
    return 0


def _write_out(
    runs: Sequence[RunLog], reports: Sequence[RunReport], out: str, comparison: str
) -> None:
    """The pictures and the page, in ``out``; a URL gets them drawn locally first, then copied."""
    if is_local(out):
        count = _write_pictures(runs, reports, Path(filesystem(out)[1]), comparison)
    else:
        with tempfile.TemporaryDirectory(prefix="gradwatch-report-") as local:
            count = _write_pictures(runs, reports, Path(local), comparison)
            for folder, _, names in os.walk(local):
                for name in names:
                    relative = os.path.relpath(os.path.join(folder, name), local)
                    copy_file(os.path.join(folder, name), join(out, *relative.split(os.sep)))
    # stderr, so that `--format json --out DIR` keeps stdout parseable.
    print(f"gradwatch: wrote {join(out, 'report.html')} and {count} PNGs", file=sys.stderr)


def _write_pictures(
    runs: Sequence[RunLog], reports: Sequence[RunReport], out: Path, comparison: str
) -> int:
    """Write every run's PNGs and ``report.html`` into the local folder ``out``; the PNG count."""
    from lightning_gradwatch.report.plots import write_html, write_run_pictures

    sections = []
    for run, report in zip(runs, reports):
        folder = out / _safe(run.name) if len(runs) > 1 else out
        sections.append((report, write_run_pictures(run, report, folder)))
    write_html(sections, out / "report.html", comparison)
    return sum(len(p) for _, p in sections)


def _unique_names(runs: Sequence[RunLog]) -> None:
    """Runs with the same name (``version_0`` twice) get as many parent folders as tell them apart."""
    for depth in range(2, 8):
        names = [run.name for run in runs]
        clashing = [run for run in runs if names.count(run.name) > 1]
        if not clashing:
            return
        for run in clashing:
            run.name = "/".join(_parts(run.path)[-depth:])
    names = [run.name for run in runs]
    for index, run in enumerate(runs):
        if names.count(run.name) > 1:  # the same folder given twice
            run.name = f"{run.name}#{index + 1}"


def _parts(path: str) -> list[str]:
    """The components of a run's folder: a local path resolved, a URL split at ``/``."""
    if "://" not in path:
        return list(Path(path).resolve().parts)
    return [part for part in path.split("/") if part]


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


if __name__ == "__main__":
    sys.exit(main())
