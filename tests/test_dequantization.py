"""Dequantization, the logit preprocessing, bits/dim and the digits data."""

import copy
import math

import pyro.distributions as dist
import pytest
import torch
from torch.distributions import SigmoidTransform

import pyro_flows_ext as pfe
from pyro_flows_ext.infer import bits_per_dim, categorical_bits_per_dim, iw_bits_per_dim
from pyro_flows_ext.surjections import UniformDequantization, VariationalDequantization
from pyro_flows_ext.transforms import ActNorm, Logit

from .contract import check_bijection, perturb

F64 = torch.float64


def uniform_base(k, shape, dtype=F64):
    lo = torch.zeros(shape, dtype=dtype)
    return dist.Uniform(lo, lo + k).to_event(len(shape))


# -- bits/dim of a known case ------------------------------------------------------------------

@pytest.mark.parametrize("k", [2, 17, 256])
def test_uniform_model_of_uniformly_dequantized_data_is_log2_k_bits(k):
    shape = (1, 2, 2)
    x = torch.randint(0, k, (50, *shape)).double()
    # y ~ U[0, k)^D scored directly: log P(x) = -D log k for every x, whatever the draw
    flow = pfe.Flow(uniform_base(k, shape), [UniformDequantization(k, event_dim=3)])
    bits = bits_per_dim(flow, x, per_example=True)
    torch.testing.assert_close(bits, torch.full_like(bits, math.log2(k)), atol=1e-12, rtol=0)
    # the same model through the logit: s = logit(p), p ~ U[alpha, 1 - alpha) is y ~ U[0, k),
    # so this checks Logit's log k and alpha terms against the exact answer
    alpha = 0.05
    p = dist.Uniform(torch.full(shape, alpha, dtype=F64), torch.full(shape, 1 - alpha, dtype=F64))
    base = dist.TransformedDistribution(p, [SigmoidTransform().inv]).to_event(3)
    flow = pfe.Flow(base, [Logit(1, alpha, k, event_dim=3), UniformDequantization(k, event_dim=3)])
    # (a flow without parameters scores in the default dtype, float32, hence the tolerance)
    assert bits_per_dim(flow, x) == pytest.approx(math.log2(k), abs=1e-6)
    assert iw_bits_per_dim(flow, x, num_samples=7) == pytest.approx(math.log2(k), abs=1e-6)


def test_categorical_baseline_closed_form():
    # one pixel, 3 levels; train counts (2, 1, 0) -> add-one P = (3, 2, 1) / 6
    train = torch.tensor([[0], [0], [1]])
    assert categorical_bits_per_dim(train, torch.tensor([[2]]), 3) == pytest.approx(math.log2(6))
    test = torch.tensor([[0], [1], [2], [2]])
    expected = -(math.log2(3 / 6) + math.log2(2 / 6) + 2 * math.log2(1 / 6)) / 4
    assert categorical_bits_per_dim(train, test, 3) == pytest.approx(expected)
    # two pixels are independent: the bits/dim is the mean over pixels
    train2 = torch.tensor([[0, 1], [0, 1], [1, 1]])
    got = categorical_bits_per_dim(train2, torch.tensor([[2, 1]]), 3)
    assert got == pytest.approx((math.log2(6) - math.log2(4 / 6)) / 2)
    with pytest.raises(ValueError, match="levels 0 .. 2"):
        categorical_bits_per_dim(train, torch.tensor([[3]]), 3)


# -- the logit layer -------------------------------------------------------------------------

@pytest.mark.parametrize("event_shape,event_dim", [((3,), 1), ((2, 2, 3), 3)], ids=["vec", "img"])
def test_logit_is_a_bijection_with_the_autograd_log_det(event_shape, event_dim):
    check_bijection(Logit(event_shape[0], alpha=0.05, scale=17, event_dim=event_dim), event_shape)
    check_bijection(Logit(event_shape[0], alpha=0.0, scale=3, event_dim=event_dim), event_shape,
                    dtype=torch.float32)


