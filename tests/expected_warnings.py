"""Marks for the callback's own warnings in tests that provoke them on purpose (so they do not crowd
the warnings summary, where a new warning must stand out). Tests that assert on a warning record
it regardless of these marks (``pytest.warns`` and ``recwarn`` record every warning)."""

from __future__ import annotations

import pytest

#: A rule trips: each governance test trips its rules on purpose.
RULE_TRIPS = pytest.mark.filterwarnings(
    "ignore:GradientFlowCallback. rule '.*' tripped at step:UserWarning"
)
#: The first measured step's wiring report (dead units, unconnected parameters, vanishing gains) and
#: the findings that already apply there: the models of these tests have them on purpose (or, like
#: the small tanh nets most tests use, a damping flow a diagnosis rightly names).
WIRING_REPORT = pytest.mark.filterwarnings(
    "ignore:GradientFlowCallback. (gradient wiring at step|step [0-9]+. ):UserWarning"
)
#: Lightning, resuming with a ModelCheckpoint whose folder differs from the checkpoint's run: the
#: resume tests write each run to its own folder on purpose.
NEW_CHECKPOINT_DIR = pytest.mark.filterwarnings("ignore:The dirpath has changed from:UserWarning")
