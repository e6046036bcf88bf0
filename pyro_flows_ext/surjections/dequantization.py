r"""Dequantization as a generative surjection (SurVAE Flows, section 4.2): a flow over
continuous :math:`y \in [0, k)^D` becomes a model of :math:`k`-level data
:math:`x \in \{0, \dots, k-1\}^D`.

Generative :math:`x = \lfloor y \rfloor`; inference :math:`y = x + u`,
:math:`u \sim q(u \mid x)` on :math:`[0, 1)^D`; :math:`V = -\log q(u \mid x)`. So
``flow.log_prob(x)`` is :math:`\log p(x + u) - \log q(u \mid x)`, a stochastic lower bound on
:math:`\log P(x)` whose exp is unbiased for :math:`P(x) = \int_{[0,1)^D} p(x + u)\,du`
(Theis et al. 2016; Ho et al. 2019), and ``flow.is_exact`` is False. Scoring the same tensor
twice reuses its draw of ``u``; ``x.clone()`` (or ``x.expand((K,) + x.shape)``, what
:func:`pyro_flows_ext.infer.iw_log_prob` does) draws again.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import constraints

from ..core import Surjection, batch_shape_of
from ..nn import MLP
from ..transforms.element_maps import soft_clamp
from ._densities import as_density

__all__ = ["UniformDequantization", "VariationalDequantization"]


def _logistic_log_density(e):
    """Elementwise :math:`\\log` of the standard logistic density (the density of
    :math:`\\mathrm{logit}(u)` for uniform ``u``): :math:`\\log\\sigma(e) + \\log\\sigma(-e)`."""
    return F.logsigmoid(e) + F.logsigmoid(-e)


class _Dequantization(Surjection):
    """Shared parts: the integer-data checks, the floor and the unseen-pair closed form."""

    stochastic_forward, stochastic_inverse = False, True
    #: the data side is discrete (``fit_density`` skips its discrete-column warning)
    discrete = True

    def _setup(self, k, event_dim):
        if isinstance(k, bool) or int(k) != k or k < 2:
            raise ValueError(f"{type(self).__name__} needs an integer number of levels k >= 2, "
                             f"got {k!r}")
        self.k, self.event_dim = int(k), int(event_dim)

    @constraints.dependent_property(is_discrete=True)
    def codomain(self):
        return constraints.independent(constraints.integer_interval(0, self.k - 1),
                                       self.event_dim)

    def _sum(self, t):
        return t.sum(tuple(range(-self.event_dim, 0))) if self.event_dim else t

    def check_data(self, x):
        """Raises a ``ValueError`` unless ``x`` holds integer levels ``0 .. k-1``."""
        if x.is_floating_point() and not torch.equal(x, x.floor()):
            bad = x[x != x.floor()].flatten()[0].item()
            raise ValueError(f"{type(self).__name__} expects integer-valued {self.k}-level data "
                             f"(0 .. {self.k - 1}), got non-integer values such as {bad:g}; "
                             "pass the raw levels, not rescaled or dequantized values")
        lo, hi = x.min().item(), x.max().item()
        if lo < 0 or hi > self.k - 1:
            raise ValueError(f"{type(self).__name__} expects {self.k}-level data with values in "
                             f"0 .. {self.k - 1}, got values from {lo:g} to {hi:g}; set k to the "
                             "number of levels of the data")

    def _floor(self, y):
        x = y.floor().clamp(0, self.k - 1)  # samples outside [0, k) go to the edge levels
        eps = torch.finfo(y.dtype).eps
        return x, (y - x).clamp(0.0, 1.0 - eps)

    def call_and_ladj(self, z):
        x, u = self._floor(z)
        return x, self.log_q(u, x)

    def inverse_and_ladj(self, x):
        self.check_data(x)
        u, log_q = self.sample_noise(x)
        return x + u, -log_q

    def _ladj_of_unseen_pair(self, z, x):
        return self.log_q(self._floor(z)[1], x)


class UniformDequantization(_Dequantization):
    r"""Uniform dequantization of ``k``-level data; generative surjection (``log_prob`` is a
    stochastic lower bound on the discrete :math:`\log P(x)`).

    Inference :math:`y = x + u,\ u \sim U[0, 1)^D`; generative :math:`x = \lfloor y \rfloor`
    (clamped to ``0 .. k-1``); :math:`V = -\log q(u \mid x) = 0`.

    Args:
        k: number of levels (256 for 8-bit images, 17 for scikit-learn's digits).
        event_dim: 1 for vectors, 3 for ``(C, H, W)`` images.
    Shapes: ``x``, ``z``: ``(*batch, *event)``; ``ladj``: ``batch``. ``x`` must hold integer
    values in ``0 .. k-1`` (in a floating dtype, as the flow's).
    References: SurVAE Flows (Nielsen et al., 2020), https://arxiv.org/abs/2007.02731
    """

    def __init__(self, k=256, event_dim=1):
        super().__init__()
        self.dim = None
        self._setup(k, event_dim)

    def sample_noise(self, x):
        """``(u, log q(u | x))``: ``u ~ U[0, 1)`` of the shape of ``x``, ``log q = 0``."""
        u = torch.rand_like(x)
        return u, x.new_zeros(batch_shape_of(x, self.event_dim))

    def log_q(self, u, x):
        """:math:`\\log q(u \\mid x) = 0` for ``u`` in ``[0, 1)``, shape ``batch``."""
        inside = ((u >= 0) & (u < 1)).reshape(*batch_shape_of(u, self.event_dim), -1).all(-1)
        return torch.where(inside, 0.0, -math.inf).to(u.dtype)

    def extra_repr(self):
        return f"k={self.k}, event_dim={self.event_dim}"


class _ConditionalNoise(nn.Module):
    r"""The default :math:`q(e \mid c)` of :class:`VariationalDequantization`: a conditional
    flow :math:`e = g_L \circ \dots \circ g_1(\mu(c) + \sigma(c)\,\epsilon)` with
    :math:`\epsilon` standard logistic (so at the zero-initialised start
    :math:`u = \sigma(e)` is uniform) and :math:`g_l` affine couplings with alternating
    checkerboard (images) or even/odd (vectors) masks whose conditioners see the other half of
    :math:`e` and :math:`c`. Conditioners: 3x3 convolutions for ``(C, H, W)`` events, MLPs for
    vectors; last layers zero.

    Shapes: ``c``, ``e``: ``(*batch, *event)``; log-densities ``batch``."""

    def __init__(self, event_shape, hidden=32, num_layers=2, clamp=3.0):
        super().__init__()
        self.event_shape, self.clamp = torch.Size(event_shape), float(clamp)
        if len(self.event_shape) not in (1, 3):
            raise ValueError("VariationalDequantization's default noise model needs a vector "
                             f"(D,) or image (C, H, W) shape, got {tuple(event_shape)}")
        self.conv = len(self.event_shape) == 3
        channels = self.event_shape[0]
        self.nets = nn.ModuleList([self._net(channels, 2 * channels, hidden)] + [
            self._net(2 * channels, 2 * channels, hidden) for _ in range(num_layers)])
        if self.conv:
            _, h, w = self.event_shape
            parity = (torch.arange(h)[:, None] + torch.arange(w)) % 2
        else:
            parity = torch.arange(channels) % 2
        masks = torch.stack([(parity == i % 2).float() for i in range(num_layers)])
        masks = masks[:, None] if self.conv else masks  # the same mask on every channel
        self.register_buffer("masks", masks.expand(num_layers, *self.event_shape).clone())

    def _net(self, n_in, n_out, hidden):
        if not self.conv:
            return MLP(n_in, n_out, (hidden, hidden))
        last = nn.Conv2d(hidden, n_out, 3, padding=1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        return nn.Sequential(nn.Conv2d(n_in, hidden, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(hidden, hidden, 1), nn.ReLU(), last)

    def _params(self, i, inp):
        """``(shift, log_scale)`` of stage ``i`` from its input ``(*batch, *event')``."""
        n = len(self.event_shape)
        batch = inp.shape[: inp.dim() - n]
        out = self.nets[i](inp.reshape(-1, *inp.shape[inp.dim() - n:]) if self.conv else inp)
        shift, raw = out.reshape(*batch, *out.shape[out.dim() - n:]).chunk(2, -n)
        return shift, soft_clamp(raw, self.clamp)

    def _sum(self, t):
        return t.sum(tuple(range(-len(self.event_shape), 0)))

    def _coupling_input(self, e, mask, c):
        return torch.cat([e * mask, c], -len(self.event_shape))

    def sample_and_log_prob(self, c):
        u0 = torch.rand_like(c).clamp(torch.finfo(c.dtype).tiny, 1 - torch.finfo(c.dtype).eps)
        eps = torch.log(u0) - torch.log1p(-u0)
        shift, log_scale = self._params(0, c)
        e = shift + eps * log_scale.exp()
        log_q = self._sum(_logistic_log_density(eps) - log_scale)
        for i, mask in enumerate(self.masks, 1):
            shift, log_scale = self._params(i, self._coupling_input(e, mask, c))
            shift, log_scale = shift * (1 - mask), log_scale * (1 - mask)
            e = e * log_scale.exp() + shift
            log_q = log_q - self._sum(log_scale)
        return e, log_q

    def log_prob(self, e, c):
        total = 0.0
        for i in reversed(range(1, len(self.nets))):
            mask = self.masks[i - 1]
            shift, log_scale = self._params(i, self._coupling_input(e, mask, c))
            shift, log_scale = shift * (1 - mask), log_scale * (1 - mask)
            e = (e - shift) * torch.exp(-log_scale)
            total = total + self._sum(log_scale)
        shift, log_scale = self._params(0, c)
        eps = (e - shift) * torch.exp(-log_scale)
        return self._sum(_logistic_log_density(eps) - log_scale) - total


class VariationalDequantization(_Dequantization):
    r"""Variational dequantization (Flow++, Ho et al. 2019) of ``k``-level data; generative
    surjection (``log_prob`` is a stochastic lower bound on :math:`\log P(x)`, tighter than
    uniform dequantization's as :math:`q` learns).

    Inference :math:`y = x + u` with :math:`u = \sigma(e)`, :math:`e \sim q(e \mid x)` a
    learned conditional flow; generative :math:`x = \lfloor y \rfloor`;
    :math:`V = -\log q(u \mid x) = -\log q(e \mid x) + \sum_i \log \sigma'(e_i)`.
    The training objective is SurVAE's / Flow++'s ELBO
    :math:`E_q[\log p(x + u) - \log q(u \mid x)]`; report
    :func:`pyro_flows_ext.infer.iw_bits_per_dim` as well (importance-weighted over ``K``
    draws).

    Args:
        shape: the event shape, ``D`` (vectors) or ``(C, H, W)`` (images).
        k: number of levels.
        flow: :math:`q(e \mid x)`: ``None`` (default) a logistic base with a conditional affine
            map and ``num_layers`` affine couplings whose conditioners (convolutions for
            images, MLPs for vectors) see ``x`` scaled to ``[-1, 1]``; it starts at uniform
            dequantization. Or a conditional :class:`~pyro_flows_ext.Flow` over the ``D``
            flattened values with ``context_dim = D`` (the flattened scaled ``x``), e.g.
            ``pfe.flows.nsf(D, context_dim=D)``.
        hidden_channels: width of the default conditioners.
        num_layers: couplings of the default noise flow.
    Shapes: ``x``, ``z``: ``(*batch, *shape)``; ``ladj``: ``batch``.
    References: Ho et al., Flow++ (2019), https://arxiv.org/abs/1902.00275; SurVAE Flows
    (Nielsen et al., 2020), https://arxiv.org/abs/2007.02731
    """

    def __init__(self, shape, k=256, flow=None, hidden_channels=32, num_layers=2):
        super().__init__()
        shape = torch.Size([shape] if isinstance(shape, int) else shape)
        if len(shape) == 0 or any(s < 1 for s in shape):
            raise ValueError(f"VariationalDequantization needs an event shape such as (D,) or "
                             f"(C, H, W), got {tuple(shape)}")
        self._setup(k, len(shape))
        self.shape, self.dim = shape, shape[0]
        if flow is None:
            self.noise = _ConditionalNoise(shape, hidden_channels, num_layers)
        else:
            self.noise = as_density(flow, shape.numel(), shape.numel(), None)

    def _check_shape(self, shape):
        n = self.event_dim
        if len(shape) < n or tuple(shape[len(shape) - n:]) != tuple(self.shape):
            raise ValueError(f"VariationalDequantization expects events of shape "
                             f"{tuple(self.shape)}, got a tensor of shape {tuple(shape)}")
        return shape

    forward_shape = inverse_shape = _check_shape

    def base_event_shape(self):
        return self.shape

    def _context(self, x):
        return x * (2.0 / (self.k - 1)) - 1.0

    def _flat(self, t):
        return t.flatten(t.dim() - self.event_dim) if self.event_dim > 1 else t

    def _unflat(self, t):
        return t.unflatten(-1, self.shape) if self.event_dim > 1 else t

    def sample_noise(self, x):
        """``(u, log q(u | x))`` with ``u`` of the shape of ``x``, in ``[0, 1)``."""
        c = self._context(x)
        if isinstance(self.noise, _ConditionalNoise):
            e, log_qe = self.noise.sample_and_log_prob(c)
        else:
            e, log_qe = self.noise.sample_and_log_prob(self._flat(c))
            e = self._unflat(e)
        u = torch.sigmoid(e).clamp(max=1 - torch.finfo(e.dtype).eps)
        return u, log_qe - self._sum(_logistic_log_density(e))

    def log_q(self, u, x):
        r""":math:`\log q(u \mid x)` for ``u`` in ``(0, 1)``, shape ``batch``."""
        tiny = torch.finfo(u.dtype).tiny
        e = torch.log(u.clamp_min(tiny)) - torch.log1p(-u)
        c = self._context(x)
        if isinstance(self.noise, _ConditionalNoise):
            log_qe = self.noise.log_prob(e, c)
        else:
            log_qe = self.noise.log_prob(self._flat(e), self._flat(c))
        return log_qe - self._sum(_logistic_log_density(e))

    def extra_repr(self):
        return f"shape={tuple(self.shape)}, k={self.k}"