def test_logit_maps_the_data_range_and_round_trips():
    layer = Logit(None, alpha=0.05, scale=17, event_dim=3).double()
    y = torch.rand(4, 1, 3, 3, dtype=F64) * 17
    s, v = layer.inverse_and_ladj(y)
    torch.testing.assert_close(layer.call_and_ladj(s)[0], y, atol=1e-12, rtol=0)
    p = 0.05 + 0.9 * y / 17
    torch.testing.assert_close(s, torch.log(p / (1 - p)))
    # dy/ds = k / (1 - 2 alpha) * p (1 - p) elementwise, summed over the event
    torch.testing.assert_close(v, -torch.log(17 / 0.9 * p * (1 - p)).sum((-3, -2, -1)))
    with pytest.raises(ValueError, match="alpha"):
        Logit(alpha=0.5)


# -- dequantization contract -----------------------------------------------------------------

def variational(shape=(1, 2, 2), k=5, scale=0.3):
    return perturb(VariationalDequantization(shape, k, hidden_channels=8), scale).double()


@pytest.mark.parametrize("kind", ["uniform", "variational-img", "variational-vec", "flow"])
def test_dequantization_contract(kind):
    k = 5
    if kind == "uniform":
        layer, shape = UniformDequantization(k, event_dim=3).double(), (1, 2, 2)
    elif kind == "variational-img":
        layer, shape = variational(), (1, 2, 2)
    elif kind == "variational-vec":
        layer, shape = variational((3,)), (3,)
    else:
        noise = perturb(pfe.flows.nsf(3, num_layers=2, hidden_dims=(8,), context_dim=3,
                                      gaussian_start=False), 0.1)
        layer, shape = VariationalDequantization(3, k, flow=noise).double(), (3,)
    assert not layer.exact and not layer.bijective and layer.stochastic_inverse
    x = torch.randint(0, k, (6, 2, *shape)).double()
    y, v = layer.inverse_and_ladj(x)
    u = y - x
    assert y.shape == x.shape and v.shape == (6, 2)
    assert (u >= 0).all() and (u < 1).all()
    torch.testing.assert_close(layer.call_and_ladj(y)[0], x)  # floor recovers the levels
    # V = -log q(u | x), recomputed by scoring the pair (inverting q's flow)
    torch.testing.assert_close(v, -layer.log_q(u, x), atol=1e-9, rtol=1e-9)
    layer.clear_cache()
    torch.testing.assert_close(layer.log_abs_det_jacobian(y, x), -v, atol=1e-9, rtol=1e-9)
    if kind == "uniform":
        assert (v == 0).all()
    # a flow over it: not exact; the same tensor reuses its draw, a clone draws again
    base = dist.Normal(torch.full(shape, k / 2, dtype=F64), torch.ones(shape, dtype=F64))
    flow = pfe.Flow(base.to_event(len(shape)), [layer])
    assert not flow.is_exact
    assert torch.equal(flow.log_prob(x), flow.log_prob(x))
    assert not torch.equal(flow.log_prob(x), flow.log_prob(x.clone()))
    s, lp = flow.sample_and_log_prob((4,))
    assert s.shape == (4, *shape) and (s == s.floor()).all()
    assert s.min() >= 0 and s.max() <= k - 1
    torch.testing.assert_close(flow.log_prob(s), lp)
    # deepcopy and torch.save after sampling
    copy.deepcopy(flow).log_prob(x.clone())


def test_variational_q_is_a_normalised_density_on_the_unit_square():
    # exp(-V) as a function of u integrates to 1 over [0, 1)^2 for each x (midpoint rule):
    # an independent check that V is -log of a density
    n = 200
    g = (torch.arange(n, dtype=F64) + 0.5) / n
    grid = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1)
    for shape in ((1, 1, 2), (2,)):
        layer = variational(shape, k=3, scale=0.05)
        u = grid.reshape(-1, *shape)
        for level in ([0.0, 2.0], [1.0, 1.0]):
            x = torch.tensor(level, dtype=F64).reshape(shape).expand_as(u)
            log_q = layer.log_q(u, x)
            assert log_q.std() > 0.02  # not the uniform start
            assert log_q.exp().mean().item() == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("kind", ["uniform", "variational"])
