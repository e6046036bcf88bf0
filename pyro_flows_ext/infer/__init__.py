"""Inference with flows: density fitting, flow autoguides and NeuTra HMC."""

from .density import fit_density
from .guide import AutoFlowGuide
from .neutra import neutra_mcmc

__all__ = ["AutoFlowGuide", "fit_density", "neutra_mcmc"]
