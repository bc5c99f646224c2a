"""lightning-gradwatch: watch gradient flow while a model trains, and act when it goes wrong."""

from lightning_gradwatch.callback import GradientFlowCallback
from lightning_gradwatch.governance import Rule
from lightning_gradwatch.measure.record import GradientMeasurement
from lightning_gradwatch.monitor import GradientGainMonitor
from lightning_gradwatch.numerics.norms import Category

__version__ = "0.1.0"

__all__ = [
    "Category",
    "GradientFlowCallback",
    "GradientGainMonitor",
    "GradientMeasurement",
    "Rule",
    "__version__",
]
