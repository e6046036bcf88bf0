"""Conditioner networks."""

from .made import MADE
from .mlp import MLP

__all__ = ["MADE", "MLP"]
