"""Conditioner networks."""

from .mlp import MLP

__all__ = ["MLP"]

from .made import MADE, MaskedLinear  # noqa: E402

__all__ += ["MADE", "MaskedLinear"]
