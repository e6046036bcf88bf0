"""Inference with flows: density fitting, flow autoguides and NeuTra HMC."""

from .bounds import iw_log_prob
from .density import fit_density
from .flow_matching import fit_flow_matching
from .guide import AutoFlowGuide
from .neutra import neutra_mcmc

__all__ = ["AutoFlowGuide", "fit_density", "fit_flow_matching", "iw_log_prob", "neutra_mcmc"]
