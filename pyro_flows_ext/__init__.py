"""pyro-flows-ext: normalizing flows as first-class Pyro citizens."""

from . import flows, infer, nn, stochastic, surjections, transforms
from .core import FlowLayer, StochasticLayer, Surjection
from .distributions import Flow
from .io import load, save

__version__ = "0.1.0"

__all__ = [
    "Flow",
    "FlowLayer",
    "StochasticLayer",
    "Surjection",
    "flows",
    "infer",
    "load",
    "nn",
    "save",
    "stochastic",
    "surjections",
    "transforms",
]


def __getattr__(name):
    # datasets, plots and diagnostics import numpy/matplotlib/arviz, continuous imports
    # torchdiffeq: load them on first use
    if name in ("datasets", "plots", "diagnostics", "continuous"):
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
