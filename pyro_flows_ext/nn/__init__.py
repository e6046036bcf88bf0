"""Conditioner networks."""

from .dynamics import ConcatLinear, ConcatSquashLinear, TimeMLP
from .made import MADE
from .mlp import MLP
from .resnet import ConvResNet

__all__ = ["MADE", "MLP", "ConcatLinear", "ConvResNet", "ConcatSquashLinear", "TimeMLP"]
