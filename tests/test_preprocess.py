import io
import math

import pytest
import torch

import pyro_flows_ext as pfe
from pyro_flows_ext.infer.density import mean_nll
from pyro_flows_ext.transforms import AffineCoupling, CholeskyAffine, Standardize
from pyro_flows_ext.transforms.preprocess import initialize_from_data

from .contract import check_bijection, perturb


def correlated(n, d=3, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=dtype)
    shift = torch.linspace(-3.0, 5.0, d, dtype=dtype)
    return torch.randn(n, d, generator=g, dtype=dtype) @ a.T * 2.0 + shift


def mle_gaussian(x):
    """The maximum-likelihood full-covariance Gaussian of the rows of ``x`` (1/N covariance),
    computed independently of the layers."""
    mean = x.mean(0)
    cov = (x - mean).T @ (x - mean) / len(x)
    return torch.distributions.MultivariateNormal(mean, covariance_matrix=cov)


def set_standardize(d):
    layer = Standardize(d, loc=torch.randn(d), scale=torch.rand(d) + 0.5)
    assert layer.is_initialized and not list(layer.parameters())
    return layer


@pytest.mark.parametrize("make", [set_standardize,
                                  lambda d: perturb(CholeskyAffine(d))],
                         ids=["Standardize", "CholeskyAffine"])
def test_bijection_contract(make):
    check_bijection(make(4), (4,))


def test_cholesky_affine_ladj_is_log_det_of_its_matrix():
    layer = perturb(CholeskyAffine(3)).double()
    tril = layer.scale_tril()
    assert torch.equal(tril, tril.tril()) and (tril.diagonal() > 0).all()
    z = torch.randn(5, 3, dtype=torch.float64)
    x, ladj = layer.call_and_ladj(z)
    torch.testing.assert_close(x, layer.loc + z @ tril.T)
    torch.testing.assert_close(ladj, torch.linalg.slogdet(tril)[1].expand(5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_initialized_flow_is_the_mle_gaussian(dtype):
    x = correlated(500, 3, dtype=torch.float64)
    flow = pfe.Flow(None, [AffineCoupling(3, hidden_dims=(8,)), CholeskyAffine(3),
                           Standardize(3)]).to(dtype)
    assert sorted(initialize_from_data(flow, x.to(dtype))) == ["CholeskyAffine", "Standardize"]
    expected = -mle_gaussian(x).log_prob(x).mean().item()
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    assert math.isclose(mean_nll(flow, x.to(dtype)), expected, rel_tol=tol, abs_tol=tol)
    # and it is no longer the identity: an unset flow scores the rows very differently
    fresh = pfe.Flow(None, [CholeskyAffine(3)]).double()
    fresh.eval()
    assert mean_nll(fresh, x) > expected + 5


def test_first_training_inverse_call_initialises_like_actnorm():
    x = correlated(400, 4)
    layer = CholeskyAffine(4).double()
    flow = pfe.Flow(None, [layer])
    assert not layer.is_initialized
    flow.log_prob(x)  # training mode, data to base
    assert layer.is_initialized and bool(layer.initialized)
    flow.eval()
    torch.testing.assert_close(-flow.log_prob(x).mean(), -mle_gaussian(x).log_prob(x).mean())


def test_generative_training_first_starts_at_identity():
    layer = CholeskyAffine(2)
    flow = pfe.Flow(None, [layer])
    with torch.no_grad():  # a peek at samples does not fix the layer at the identity
        flow.sample((3,))
    assert not layer.is_initialized
    flow.rsample((3,))  # a guide's first step
    assert layer.is_initialized
    x = torch.randn(50, 2) * 10
    flow.log_prob(x)
    assert torch.equal(layer.scale_tril(), torch.eye(2)) and torch.equal(layer.loc, torch.zeros(2))


def test_too_few_rows_and_singular_covariance():
    layer = CholeskyAffine(3).double()
    layer.initialize_from_data(torch.ones(1, 3, dtype=torch.float64))
    assert not layer.is_initialized  # one row says nothing about the spread
    rows = correlated(2, 3)  # two rows in 3-D: diagonal of the covariance only
    layer.initialize_from_data(rows)
    tril = layer.scale_tril()
    torch.testing.assert_close(tril, torch.diag(rows.std(0, unbiased=False)))
    constant = torch.cat([correlated(100, 2), torch.full((100, 1), 7.0, dtype=torch.float64)], 1)
    layer = CholeskyAffine(3).double().initialize_from_data(constant)
    assert torch.isfinite(layer.scale_tril()).all() and layer.log_diag[2] < -5


def test_standardize_from_data_and_data_units():
    x = correlated(300, 3) * torch.tensor([1.0, 100.0, 0.01], dtype=torch.float64)
    layer = Standardize(3).double()
    assert not layer.is_initialized
    torch.testing.assert_close(layer(x), x)  # identity until set
    layer.set_from_data(x)
    z = layer.inv(x)
    torch.testing.assert_close(z.mean(0), torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(z.std(0, unbiased=False), torch.ones(3, dtype=torch.float64))
    # N(0, I) pushed through it is N(mean, diag(var)) in data units
    flow = pfe.Flow(None, [layer])
    normal = torch.distributions.Normal(x.mean(0), x.std(0, unbiased=False))
    torch.testing.assert_close(flow.log_prob(x), normal.log_prob(x).sum(-1))
    # statistics in float64: data near float32's range do not overflow
    big = Standardize(2).set_from_data(torch.tensor([[1e38, -1e38], [3e38, 1e38]]))
    assert torch.isfinite(big.scale).all() and torch.isfinite(big.loc).all()


def test_bad_standardize_arguments():
    with pytest.raises(ValueError, match=r"loc and scale of shape \(3,\), got \(2,\)"):
        Standardize(3, loc=torch.zeros(2))
    with pytest.raises(ValueError, match="finite positive scale"):
        Standardize(2, scale=torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match=r"rows of size 2 .* shape \(5, 3\)"):
        Standardize(2).set_from_data(torch.randn(5, 3))


def test_state_dict_round_trip_keeps_initialisation():
    x = correlated(200, 3, dtype=torch.float32)
    flow = pfe.Flow(None, [CholeskyAffine(3), Standardize(3)])
    initialize_from_data(flow, x)
    buf = io.BytesIO()
    torch.save(flow.state_dict(), buf)
    buf.seek(0)
    other = pfe.Flow(None, [CholeskyAffine(3), Standardize(3)])
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert all(t.is_initialized for t in other.transforms)
    other.log_prob(x[:7] * 3)  # a training-mode call must not re-initialise from this batch
    flow.eval(), other.eval()
    torch.testing.assert_close(other.log_prob(x), flow.log_prob(x))
    assert initialize_from_data(other, x * 5) == []  # already set: nothing to do


def test_to_moves_and_casts_everything():
    flow = pfe.Flow(None, [CholeskyAffine(2), Standardize(2, loc=[1.0, 2.0], scale=[3.0, 4.0])])
    flow = flow.to(torch.float64)
    for t in flow.transforms:
        assert all(v.dtype == torch.float64 for k, v in t.state_dict().items()
                   if k != "initialized")
    x = torch.randn(4, 2, dtype=torch.float64)
    assert flow.log_prob(x).dtype == torch.float64
    s = flow.sample((3,))
    assert s.shape == (3, 2) and s.dtype == torch.float64
    flow = flow.to("meta")
    assert flow.transforms[1].scale.device.type == "meta"
