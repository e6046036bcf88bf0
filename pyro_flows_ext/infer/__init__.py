"""Inference with flows: density fitting."""

from .density import fit_density

__all__ = ["fit_density"]
