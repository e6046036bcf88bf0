r"""Element maps: the monotonic scalar maps that coupling and autoregressive schemes apply.

An element map :math:`y_i = \tau(u_i; \theta_i)` acts on each element ``u_i`` of a tensor with
its own parameters :math:`\theta_i \in \mathbb{R}^P`. A scheme (:class:`Coupling`,
:class:`MaskedAutoregressive`, an elementwise layer) computes :math:`\theta` and never knows
which map it carries (zuko's ``univariate=``, FlowJAX's ``transformer=``). Zero parameters
give the identity, so a layer whose conditioner starts at zero starts as the identity.

Writing one takes a few lines: ``num_params`` (``P``), ``forward(u, theta) -> (y, log|dy/du|)``
and ``inverse(y, theta) -> (u, log|du/dy|)``, each element-wise with ``theta`` of shape
``u.shape + (P,)`` (any strides). See ``README.md`` for a monotonic sigmoid example.
"""

import torch
from torch import nn

from ._rqs import num_params as _rqs_num_params
from ._rqs import spline_forward, spline_inverse, spline_table, table_map

__all__ = ["ElementMap", "Affine", "RationalQuadratic", "soft_clamp", "rational_clamp"]


def soft_clamp(raw, bound):
    r""":math:`b \tanh(r / b)`: the identity near 0, smooth, and bounded by ``b`` in absolute
    value, so ``exp(scale)`` never overflows however large the network output gets."""
    return bound * torch.tanh(raw / bound)


def rational_clamp(raw, bound):
    r""":math:`r / (1 + |r| / b)`: the identity near 0 and bounded by ``b`` like
    :func:`soft_clamp`, but its slope :math:`(1 + |r|/b)^{-2}` decays polynomially, not
    exponentially, so a saturated log-scale still gets a gradient (zuko's
    ``MonotonicAffineTransform``, whose ``b = log(1 / slope) = log 1000``)."""
    return raw / (1 + raw.abs() / bound)


SQUASHES = {"tanh": soft_clamp, "rational": rational_clamp}


class ElementMap(nn.Module):
    """Protocol of an element map (a module: it may hold buffers, never trained parameters;
    the parameters come from the scheme's conditioner).

    Attributes:
        num_params: ``P``, parameters per element.
        closed_form_inverse: whether ``inverse`` is analytic (else iterative).
        stl_stable: whether a guide using it trains stably with sticking-the-landing
            gradients.
        bound: half-width of the interval the map acts on (``None``: all of R).
    """

    num_params = 0
    closed_form_inverse = True
    stl_stable = True
    bound = None

    def forward(self, u, theta):
        """``(y, log|dy/du|)``, both shaped like ``u``; ``theta`` is ``u.shape + (P,)`` (or
        whatever this map's ``unflatten`` returns)."""
        raise NotImplementedError

    def inverse(self, y, theta):
        """``(u, log|du/dy|)``, both shaped like ``y``."""
        raise NotImplementedError

    def unflatten(self, flat, n):
        """``theta`` of shape ``(..., n, P)`` from a conditioner's flat ``(..., >= n P)`` output
        (variable-major: the ``P`` parameters of element ``i`` are adjacent). A map may return
        its own structure instead (Affine: a ``(shift, raw log-scale)`` pair), as long as its
        ``forward``/``inverse`` also accept the ``(..., n, P)`` tensor autoregressive
        conditioners give."""
        return flat[..., :n * self.num_params].unflatten(-1, (n, self.num_params))


