"""Marks for the callback's own warnings in tests that provoke them on purpose (so they do not crowd
the warnings summary, where a new warning must stand out). Tests that assert on a warning record
it regardless of these marks (``pytest.warns`` and ``recwarn`` record every warning)."""

from __future__ import annotations

import pytest

#: A rule trips: each governance test trips its rules on purpose.
RULE_TRIPS = pytest.mark.filterwarnings(
    "ignore:GradientFlowCallback. rule '.*' tripped at step:UserWarning"
)
#: The first measured step's wiring report (dead units, unconnected parameters, vanishing gains):
#: the models of these tests have them on purpose.
WIRING_REPORT = pytest.mark.filterwarnings(
    "ignore:GradientFlowCallback. gradient wiring at step:UserWarning"
)
