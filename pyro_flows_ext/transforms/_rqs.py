r"""Pure monotonic rational-quadratic spline maths (Durkan et al., 2019, "Neural Spline Flows").

The spline maps ``[-B, B]`` onto itself through ``K`` bins with knots
:math:`(x_k, y_k)` and positive derivatives :math:`d_k`; outside ``[-B, B]`` it is the
identity (linear tails). In bin ``k``, with :math:`\xi = (x - x_k)/w_k` and
:math:`s_k = h_k / w_k`,

.. math:: y = y_k + \frac{h_k [s_k \xi^2 + d_k \xi(1-\xi)]}{s_k + (d_{k+1} + d_k - 2 s_k)\xi(1-\xi)}.

Raw (unconstrained) parameters map to knots so that **zero raw parameters give the
identity**: widths and heights are a softmax (uniform when all raw values are equal) and
interior derivatives are :math:`d_{min} + \mathrm{softplus}(r + c)` with ``c`` chosen so
:math:`r = 0 \Rightarrow d = 1`; the two boundary derivatives are fixed to 1, so the spline
joins its identity tails with a continuous derivative.

Every function here works on arbitrary leading shapes and any floating dtype/device, and
never produces NaN: values in the tails are passed through, and the spline itself is
evaluated on inputs clamped into ``[-B, B]`` (so far-away values such as ``1e3`` are safe,
unlike Pyro's/nflows' ``InputOutsideDomain``).

References:
    C. Durkan, A. Bekasov, I. Murray, G. Papamakarios. Neural Spline Flows. NeurIPS 2019.
"""

import math

import torch
import torch.nn.functional as F

MIN_BIN = 1e-3
MIN_DERIV = 1e-3
# softplus(_SHIFT) = 1 - MIN_DERIV, so a raw derivative of 0 gives exactly 1.
_SHIFT = math.log(math.expm1(1.0 - MIN_DERIV))


def num_params(count_bins):
    """Raw parameters per spline: ``K`` widths, ``K`` heights, ``K - 1`` interior derivatives."""
    return 3 * count_bins - 1


def knots(raw, bound, min_bin=MIN_BIN, min_deriv=MIN_DERIV):
    r"""Knot positions and derivatives from raw parameters.

    Args:
        raw: ``(..., 3K - 1)``: widths ``[:K]``, heights ``[K:2K]``, derivatives ``[2K:]``.
        bound: half-width ``B`` of the spline interval.
    Returns:
        ``(xs, ys, ds)``, each ``(..., K + 1)``: increasing knots from ``-B`` to ``B`` and
        positive derivatives with ``ds[..., 0] = ds[..., -1] = 1``.
    """
    k = (raw.shape[-1] + 1) // 3
    raw_w, raw_h, raw_d = raw[..., :k], raw[..., k:2 * k], raw[..., 2 * k:]
    xs = _cumulative(raw_w, bound, min_bin)
    ys = _cumulative(raw_h, bound, min_bin)
    inner = min_deriv + F.softplus(raw_d + _SHIFT)
    one = torch.ones_like(inner[..., :1])
    return xs, ys, torch.cat([one, inner, one], dim=-1)


def _cumulative(raw, bound, min_bin):
    k = raw.shape[-1]
    widths = min_bin + (1 - min_bin * k) * torch.softmax(raw, dim=-1)
    edges = F.pad(torch.cumsum(widths, dim=-1), (1, 0))
    edges = 2 * bound * edges - bound
    # pin the ends exactly (cumsum round-off must not leave a gap at +-B)
    return torch.cat([torch.full_like(edges[..., :1], -bound), edges[..., 1:-1],
                      torch.full_like(edges[..., :1], bound)], dim=-1)


def _gather(params, idx):
    return params.gather(-1, idx).squeeze(-1)


def _bin(values, edges):
    """Index of the bin holding each value: number of interior edges <= value, ``(..., 1)``."""
    return (values[..., None] >= edges[..., 1:-1]).sum(-1, keepdim=True)


