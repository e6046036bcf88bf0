"""Continuous flows: CNF (FFJORD, augmented neural ODEs, RNODE) and OT-Flow."""

from .cnf import CNF
from .otflow import OTFlow

__all__ = ["CNF", "OTFlow", "regularization"]


def regularization(flow):
    """The sum of ``regularization()`` over a flow's layers that have one (CNF's RNODE terms,
    OT-Flow's transport and HJB penalties) from their last training solve; add it to the
    training loss."""
    transforms = getattr(flow, "transforms", flow)
    total = 0.0
    for t in transforms:
        t = getattr(t, "layer", t)  # a conditioned view: its layer holds the terms
        if hasattr(t, "regularization"):
            total = total + t.regularization()
    return total
