"""Inference with flows: density fitting, flow autoguides and NeuTra HMC."""

from .bits import bits_per_dim, categorical_bits_per_dim, iw_bits_per_dim
from .bounds import iw_dreg_loss, iw_log_prob
from .density import fit_density
from .flow_matching import fit_flow_matching
from .guide import AutoFlowGuide
from .neutra import neutra_mcmc

__all__ = ["AutoFlowGuide", "DiagnosticWarning", "bits_per_dim", "categorical_bits_per_dim",
           "fit_density", "fit_flow_matching", "iw_bits_per_dim", "iw_dreg_loss", "iw_log_prob",
           "neutra_mcmc"]


def __getattr__(name):
    # DiagnosticWarning (what neutra_mcmc warns with) lives in diagnostics, which imports
    # arviz: loaded on first use, not with the package
    if name == "DiagnosticWarning":
        from ..diagnostics import DiagnosticWarning

        return DiagnosticWarning
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
