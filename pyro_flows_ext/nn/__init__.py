"""Conditioner networks."""

from .dynamics import ConcatLinear, ConcatSquashLinear, TimeMLP
from .made import MADE
from .mlp import MLP

__all__ = ["MADE", "MLP", "ConcatLinear", "ConcatSquashLinear", "TimeMLP"]
