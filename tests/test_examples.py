"""Every example runs end to end (``--fast``: a few steps) in a fresh interpreter, writes its logs
under ``--root`` and shows what it claims to show."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(script: str, root: Path) -> str:
    env = {**os.environ, "GRADWATCH_EXAMPLES_FAST": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--fast", "--root", str(root)],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return result.stdout


def test_examples_readme_lists_every_example() -> None:
    readme = (EXAMPLES / "README.md").read_text()
    for script in sorted(EXAMPLES.glob("*.py")):
        if script.name != "common.py":
            assert script.name in readme, script.name


def test_demo(tmp_path: Path) -> None:
    out = _run("demo.py", tmp_path)
    for run in ("sigmoid_mlp", "relu_residual"):
        assert list((tmp_path / "demo" / run).glob("events.out.tfevents.*"))
    report = tmp_path / "demo" / "report"
    assert (report / "report.html").stat().st_size > 10_000
    assert len(list(report.rglob("*.png"))) == 6
    assert "tensorboard --logdir" in out and str(report / "report.html") in out
    assert "Comparison" in out


def test_ex01_activations(tmp_path: Path) -> None:
    out = _run("ex01_activations.py", tmp_path)
    damping = {}
    for run in ("sigmoid", "tanh", "relu"):
        (line,) = [x for x in out.splitlines() if x.startswith(f"[ex01] {run:>7}")]
        damping[run] = int(re.search(r"damping transitions (\d)/9", line).group(1))  # type: ignore[union-attr]
        ratio = float(re.search(r"end-to-end gain\) ([0-9.e+-]+)", line).group(1))  # type: ignore[union-attr]
        if run == "sigmoid":
            assert ratio < 1e-3  # the vanishing ratio
    assert damping["sigmoid"] >= 7 and damping["relu"] == 0
    assert (tmp_path / "ex01_activations" / "report" / "report.html").is_file()


def test_ex02_initialisation(tmp_path: Path) -> None:
    out = _run("ex02_initialisation.py", tmp_path)
    (line,) = [x for x in out.splitlines() if x.startswith("[ex02]") and "exploding_std5" in x]
    amplifying = int(re.search(r"amplifying (\d+)", line).group(1))  # type: ignore[union-attr]
    alerts = int(re.search(r"alerts (\d+)", line).group(1))  # type: ignore[union-attr]
    assert amplifying >= 5 and alerts >= 1
    jsonl = tmp_path / "ex02_initialisation" / "exploding_std5" / "gradwatch_alerts.jsonl"
    assert jsonl.is_file() and jsonl.read_text().strip()


def test_ex03_normalisation(tmp_path: Path) -> None:
    out = _run("ex03_normalisation.py", tmp_path)
    table = out[out.index("Comparison") :]
    assert "pre_ln" in table and "post_ln" in table
    assert (tmp_path / "ex03_normalisation" / "report" / "report.html").is_file()


def test_ex04_safety_incidents(tmp_path: Path) -> None:
    out = _run("ex04_safety_incidents.py", tmp_path)
    assert "[ex04] halted: True" in out
    run = tmp_path / "ex04_safety_incidents" / "incident_classifier"
    assert list(run.glob("gradwatch_halt_step*.ckpt"))
    assert "HALT nonfinite" in out and "CLIP grad_norm_total" in out


def test_ex05_plain_pytorch(tmp_path: Path) -> None:
    out = _run("ex05_plain_pytorch.py", tmp_path)
    assert "Transition  0 to  1: gamma=" in out
    assert "Summary Statistics:" in out


def test_ex06_lightning_cli(tmp_path: Path) -> None:
    out = _run("ex06_lightning_cli.py", tmp_path)
    assert "GradientFlowCallback" in out
    run = tmp_path / "ex06_lightning_cli" / "sigmoid_cli"
    assert list(run.glob("events.out.tfevents.*"))
    assert (run / "report" / "report.html").is_file()


def test_ex07_spike_rescue(tmp_path: Path) -> None:
    out = _run("ex07_spike_rescue.py", tmp_path)
    assert "[ex07] faults: 4 x random_bytes at step 16" in out
    for run in ("none", "governed"):
        (line,) = [x for x in out.splitlines() if x.startswith(f"[ex07] {run:>8}: held-out loss")]
        assert 0.0 < float(line.split()[4]) < 6.0  # trained: below the untrained ~5.9 nats


def test_ex08_gan(tmp_path: Path) -> None:
    out = _run("ex08_gan.py", tmp_path)
    assert "[ex08] 20 optimizer steps" in out
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "ex08_gan" / "gan")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"grad_norm_total/Adam", "grad_norm_total/Adam-1", "grad_norm/gen.0"} <= tags
    assert "grad_norm_total" not in tags
    steps = {
        key: [e.step for e in events.Scalars(key)]
        for key in ("grad_norm/gen.0", "grad_norm/disc.0")
    }
    assert all(step % 2 == 1 for step in steps["grad_norm/gen.0"])  # the generator's steps
    assert all(step % 2 == 0 for step in steps["grad_norm/disc.0"])


def test_ex10_edge_of_stability(tmp_path: Path) -> None:
    out = _run("ex10_edge_of_stability.py", tmp_path)
    assert "[ex10] threshold 2/lr = 40" in out
    assert re.search(r"first tripped at step: (None|\d+)", out)
    assert (tmp_path / "ex10_edge_of_stability" / "report" / "report.html").is_file()
    events = list((tmp_path / "ex10_edge_of_stability" / "full_batch_gd").glob("events.*"))
    assert events


def test_ex11_update_ratios(tmp_path: Path) -> None:
    out = _run("ex11_update_ratios.py", tmp_path)
    lines = {x.split(":")[0].split()[1]: x for x in out.splitlines() if x.startswith("[ex11] ")}
    assert "findings: none" in lines["adam_1e-3"] and "alerts 0" in lines["adam_1e-3"]
    assert "update_ratio_range" in lines["adam_3e-1"] and "alerts 0" not in lines["adam_3e-1"]
    assert "update_ratio_range" in lines["sgd_1e-5"]
    ratio = {run: float(line.split()[3].rstrip(",")) for run, line in lines.items()}
    assert ratio["sgd_1e-5"] < 1e-4 < ratio["adam_1e-3"] < 1e-2 < ratio["adam_3e-1"]
    report = tmp_path / "ex11_update_ratios" / "report"
    assert len(list(report.glob("*/update_ratios.png"))) == 3


def test_ex09_forensics(tmp_path: Path) -> None:
    out = _run("ex09_forensics.py", tmp_path)
    lines = [x for x in out.splitlines() if x.startswith("[ex09] step")]
    assert len(lines) == 3, out
    assert "batch 2," in lines[0] and lines[0].endswith("rerun transient")  # the flaky device
    assert "epoch 0, batch 5," in lines[1] and lines[1].endswith("rerun reproducible")
    assert "epoch 1, batch 5," in lines[2] and lines[2].endswith("rerun reproducible")
    # The bad batch has one fingerprint in both epochs.
    assert lines[1].split("fingerprint ")[1][:16] == lines[2].split("fingerprint ")[1][:16]
    assert "skipped from list" in out
    if "[ex09] resumed at (epoch, batch) (1, 0)" in out:  # Lightning 2.6 (2.4 resumes elsewhere)
        assert "[ex09] the resumed run ends with the first run's weights: True" in out
    assert "Incidents (skip list:" in out
    assert (tmp_path / "ex09_forensics" / "report" / "report.html").is_file()
