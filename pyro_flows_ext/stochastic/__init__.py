r"""Stochastic Normalizing Flows (Wu, Köhler, Noé 2020): MCMC layers between bijections.

Layers (random in both directions, ``exact = False``): :class:`MetropolisLayer`,
:class:`LangevinLayer` (MALA, or unadjusted with ``adjusted=False``), :class:`HMCLayer`.
Energies from Pyro models: :func:`potential_from_model`; annealing ladders:
:class:`InterpolatedEnergy`, :func:`ladder`. Training: :func:`fit_snf` (maximum likelihood,
reverse KL, or the paper's mix) and :class:`AutoSNFGuide` (an SNF as a Pyro SVI guide).
Reweighting: :func:`importance_weights`, :func:`effective_sample_size`.
"""

from ._base import MCMCLayer
from .hmc import HMCLayer
from .langevin import LangevinLayer
from .metropolis import MetropolisLayer
from .potential import (
    InterpolatedEnergy,
    ModelPotential,
    ladder,
    potential_from_model,
    standard_normal_energy,
)
from .train import AutoSNFGuide, fit_snf
from .weights import ImportanceWeights, effective_sample_size, importance_weights

__all__ = [
    "AutoSNFGuide",
    "HMCLayer",
    "ImportanceWeights",
    "InterpolatedEnergy",
    "LangevinLayer",
    "MCMCLayer",
    "MetropolisLayer",
    "ModelPotential",
    "effective_sample_size",
    "fit_snf",
    "importance_weights",
    "ladder",
    "potential_from_model",
    "standard_normal_energy",
]
