import pytest
import torch

import pyro_flows_ext as pfe
from pyro_flows_ext.transforms import ResidualBlock

from .contract import assert_fit_beats_gaussian, check_bijection, perturb

LAYERS = {
    "residual-exact": (lambda: ResidualBlock(3, hidden_dims=(8, 8)), (3,)),
    "residual-exact-eval": (lambda: ResidualBlock(2, hidden_dims=(8,), logdet="roulette").eval(),
                            (2,)),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_contract(name, dtype):
    make, event_shape = LAYERS[name]
    check_bijection(perturb(make()), event_shape, dtype=dtype)


def spectral_norm(mat, iters=200):
    """Largest singular value of ``mat`` by power iteration on mat^T mat (test's own)."""
    v = torch.randn(mat.shape[-1], dtype=mat.dtype)
    for _ in range(iters):
        v = mat.T @ (mat @ v)
        v = v / v.norm()
    return (mat @ v).norm()


def test_measured_lipschitz_constant_below_bound():
    layer = ResidualBlock(2, hidden_dims=(32, 32), lipschitz=0.9).double()
    # train a little so the weights (and their spectral normalisation) move
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    data = pfe.datasets.toy("moons", 512).double()
    for _ in range(30):
        z, v = layer.inverse_and_ladj(data)
        loss = (0.5 * z.square().sum(-1) - v).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    points = 3 * torch.randn(200, 2, dtype=torch.float64)
    norms = torch.stack([spectral_norm(torch.autograd.functional.jacobian(layer.g, p))
                         for p in points])
    assert norms.max() < 0.9
    assert norms.max() > 0.1  # g is not trivially small: the bound is what limits it


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fixed_point_inverse_converges(dtype):
    layer = ResidualBlock(2, hidden_dims=(16,), lipschitz=0.97).to(dtype)
    with torch.no_grad():  # make g as large as the bound allows
        layer.linears[-1].linear.weight.mul_(100.0)
    z = 3 * torch.randn(100, 2, dtype=dtype)
    x, _ = layer.call_and_ladj(z)
    residual = (x + layer.g(x) - z).abs().max()  # independent check of x = z - g(x)
    assert residual < (1e-5 if dtype == torch.float32 else 1e-9)


def exact_logdet(layer, x):
    return torch.stack([torch.linalg.slogdet(torch.eye(2, dtype=x.dtype)
                                             + torch.autograd.functional.jacobian(
                                                 layer.g, p, create_graph=True))[1]
                        for p in x])


def test_roulette_logdet_is_unbiased():
    layer = perturb(ResidualBlock(2, hidden_dims=(16,), lipschitz=0.9, logdet="roulette")).double()
    x = torch.randn(4, 2, dtype=torch.float64)
    with torch.no_grad():
        exact = exact_logdet(layer, x)
        draws = torch.stack([layer.inverse_and_ladj(x)[1] for _ in range(4000)])
    mean, se = draws.mean(0), draws.std(0) / 4000 ** 0.5
    assert ((mean - exact).abs() < 4 * se + 1e-12).all(), (mean, exact, se)
    assert (draws.std(0) > 0).all()  # it really is random


def test_neumann_gradient_matches_exact_logdet_gradient():
    layer = perturb(ResidualBlock(2, hidden_dims=(8,), lipschitz=0.7, logdet="roulette")).double()
    x = torch.randn(3, 2, dtype=torch.float64)
    params = list(layer.parameters())
    exact = torch.autograd.grad(exact_logdet(layer, x).sum(), params, allow_unused=True)
    exact = [torch.zeros_like(p) if e is None else e for p, e in zip(params, exact)]
    n = 2000
    total = [torch.zeros_like(p) for p in params]
    for _ in range(n):
        grads = torch.autograd.grad(layer.inverse_and_ladj(x)[1].sum(), params, allow_unused=True)
        total = [t + (g if g is not None else 0) for t, g in zip(total, grads)]
    for t, e in zip(total, exact):
        torch.testing.assert_close(t / n, e, atol=0.05 * e.abs().max() + 1e-3, rtol=0.1)


def test_power_series_close_to_exact_and_eval_is_deterministic():
    layer = perturb(ResidualBlock(2, hidden_dims=(16,), lipschitz=0.5, logdet="power",
                                  n_power_terms=20)).double()
    x = torch.randn(5, 2, dtype=torch.float64)
    with torch.no_grad():
        exact = exact_logdet(layer, x)
        est = torch.stack([layer.inverse_and_ladj(x)[1] for _ in range(2000)]).mean(0)
        torch.testing.assert_close(est, exact, atol=0.02, rtol=0.05)
        layer.eval()
        a, b = layer.inverse_and_ladj(x)[1], layer.inverse_and_ladj(x)[1]
    assert torch.equal(a, b)
    torch.testing.assert_close(a, exact)


def test_residual_flow_fits_moons_beyond_a_gaussian():
    flow = assert_fit_beats_gaussian(pfe.flows.residual_flow(2, num_blocks=4,
                                                             hidden_dims=(32, 32)))
    x = flow.sample((100,))  # sampling runs the fixed-point inverse of every block
    assert torch.isfinite(x).all()
