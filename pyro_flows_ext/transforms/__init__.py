"""Bijective layers; each is a :class:`pyro.distributions.TransformModule`.

Schemes (:class:`Coupling`, :class:`MaskedAutoregressive`) take any element map
(:class:`Affine`, :class:`RationalQuadratic`, or your own :class:`ElementMap`)."""

from .autograd import AutogradBijection
from .autoregressive import MaskedAutoregressive
from .conv import InvertibleConv1x1
from .coupling import AffineCoupling, Coupling, SplineCoupling
from .element_maps import Affine, ElementMap, RationalQuadratic
from .elementwise import Exp
from .emerging import EmergingConv
from .image_coupling import ImageCoupling
from .logit import Logit
from .norm import ActNorm, InvertibleBatchNorm
from .permute import Permute, Reverse
from .preprocess import CholeskyAffine, Standardize
from .residual import ResidualBlock
from .spline import RationalQuadraticSpline
from .squeeze import Squeeze

ADBijector = AutogradBijection  # the tutorial's name

__all__ = [
    "ADBijector",
    "ActNorm",
    "Affine",
    "AffineCoupling",
    "AutogradBijection",
    "CholeskyAffine",
    "Coupling",
    "ElementMap",
    "EmergingConv",
    "Exp",
    "ImageCoupling",
    "InvertibleBatchNorm",
    "InvertibleConv1x1",
    "Logit",
    "MaskedAutoregressive",
    "Permute",
    "RationalQuadratic",
    "RationalQuadraticSpline",
    "ResidualBlock",
    "Reverse",
    "SplineCoupling",
    "Squeeze",
    "Standardize",
]