class Affine(ElementMap):
    r"""Affine map :math:`y = u\, e^{s} + t`, :math:`\log|dy/du| = s`, with the raw log-scale
    squashed into ``(-clamp, clamp)``. ``theta = (t, s_{raw})``.

    Args:
        clamp: bound on the log-scale.
        squash: ``"tanh"`` (:func:`soft_clamp`, :math:`s = b \tanh(r / b)`) or
            ``"rational"`` (:func:`rational_clamp`, :math:`s = r / (1 + |r| / b)`, zuko's).
    """

    num_params = 2

    def __init__(self, clamp=5.0, squash="tanh"):
        super().__init__()
        if not 0 < float(clamp) < float("inf"):
            raise ValueError(f"clamp (the bound on the log-scale) must be positive and finite, "
                             f"got {clamp!r}")
        if squash not in SQUASHES:
            raise ValueError(f"unknown squash {squash!r}; expected 'tanh' or 'rational'")
        self.clamp, self.squash = float(clamp), squash
        self._squash = SQUASHES[squash]

    def forward(self, u, theta):
        shift, raw = theta if isinstance(theta, tuple) else theta.unbind(-1)
        log_scale = self._squash(raw, self.clamp)
        return u * log_scale.exp() + shift, log_scale

    def inverse(self, y, theta):
        shift, raw = theta if isinstance(theta, tuple) else theta.unbind(-1)
        neg_log_scale = -self._squash(raw, self.clamp)
        return (y - shift) * neg_log_scale.exp(), neg_log_scale

    def unflatten(self, flat, n):
        # parameter-major ([shifts | log-scales], RealNVP's layout) as a (shift, raw) pair: one
        # chunk, whose backward is one cat (a view and an unbind would cost a stack and a copy)
        if flat.shape[-1] != 2 * n:
            flat = flat[..., :2 * n]
        return flat.chunk(2, dim=-1)

    def extra_repr(self):
        extra = "" if self.squash == "tanh" else f", squash={self.squash!r}"
        return f"clamp={self.clamp}{extra}"


class RationalQuadratic(ElementMap):
    r"""Monotonic rational-quadratic spline (Durkan et al., 2019) on ``[-bound, bound]`` with
    ``bins`` bins and identity tails; ``P = 3 bins - 1`` (width and height logits, interior
    derivatives). Both directions are analytic; see ``_rqs.py`` for the maths.

    The constant matrix that turns raw parameters into the knot table is a buffer (rebuilt
    in float64 and cast whenever the module is moved or cast), so it follows ``.to()`` and
    nothing is cached outside the module.

    Args:
        bins: number of bins ``K``.
        bound: half-width ``B`` of the spline interval.
    """

    closed_form_inverse = True
    stl_stable = False  # an nsf guide with STL collapsed to a point within 60 steps

    def __init__(self, bins=8, bound=3.0):
        super().__init__()
        if isinstance(bins, bool) or int(bins) != bins or bins < 1:
            raise ValueError(f"the spline needs a positive integer number of bins, got {bins!r}")
        if not 0 < float(bound) < float("inf"):
            raise ValueError(f"the spline bound (half-width of [-bound, bound]) must be positive "
                             f"and finite, got {bound!r}")
        self.bins, self.bound = int(bins), float(bound)
        self.num_params = _rqs_num_params(self.bins)
        m, c = table_map(self.bins, self.bound)
        dtype = torch.get_default_dtype()
        self.register_buffer("table_m", m.to(dtype), persistent=False)
        self.register_buffer("table_c", c.to(dtype), persistent=False)

    def _apply(self, fn, *args, **kwargs):
        # rebuild the constants in float64 and cast, so .float().double() loses nothing
        super()._apply(fn, *args, **kwargs)
        m, c = table_map(self.bins, self.bound)
        self.table_m = m.to(dtype=self.table_m.dtype, device=self.table_m.device)
        self.table_c = c.to(dtype=self.table_c.dtype, device=self.table_c.device)
        return self

    def _table(self, theta):
        m, c = self.table_m, self.table_c
        if m.dtype != theta.dtype or m.device != theta.device:
            m, c = m.to(theta), c.to(theta)
        return spline_table(theta, self.bound, (m, c))

    def forward(self, u, theta):
        return spline_forward(u, self._table(theta), self.bound)

    def inverse(self, y, theta):
        return spline_inverse(y, self._table(theta), self.bound)

    def extra_repr(self):
        return f"bins={self.bins}, bound={self.bound}"
