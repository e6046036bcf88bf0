r"""Pure monotonic rational-quadratic spline maths (Durkan et al., 2019, "Neural Spline Flows").

The spline maps ``[-B, B]`` onto itself through ``K`` bins with knots
:math:`(x_k, y_k)` and positive derivatives :math:`d_k`; outside ``[-B, B]`` it is the
identity (linear tails). In bin ``k``, with :math:`\xi = (x - x_k)/w_k` and
:math:`s_k = h_k / w_k`,

.. math::

    y = y_k + \frac{h_k [s_k \xi^2 + d_k \xi(1-\xi)]}
                   {s_k + (d_{k+1} + d_k - 2 s_k)\xi(1-\xi)}.

Raw (unconstrained) parameters map to knots so that **zero raw parameters give the
identity**: widths and heights are a softmax (uniform when all raw values are equal) and
interior derivatives are :math:`d_{min} + \mathrm{softplus}(r + c)` with ``c`` chosen so
:math:`r = 0 \Rightarrow d = 1`; the two boundary derivatives are fixed to 1, so the spline
joins its identity tails with a continuous derivative.

Fast path (what the layers use): :func:`spline_table` turns raw parameters into one
``(..., 3, 2K)`` table per spline, rows ``[widths | left edges]``, ``[heights | bottom
edges]``, ``[left derivatives | right derivatives]``, with a single softmax, a single
``addmm`` (cumulative sums and the affine maps to ``[-B, B]`` are one fixed matrix) and no
``cat``/``cumsum``/``pad`` chains; :func:`spline_forward` / :func:`spline_inverse` find the
bin with ``searchsorted`` and read all six bin quantities with one ``gather``. The
knot-based functions :func:`knots`, :func:`rqs_forward`, :func:`rqs_inverse` are the same
maths on explicit ``(xs, ys, ds)``, for tests and plots.

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
    """Raw parameters per spline: ``K`` (width, height) pairs, ``K - 1`` interior derivatives."""
    return 3 * count_bins - 1


def table_map(k, bound, min_bin=MIN_BIN, min_deriv=MIN_DERIV):
    r"""``(M, c)`` in float64 with ``table = v @ M + c`` for
    ``v = [softmax pairs (2K), inner derivs (K-1)]``.

    Widths :math:`w_k = 2B(m + (1 - mK) p_k)`, left edges
    :math:`x_k = -B + 2B(mk + (1 - mK)\sum_{j<k} p_j)` (exactly ``-B`` for ``k = 0``), and the
    derivative row ``[1, d_1..d_{K-1} | d_1..d_{K-1}, 1]``. Layers keep it as a buffer
    (:class:`~pyro_flows_ext.transforms.RationalQuadratic`); nothing is cached here.
    """
    scale = 2 * bound * (1 - min_bin * k)
    m = torch.zeros(3 * k - 1, 3, 2 * k, dtype=torch.float64)
    c = torch.zeros(3, 2 * k, dtype=torch.float64)
    for row in (0, 1):  # row 0: widths / x, row 1: heights / y; pairs interleaved in v
        for j in range(k):
            m[2 * j + row, row, j] = scale
            m[2 * j + row, row, k + j + 1:] = scale
        c[row, :k] = 2 * bound * min_bin
        c[row, k:] = -bound + 2 * bound * min_bin * torch.arange(k, dtype=torch.float64)
    for j in range(k - 1):  # interior derivative d_{j+1}
        m[2 * k + j, 2, j + 1] = 1.0
        m[2 * k + j, 2, k + j] = 1.0
    c[2] = min_deriv
    c[2, 0] = c[2, -1] = 1.0
    return m.flatten(1), c.flatten()


def spline_table(raw, bound, maps=None, min_bin=MIN_BIN, min_deriv=MIN_DERIV):
    r"""The per-spline table used by :func:`spline_forward` and :func:`spline_inverse`.

    Args:
        raw: ``(..., 3K - 1)``: interleaved (width, height) logits ``[:2K]``, then the
            ``K - 1`` interior derivatives ``[2K:]``.
        bound: half-width ``B`` of the spline interval.
        maps: ``(M, c)`` from :func:`table_map` in ``raw``'s dtype and device (computed
            here when omitted).
    Returns:
        ``(..., 3, 2K)``: ``[w_k | x_k]``, ``[h_k | y_k]``, ``[d_k | d_{k+1}]`` for
        ``k = 0..K-1`` (``x_k``, ``y_k`` left/bottom edges; ``d_0 = d_K = 1``).
    """
    k = (raw.shape[-1] + 1) // 3
    # softmax over the bins of a (K, 2) view: the reduced dim is not the innermost one,
    # which is several times faster on CPU for small K than a last-dim softmax
    pairs = torch.softmax(raw[..., :2 * k].unflatten(-1, (k, 2)), dim=-2)
    inner = F.softplus(raw[..., 2 * k:] + _SHIFT)
    v = torch.cat([pairs.flatten(-2), inner], dim=-1)
    if maps is None:
        maps = [t.to(dtype=raw.dtype, device=raw.device)
                for t in table_map(k, float(bound), min_bin, min_deriv)]
    m, c = maps
    out = torch.addmm(c, v.reshape(-1, 3 * k - 1), m)
    return out.view(raw.shape[:-1] + (3, 2 * k))


def knots(raw, bound, min_bin=MIN_BIN, min_deriv=MIN_DERIV):
    r"""Knot positions and derivatives from raw parameters (for tests and plots).

    Args:
        raw: ``(..., 3K - 1)`` as in :func:`spline_table`.
        bound: half-width ``B`` of the spline interval.
    Returns:
        ``(xs, ys, ds)``, each ``(..., K + 1)``: increasing knots from ``-B`` to ``B`` and
        positive derivatives with ``ds[..., 0] = ds[..., -1] = 1``.
    """
    t = spline_table(raw, bound, None, min_bin, min_deriv)
    k = t.shape[-1] // 2
    end = torch.full_like(t[..., 0, :1], float(bound))
    xs = torch.cat([t[..., 0, k:], end], dim=-1)
    ys = torch.cat([t[..., 1, k:], end], dim=-1)
    ds = torch.cat([t[..., 2, :k], t[..., 2, -1:]], dim=-1)
    return xs, ys, ds


def table_from_knots(xs, ys, ds):
    """The ``(..., 3, 2K)`` table of :func:`spline_table` from explicit knots ``(..., K + 1)``."""
    xs, ys, ds = torch.broadcast_tensors(xs, ys, ds)
    rows = [torch.cat([xs.diff(dim=-1), xs[..., :-1]], -1),
            torch.cat([ys.diff(dim=-1), ys[..., :-1]], -1),
            torch.cat([ds[..., :-1], ds[..., 1:]], -1)]
    return torch.stack(rows, dim=-2)


def _log_deriv(xi, xi1, t, s, d0, d1, den):
    r""":math:`\log[s^2 (d_1\xi^2 + 2 s\xi(1-\xi) + d_0(1-\xi)^2)] - 2\log den`."""
    inner = torch.addcmul(torch.addcmul(d1 * xi.square(), s, t, value=2), d0, xi1.square())
    return torch.add(inner.log(), (s / den).log(), alpha=2)


def spline_forward(x, table, bound):
    r"""Spline value and :math:`\log|dy/dx|`, element-wise, from a :func:`spline_table`.

    Args:
        x: ``(...)`` inputs.
        table: ``(..., 3, 2K)`` broadcastable against ``x`` (its leading dims).
        bound: ``B``; outside ``[-B, B]`` the map is the identity with log-derivative 0.
    Returns:
        ``(y, logabsdet)``, both shaped like ``x``.
    """
    x = _broadcast(x, table)
    xc, inside, (w, x0, h, y0, d0, d1) = _lookup(x, table, 0, bound)
    s = h / w
    xi = (xc - x0) / w  # in [0, 1] up to round-off (>= 0 exactly: same edges as the lookup)
    xi1 = 1 - xi
    t = xi * xi1
    den = torch.addcmul(s, torch.add(d0 + d1, s, alpha=-2), t)
    y = torch.addcdiv(y0, h * torch.addcmul(s * xi.square(), d0, t), den)
    lad = _log_deriv(xi, xi1, t, s, d0, d1, den)
    return torch.where(inside, y, x), torch.where(inside, lad, 0.0)


def _clamp01(xi):
    """``xi`` clamped into ``[0, 1]`` against round-off, keeping its gradient (a plain clamp
    would zero the gradient at a knot that round-off puts a hair outside the bin)."""
    return xi - (xi - xi.clamp(0, 1)).detach()


def spline_inverse(y, table, bound):
    r"""Analytic inverse: root of the quadratic in :math:`\xi` (Durkan et al., eq. 6-8), and
    :math:`\log|dx/dy|` (minus the forward log-derivative at the root).

    Args:
        y: ``(...)`` outputs.
        table: ``(..., 3, 2K)`` as in :func:`spline_forward`.
        bound: ``B``.
    Returns:
        ``(x, logabsdet)`` shaped like ``y``.
    """
    y = _broadcast(y, table)
    yc, inside, (w, x0, h, y0, d0, d1) = _lookup(y, table, 1, bound)
    s = h / w
    dy = yc - y0
    dyd = dy * torch.add(d0 + d1, s, alpha=-2)
    a = torch.addcmul(dyd, h, s - d0)
    b = torch.addcmul(-dyd, h, d0)
    sdy = s * dy  # -c
    disc = torch.addcmul(b.square(), a, sdy, value=4).clamp_min(0)
    # the stable root 2c / (-b - sqrt(disc)) = 2 s dy / (b + sqrt(disc)); b > 0 when c != 0
    xi = _clamp01(2 * sdy / (b + disc.sqrt()))
    x = torch.addcmul(x0, xi, w)
    xi1 = 1 - xi
    t = xi * xi1
    den = torch.addcmul(s, torch.add(d0 + d1, s, alpha=-2), t)
    lad = -_log_deriv(xi, xi1, t, s, d0, d1, den)
    return torch.where(inside, x, y), torch.where(inside, lad, 0.0)


def _broadcast(v, table):
    lead = table.shape[:-2]
    if v.shape != lead:
        v = v.expand(torch.broadcast_shapes(v.shape, lead))
    return v


def _lookup(v, table, row, bound):
    """Clamped ``v``, the in-range mask and the six bin quantities ``(w, x0, h, y0, d0, d1)``,
    bins located (``searchsorted``, no gradient needed) on ``table[..., row, K+1:]``, the
    interior edges (``row`` 0: forward, 1: inverse), read with one ``gather``."""
    shape = v.shape + table.shape[-2:]
    if table.shape != shape:
        table = table.expand(shape)
    k = shape[-1] // 2
    vc = v.clamp(-bound, bound)
    inside = vc == v
    with torch.no_grad():
        edges = table[..., row, k + 1:].contiguous()  # interior edges, sorted
        idx = torch.searchsorted(edges, vc.unsqueeze(-1).contiguous(), right=True)
        idx = torch.cat([idx, idx + k], -1).unsqueeze(-2).expand(shape[:-1] + (2,))
    return vc, inside, table.gather(-1, idx).flatten(-2).unbind(-1)


def rqs_forward(x, xs, ys, ds, bound):
    """:func:`spline_forward` on explicit knots ``(..., K + 1)`` (see :func:`knots`)."""
    return spline_forward(x, table_from_knots(xs, ys, ds), bound)


def rqs_inverse(y, xs, ys, ds, bound):
    """:func:`spline_inverse` on explicit knots ``(..., K + 1)`` (see :func:`knots`)."""
    return spline_inverse(y, table_from_knots(xs, ys, ds), bound)