def test_log_prob_is_an_unbiased_estimate_of_a_known_discrete_probability(kind):
    # y ~ Exponential(1) per pixel: P(x) = e^-x (1 - e^-1) for the integer levels x
    k, shape = 4, (2,)
    base = dist.Exponential(torch.ones(shape, dtype=F64)).to_event(1)
    layer = (UniformDequantization(k).double() if kind == "uniform"
             else variational(shape, k, scale=0.3))
    flow = pfe.Flow(base, [layer])
    x = torch.tensor([[0.0, 3.0], [1.0, 2.0]], dtype=F64)
    exact = (-x + math.log1p(-math.exp(-1))).sum(-1)
    n = 20000
    lp = flow.log_prob(x.expand(n, 2, 2))
    w = (lp - exact).exp()  # P-hat / P, mean 1
    assert ((w.mean(0) - 1).abs() < 4 * w.std(0) / math.sqrt(n)).all()
    assert (lp.mean(0) < exact + 1e-12).all()  # a lower bound in expectation (Jensen)
    if kind == "variational":
        assert (lp.mean(0) < exact - 1e-3).all()  # a non-uniform q: a strict gap
        iw = pfe.infer.iw_log_prob(flow, x, num_samples=2000)
        assert ((iw - exact).abs() < 0.02).all() and (exact - iw < exact - lp.mean(0)).all()


def test_bad_data_gives_clear_errors():
    flow = pfe.Flow(uniform_base(17, (1, 2, 2)), [UniformDequantization(17, event_dim=3)])
    good = torch.randint(0, 17, (3, 1, 2, 2))
    with pytest.raises(ValueError, match="integer-valued 17-level data"):
        bits_per_dim(flow, good + 0.5)
    with pytest.raises(ValueError, match=r"values in 0 \.\. 16, got values from 0 to 17"):
        bits_per_dim(flow, torch.tensor([0, 17]).reshape(2, 1, 1, 1).expand(2, 1, 2, 2))
    with pytest.raises(ValueError, match="values from -1"):
        flow.log_prob(good.double() - 1)
    with pytest.raises(ValueError, match=r"shape \(N, 1, 2, 2\)"):
        bits_per_dim(flow, torch.zeros(3, 4))
    with pytest.raises(ValueError, match="dequantization"):
        bits_per_dim(pfe.Flow(uniform_base(17, (1, 2, 2)), []), good)
    with pytest.raises(ValueError, match="expects events of shape"):
        VariationalDequantization((1, 2, 2), 17).inv(torch.zeros(3, 1, 2, 3))
    with pytest.raises(ValueError, match="k >= 2"):
        UniformDequantization(1)


def test_gradients_reach_the_noise_model_and_the_flow():
    layers = [ActNorm(1, event_dim=3), Logit(1, scale=5, event_dim=3), variational(k=5)]
    flow = pfe.Flow(None, layers, event_shape=(1, 2, 2)).double()
    x = torch.randint(0, 5, (8, 1, 2, 2)).double()
    flow.log_prob(x).mean().backward()
    for name, p in flow.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


# -- data ------------------------------------------------------------------------------------

def test_digits_split_and_levels():
    train, labels = pfe.datasets.digits("train", labels=True)
    test = pfe.datasets.digits("test")
    assert train.shape == (1437, 1, 8, 8) and test.shape == (360, 1, 8, 8)
    assert train.dtype == torch.long and labels.shape == (1437,)
    assert train.min() == 0 and train.max() == 16 and set(labels.tolist()) == set(range(10))
    every = pfe.datasets.digits("all").reshape(1797, -1)
    both = torch.cat([train, test]).reshape(1797, -1)
    assert torch.equal(torch.unique(both, dim=0), torch.unique(every, dim=0))  # a partition
    assert torch.equal(pfe.datasets.digits("test"), test)  # fixed
    big = pfe.datasets.digits("test", size=16)
    assert big.shape == (360, 1, 16, 16) and big.max() <= 16 and big.min() >= 0
    with pytest.raises(ValueError, match="split"):
        pfe.datasets.digits("val")
