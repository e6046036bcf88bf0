"""Bijective layers; each is a :class:`pyro.distributions.TransformModule`."""

from .autograd import AutogradBijection
from .conv import InvertibleConv1x1
from .coupling import AffineCoupling
from .elementwise import Exp
from .norm import ActNorm, InvertibleBatchNorm
from .permute import Permute, Reverse

ADBijector = AutogradBijection  # the tutorial's name

__all__ = [
    "ADBijector",
    "ActNorm",
    "AffineCoupling",
    "AutogradBijection",
    "Exp",
    "InvertibleBatchNorm",
    "InvertibleConv1x1",
    "Permute",
    "Reverse",
]

from .autoregressive import MaskedAutoregressive  # noqa: E402
from .spline import RationalQuadraticSpline, SplineCoupling  # noqa: E402

__all__ += ["MaskedAutoregressive", "RationalQuadraticSpline", "SplineCoupling"]
from .residual import ResidualBlock  # noqa: E402

__all__ += ["ResidualBlock"]
from .preprocess import CholeskyAffine, Standardize  # noqa: E402

__all__ += ["CholeskyAffine", "Standardize"]