def _select(xs, ys, ds, idx):
    x0, x1 = _gather(xs, idx), _gather(xs, idx + 1)
    y0, y1 = _gather(ys, idx), _gather(ys, idx + 1)
    d0, d1 = _gather(ds, idx), _gather(ds, idx + 1)
    return x0, x1 - x0, y0, y1 - y0, d0, d1


def _clamp01(xi):
    """``xi`` clamped into ``[0, 1]`` against round-off, keeping its gradient (a plain clamp
    would zero the gradient at a knot that round-off puts a hair outside the bin)."""
    return xi - (xi - xi.clamp(0, 1)).detach()


def _log_deriv(xi, s, d0, d1, den):
    one_minus = 1 - xi
    num = s.square() * (d1 * xi.square() + 2 * s * xi * one_minus + d0 * one_minus.square())
    return torch.log(num) - 2 * torch.log(den)


def rqs_forward(x, xs, ys, ds, bound):
    r"""Spline value and :math:`\log|dy/dx|`, element-wise.

    Args:
        x: ``(...)`` inputs.
        xs, ys, ds: ``(..., K + 1)`` knots and derivatives (broadcastable to ``x``).
        bound: ``B``; outside ``[-B, B]`` the map is the identity with log-derivative 0.
    Returns:
        ``(y, logabsdet)``, both shaped like ``x``.
    """
    shape = torch.broadcast_shapes(x.shape, xs.shape[:-1])
    x = x.expand(shape)
    xs, ys, ds = (t.expand(shape + t.shape[-1:]) for t in (xs, ys, ds))
    inside = (x >= -bound) & (x <= bound)
    xc = x.clamp(-bound, bound)
    idx = _bin(xc, xs)
    x0, w, y0, h, d0, d1 = _select(xs, ys, ds, idx)
    xi = _clamp01((xc - x0) / w)
    s = h / w
    t = xi * (1 - xi)
    den = s + (d1 + d0 - 2 * s) * t
    y = y0 + h * (s * xi.square() + d0 * t) / den
    lad = _log_deriv(xi, s, d0, d1, den)
    return torch.where(inside, y, x), torch.where(inside, lad, torch.zeros_like(lad))


def rqs_inverse(y, xs, ys, ds, bound):
    r"""Analytic inverse: root of the quadratic in :math:`\xi` (Durkan et al., eq. 6-8), and
    :math:`\log|dx/dy|` (minus the forward log-derivative at the root).

    Args:
        y: ``(...)`` outputs.
        xs, ys, ds: ``(..., K + 1)`` as in :func:`rqs_forward`.
        bound: ``B``.
    Returns:
        ``(x, logabsdet)`` shaped like ``y``.
    """
    shape = torch.broadcast_shapes(y.shape, xs.shape[:-1])
    y = y.expand(shape)
    xs, ys, ds = (t.expand(shape + t.shape[-1:]) for t in (xs, ys, ds))
    inside = (y >= -bound) & (y <= bound)
    yc = y.clamp(-bound, bound)
    idx = _bin(yc, ys)
    x0, w, y0, h, d0, d1 = _select(xs, ys, ds, idx)
    s = h / w
    dy = yc - y0
    delta = d1 + d0 - 2 * s
    a = h * (s - d0) + dy * delta
    b = h * d0 - dy * delta
    c = -s * dy
    disc = (b.square() - 4 * a * c).clamp_min(0)
    # the stable root 2c / (-b - sqrt(disc)); -b - sqrt(disc) < 0 since b > 0 whenever c != 0
    xi = _clamp01(2 * c / (-b - disc.sqrt()))
    x = x0 + xi * w
    t = xi * (1 - xi)
    den = s + delta * t
    lad = -_log_deriv(xi, s, d0, d1, den)
    return torch.where(inside, x, y), torch.where(inside, lad, torch.zeros_like(lad))
