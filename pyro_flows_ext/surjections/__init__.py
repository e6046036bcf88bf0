"""SurVAE surjections (Nielsen et al., 2020) and RAD layers in Pyro's generative direction.

Inference surjections (data -> latent deterministic; ``log_prob`` exact): :class:`Abs`,
:class:`Slice`, :class:`ChannelSlice` (images), :class:`Sort`, :class:`MaxPool2d`, :class:`RAD`.
Generative surjection
(data -> latent draws noise; ``log_prob`` a stochastic lower bound, tightened by
:func:`pyro_flows_ext.infer.iw_log_prob`): :class:`Augment`, :class:`UniformDequantization`,
:class:`VariationalDequantization`.

Base-side helpers: :class:`HalfNormalMap` (a bijection onto the positive orthant, for
:class:`Abs`); :class:`OrderStatistics` (a base) and :class:`Ordered` (a bijection onto
sorted vectors), for :class:`Sort`."""

from .abs import Abs, HalfNormalMap
from .dequantization import UniformDequantization, VariationalDequantization
from .image_slice import ChannelSlice
from .pool import MaxPool2d
from .rad import RAD
from .slicing import Augment, Slice
from .sort import Ordered, OrderStatistics, Sort

__all__ = ["Abs", "Augment", "ChannelSlice", "HalfNormalMap", "MaxPool2d", "OrderStatistics",
           "Ordered", "RAD", "Slice", "Sort", "UniformDequantization", "VariationalDequantization"]
