import pytest
import torch

import pyro_flows_ext as pfe
from pyro_flows_ext.infer.density import mean_nll
from pyro_flows_ext.transforms import RationalQuadraticSpline, SplineCoupling
from pyro_flows_ext.transforms._rqs import (
    MIN_BIN,
    MIN_DERIV,
    knots,
    rqs_forward,
    rqs_inverse,
    spline_forward,
    spline_inverse,
    spline_table,
)

from .contract import assert_fit_beats_gaussian, check_bijection, perturb
from .densities import assert_nll_not_below_entropy, moons_log_prob

LAYERS = {
    "rqs": (lambda: RationalQuadraticSpline(3, count_bins=5, bound=2.0), (3,)),
    "spline-coupling": (lambda: SplineCoupling(4, hidden_dims=(8,), count_bins=4), (4,)),
    "spline-coupling-spline-on-z": (
        lambda: SplineCoupling(4, hidden_dims=(8,), count_bins=4, inverse=True), (4,)),
    "spline-coupling-last-half-passive": (
        lambda: SplineCoupling(5, hidden_dims=(8,), count_bins=3, mask=[0, 0, 1, 1, 1]), (5,)),
    "spline-coupling-odd-mask": (
        lambda: SplineCoupling(5, hidden_dims=(8,), count_bins=3, mask=[1, 0, 1, 0, 0]), (5,)),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_contract(name, dtype):
    make, event_shape = LAYERS[name]
    # float64: perturb at scale 1, knots far from uniform (bins of very different sizes);
    # float32 at the default scale: near-flat bins (slope ~1e-6) make any float32 inverse
    # ill-conditioned, whatever the implementation
    scale = 1.0 if dtype == torch.float64 else 0.3
    check_bijection(perturb(make(), scale=scale), event_shape, dtype=dtype)


def hard_points(xs, bound):
    """Bin edges (the knots themselves), points just beside them, tails and +-1e3."""
    far = torch.tensor([-1e3, -50.0, -bound - 1e-4, bound + 1e-4, 7.0, 1e3], dtype=xs.dtype)
    eps = 1e-6 if xs.dtype == torch.float32 else 1e-12
    return torch.cat([xs, xs + eps, xs - eps, far,
                      torch.linspace(-bound, bound, 101, dtype=xs.dtype)])


@pytest.mark.parametrize("scale", [0.5, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_round_trip_at_edges_tails_and_far_away(dtype, scale):
    bound = 3.0
    raw = scale * torch.randn(20, 3 * 8 - 1, dtype=dtype)
    xs, ys, ds = knots(raw, bound)
    eps = torch.finfo(dtype).eps
    for i in range(len(raw)):
        x = hard_points(xs[i], bound)
        y, lad = rqs_forward(x, xs[i], ys[i], ds[i], bound)
        x_back, lad_inv = rqs_inverse(y, xs[i], ys[i], ds[i], bound)
        assert torch.isfinite(y).all() and torch.isfinite(lad).all()
        assert torch.isfinite(x_back).all() and torch.isfinite(lad_inv).all()
        if scale <= 0.5:  # slopes >= ~0.02: 1e-5 absolute, as the issue asks
            torch.testing.assert_close(x_back, x, atol=1e-5, rtol=1e-6)
        else:  # near-flat bins: no float inverse beats (rounding of y) / slope; allow 64x it
            err = (x_back - x).abs()
            allowed = 1e-5 + 64 * eps * (1 + y.abs()) / lad.exp() + 1e-6 * x.abs()
            assert (err <= allowed).all(), (err / allowed).max()
        # the inverse's log-derivative is minus the forward one at the point it returns
        # (compared at x_back: near-flat bins turn a tiny x error into a large lad change)
        # (float32 with near-flat bins: only finiteness, checked above)
        if dtype == torch.float64 or scale <= 0.5:
            ltol = 1e-4 if dtype == torch.float32 else 1e-9
            lad_back = rqs_forward(x_back, xs[i], ys[i], ds[i], bound)[1]
            torch.testing.assert_close(lad_inv, -lad_back, atol=ltol, rtol=ltol)
        # knots map to knots (an independent check of the parametrisation)
        torch.testing.assert_close(rqs_forward(xs[i], xs[i], ys[i], ds[i], bound)[0], ys[i])
        # tails are the identity
        tails = x.abs() > bound
        assert torch.equal(y[tails], x[tails]) and (lad[tails] == 0).all()


def test_monotone_and_derivative_matches_autograd():
    bound = 2.5
    raw = 2 * torch.randn(3 * 6 - 1, dtype=torch.float64)
    xs, ys, ds = knots(raw, bound)
    x = torch.linspace(-4, 4, 4001, dtype=torch.float64, requires_grad=True)
    y, lad = rqs_forward(x, xs, ys, ds, bound)
    assert (y[1:] > y[:-1]).all()
    (dydx,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(lad, dydx.log(), atol=1e-10, rtol=1e-8)
    # the inverse's log-derivative against autograd of the inverse, too
    yy = y.detach().requires_grad_(True)
    xb, lad_inv = rqs_inverse(yy, xs, ys, ds, bound)
    (dxdy,) = torch.autograd.grad(xb.sum(), yy)
    torch.testing.assert_close(lad_inv, dxdy.log(), atol=1e-8, rtol=1e-6)
    # derivative continuous across +-bound (boundary derivatives are 1)
    y_in, lad_in = rqs_forward(torch.tensor([-bound, bound], dtype=torch.float64),
                               xs, ys, ds, bound)
    torch.testing.assert_close(lad_in, torch.zeros(2, dtype=torch.float64), atol=1e-12, rtol=0)


def test_gradients_finite_at_edges_and_far_away():
    bound = 3.0
    raw = torch.randn(3 * 8 - 1, requires_grad=True)
    xs, ys, ds = knots(raw, bound)
    x = hard_points(xs.detach(), bound).requires_grad_(True)
    for fn in (rqs_forward, rqs_inverse):
        y, lad = fn(x, *knots(raw, bound), bound)
        g_raw, g_x = torch.autograd.grad((y.square() + lad).sum(), (raw, x))
        assert torch.isfinite(g_raw).all() and torch.isfinite(g_x).all()


def test_layers_start_at_identity():
    z = torch.randn(50, 4) * 3
    for layer in (RationalQuadraticSpline(4), SplineCoupling(4), SplineCoupling(4, context_dim=2)):
        if layer.context_dim:
            layer = layer.condition(torch.randn(50, 2))
        x, ladj = layer.call_and_ladj(z)
        torch.testing.assert_close(x, z, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ladj, torch.zeros(50), atol=1e-5, rtol=0)


def test_conditional_coupling_jacobian_per_context():
    layer = perturb(SplineCoupling(3, hidden_dims=(8,), count_bins=4, context_dim=2)).double()
    for c in torch.randn(3, 2, dtype=torch.float64):
        check_bijection(layer.condition(c), (3,))


def test_nsf_fits_moons_beyond_a_gaussian():
    assert_fit_beats_gaussian(pfe.flows.nsf(2, num_layers=4, hidden_dims=(32, 32)))


@pytest.mark.slow
def test_nsf_reaches_good_nll_on_moons():
    train, test = pfe.datasets.toy("moons", 20000, 0), pfe.datasets.toy("moons", 5000, 1)
    flow = pfe.flows.nsf(2)
    pfe.infer.fit_density(flow, train, num_steps=3000, progress=False)
    assert mean_nll(flow, test) < 1.80  # true entropy about 1.676
    assert_nll_not_below_entropy(flow, test, moons_log_prob)  # and not below it


def reference_knots(raw, bound):
    """Knots straight from the definition (softmax, cumsum, softplus), independent of the
    table/addmm construction: raw = interleaved (width, height) logits, then K - 1 derivatives."""
    k = (raw.shape[-1] + 1) // 3
    pairs = raw[..., :2 * k].unflatten(-1, (k, 2))
    out = []
    for logits in (pairs[..., 0], pairs[..., 1]):
        w = MIN_BIN + (1 - MIN_BIN * k) * torch.softmax(logits, -1)
        edges = torch.cat([torch.zeros_like(w[..., :1]), torch.cumsum(w, -1)], -1)
        out.append(2 * bound * edges - bound)
    inner = MIN_DERIV + torch.nn.functional.softplus(raw[..., 2 * k:] + _shift())
    one = torch.ones_like(inner[..., :1])
    return out[0], out[1], torch.cat([one, inner, one], -1)


def _shift():
    import math
    return math.log(math.expm1(1.0 - MIN_DERIV))


def test_table_matches_reference_knots_and_zero_is_identity():
    raw = 2 * torch.randn(7, 3, 3 * 6 - 1, dtype=torch.float64)
    for got, want in zip(knots(raw, 2.5), reference_knots(raw, 2.5)):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    xs, ys, ds = knots(torch.zeros(3 * 5 - 1), 3.0)
    torch.testing.assert_close(xs, torch.linspace(-3, 3, 6))
    torch.testing.assert_close(ys, xs)
    torch.testing.assert_close(ds, torch.ones(6))
    # the fast path (table) and the knot path agree, both directions
    x = 3 * torch.randn(200, 7, 3, dtype=torch.float64)
    table = spline_table(raw, 2.5)
    for fast, slow in ((spline_forward, rqs_forward), (spline_inverse, rqs_inverse)):
        a, b = fast(x, table, 2.5), slow(x, *reference_knots(raw, 2.5), 2.5)
        for u, v in zip(a, b):
            torch.testing.assert_close(u, v, atol=1e-10, rtol=1e-10)


def test_coupling_directions_are_each_others_inverse():
    torch.manual_seed(0)
    data_to_base = perturb(SplineCoupling(3, hidden_dims=(8,), count_bins=5)).double()
    base_to_data = SplineCoupling(3, hidden_dims=(8,), count_bins=5, inverse=True).double()
    base_to_data.load_state_dict(data_to_base.state_dict())
    v = 2 * torch.randn(64, 3, dtype=torch.float64)
    x1, l1 = data_to_base.inverse_and_ladj(v)  # the spline itself applied to v
    x2, l2 = base_to_data.call_and_ladj(v)
    torch.testing.assert_close(x1, x2)
    torch.testing.assert_close(l1, l2)  # both the spline's own log-derivative


def test_block_split_matches_index_path():
    torch.manual_seed(0)
    for mask in ([1, 1, 0, 0, 0], [0, 0, 1, 1, 1]):
        layer = perturb(SplineCoupling(5, hidden_dims=(8,), count_bins=4, mask=mask)).double()
        assert layer._blocks is not None
        z = 2 * torch.randn(32, 5, dtype=torch.float64)
        fast = layer.call_and_ladj(z)
        layer._blocks = None  # general path: index + reorder
        slow = layer.call_and_ladj(z)
        for u, v in zip(fast, slow):
            torch.testing.assert_close(u, v)
        m = torch.tensor(mask, dtype=torch.bool)
        torch.testing.assert_close(fast[0][:, m], z[:, m])  # passive part untouched
