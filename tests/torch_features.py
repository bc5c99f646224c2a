"""Skip marks for tests of features that need a newer torch or Lightning than the oldest supported
ones (``requirements/oldest.txt``), each with the reason and the versions it was seen on.

Capabilities are probed where a probe is cheap; otherwise the mark names the oldest torch the test
was verified to pass on.
"""

from __future__ import annotations

import lightning
import pytest
import torch
from packaging.version import Version
from torch import nn

from lightning_gradwatch._compat import TORCH_FOR_COMPILE_WITHOUT_GRAPH_BREAKS, torch_older_than

#: The oldest torch on which FSDP2 trained on CPU processes (gloo) with the expected collectives.
TORCH_FOR_FSDP2_ON_CPU = "2.13"
#: The oldest torch on which measured steps were seen to keep the package's traced memory flat.
TORCH_FOR_FLAT_TRACED_MEMORY = "2.13"


#: The first Lightning that resumes from a checkpoint saved at a batch end (``ModelCheckpoint(
#: every_n_train_steps=...)``) with the next batch: Lightning 2.4.0 runs the checkpoint's last batch
#: again, with or without the callback, so the resumed run is not the uninterrupted one (verified
#: with 2.4.0 and 2.5.0 on torch 2.3.1; Lightning's fix: "Ensure restarting from checkpoints leads to
#: consistent internal counters", 2.5.0).
LIGHTNING_FOR_EXACT_RESUME = "2.5"


def _model_parallel_strategy_exists() -> bool:
    from lightning.pytorch.strategies import ModelParallelStrategy

    try:
        ModelParallelStrategy()
    except ImportError:  # Lightning refuses it on torch < 2.4
        return False
    return True


def _cpu_supports(probe: str) -> bool:
    try:
        if probe == "fused":
            torch.optim.AdamW([nn.Parameter(torch.ones(1))], fused=True)
        else:  # "bf16 mse"
            one = torch.ones(1, dtype=torch.bfloat16)
            nn.functional.mse_loss(one, one)
    except RuntimeError:
        return False
    return True


needs_compile_without_graph_breaks = pytest.mark.skipif(
    torch_older_than(TORCH_FOR_COMPILE_WITHOUT_GRAPH_BREAKS),
    reason=f"torch {torch.__version__}: the callback's block hooks break the compiled graph "
    f"(said at fit start); graph-break-free hooks need torch >= "
    f"{TORCH_FOR_COMPILE_WITHOUT_GRAPH_BREAKS}",
)
needs_fsdp2_on_cpu = pytest.mark.skipif(
    torch_older_than(TORCH_FOR_FSDP2_ON_CPU),
    reason=f"torch {torch.__version__}: FSDP2 on CPU processes was verified from torch "
    f"{TORCH_FOR_FSDP2_ON_CPU} (Lightning's ModelParallelStrategy needs torch >= 2.4; torch 2.6.0 "
    "fails inside fully_shard on CPU; torch 2.9.0 issues extra collectives of its own)",
)
needs_model_parallel_strategy = pytest.mark.skipif(
    not _model_parallel_strategy_exists(),
    reason=f"torch {torch.__version__}: Lightning's ModelParallelStrategy needs torch >= 2.4",
)
needs_exact_resume = pytest.mark.skipif(
    Version(lightning.__version__) < Version(LIGHTNING_FOR_EXACT_RESUME),
    reason=f"lightning {lightning.__version__} runs the last batch of a batch-end checkpoint again "
    f"when resuming (the run itself differs from the uninterrupted one); fixed in lightning "
    f"{LIGHTNING_FOR_EXACT_RESUME}",
)
needs_flat_traced_memory = pytest.mark.skipif(
    torch_older_than(TORCH_FOR_FLAT_TRACED_MEMORY),
    reason=f"torch {torch.__version__}: older torch (2.3.1-2.9.0 seen) keeps a few dozen bytes "
    "per measured step inside its own operators, which tracemalloc charges to the calling line of "
    f"this package; flat from torch {TORCH_FOR_FLAT_TRACED_MEMORY}",
)
needs_cpu_fused_optimizer = pytest.mark.skipif(
    not _cpu_supports("fused"),
    reason=f"torch {torch.__version__} has no fused optimizers on CPU (torch >= 2.4 has)",
)
needs_cpu_bf16_mse = pytest.mark.skipif(
    not _cpu_supports("bf16 mse"),
    reason=f"torch {torch.__version__} has no bfloat16 mse_loss on CPU (the test model's loss)",
)
