"""The layer protocol carries non-bijective layers: a tiny SurVAE Abs and a tiny Augment."""

import copy
import math

import pyro.distributions as dist
import pytest
import torch
from torch.distributions import constraints

import pyro_flows_ext as pfe
from pyro_flows_ext.core import Surjection, UnseenPairError


class TinyAbs(Surjection):
    """Generative x = s * z with a random sign s; inference z = |x|; V = -log 2 per element."""

    stochastic_forward, stochastic_inverse = True, False
    domain = constraints.independent(constraints.positive, 1)

    def call_and_ladj(self, z):
        sign = torch.randint(0, 2, z.shape, device=z.device).to(z.dtype) * 2 - 1
        return sign * z, torch.full(z.shape[:-1], z.shape[-1] * math.log(2.0), dtype=z.dtype)

    def inverse_and_ladj(self, x):
        return x.abs(), torch.full(x.shape[:-1], -x.shape[-1] * math.log(2.0), dtype=x.dtype)


class TinyAugment(Surjection):
    """Generative x = z[:D] (drops A dims); inference draws e ~ N(mu, 1): V = -log r(e)."""

    stochastic_forward, stochastic_inverse = False, True

    def __init__(self, dim, extra, mu=1.0):
        super().__init__()
        self.dim, self.extra, self.mu = dim, extra, mu

    def forward_shape(self, shape):
        return shape[:-1] + (shape[-1] - self.extra,)

    def inverse_shape(self, shape):
        return shape[:-1] + (shape[-1] + self.extra,)

    def call_and_ladj(self, z):
        e = z[..., self.dim:]
        log_r = dist.Normal(self.mu, 1.0).log_prob(e).sum(-1)
        return z[..., : self.dim], log_r  # ladj = -V = log r(e | x)

    def inverse_and_ladj(self, x):
        e = self.mu + torch.randn(x.shape[:-1] + (self.extra,), dtype=x.dtype)
        return torch.cat([x, e], -1), -dist.Normal(self.mu, 1.0).log_prob(e).sum(-1)

    def base_event_shape(self):
        return torch.Size([self.dim + self.extra])


def test_inference_surjection_gives_exact_density():
    # |x| with x ~ N(0, 1) is half-normal: HalfNormal base + Abs must be exactly N(0, I)
    flow = pfe.Flow(dist.HalfNormal(torch.ones(3)).to_event(1), [TinyAbs()])
    assert flow.is_exact and not TinyAbs.bijective
    x = torch.randn(100, 3)
    expected = dist.Normal(0.0, 1.0).log_prob(x).sum(-1)
    assert (flow.log_prob(x) - expected).abs().max() < 1e-6
    sample, lp = flow.sample_and_log_prob((50,))
    torch.testing.assert_close(lp, dist.Normal(0.0, 1.0).log_prob(sample).sum(-1))
    assert (sample < 0).any() and (sample > 0).any()


def test_unseen_pair_is_a_clear_error_and_cache_cannot_be_disabled():
    # an inference surjection's V is a function of x: an unseen pair is scored from x
    ladj = TinyAbs().log_abs_det_jacobian(torch.ones(2, 3), -torch.ones(2, 3))
    torch.testing.assert_close(ladj, torch.full((2,), 3 * math.log(2.0)))
    layer = TinyAugment(3, 2)  # a generative surjection's V needs the draw it made
    with pytest.raises(UnseenPairError, match="score through the Flow"):
        layer.log_abs_det_jacobian(torch.ones(2, 5), torch.ones(2, 3))
    with pytest.raises(ValueError, match="needs cache_size=1"):
        layer.with_cache(0)


def test_generative_surjection_is_a_lower_bound_with_known_gap():
    # N(0, I_5) base, drop 2 dims, r(e|x) = N(mu, 1): E[log_prob] = log p(x) - KL = log p(x) - mu^2
    mu = 1.0
    flow = pfe.Flow(None, [TinyAugment(3, 2, mu=mu)])
    assert not flow.is_exact
    assert flow.event_shape == (3,)
    x = torch.randn(20000, 3)
    exact = dist.Normal(0.0, 1.0).log_prob(x).sum(-1)
    gap = (flow.log_prob(x) - exact).mean()
    assert abs(gap.item() + mu**2) < 0.05


def test_scoring_the_same_tensor_reuses_the_draw_and_clone_redraws():
    flow = pfe.Flow(None, [TinyAugment(3, 2)])
    x = torch.randn(10, 3)
    a, b = flow.log_prob(x), flow.log_prob(x)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(flow.log_prob(x.clone()), a)


def test_sample_then_score_hits_the_pair_cache():
    flow = pfe.Flow(None, [pfe.transforms.AffineCoupling(4), TinyAugment(3, 1),
                           pfe.transforms.Exp(3)])
    x, lp = flow.sample_and_log_prob((7,))
    torch.testing.assert_close(flow.log_prob(x), lp)
    y = flow.rsample((4,))
    assert flow.log_prob(y).shape == (4,)


def test_deepcopy_after_rsample_with_graph():
    flow = pfe.flows.realnvp(2, num_layers=2)
    x = flow.rsample((5,))
    flow.log_prob(x).sum().backward()
    copy.deepcopy(flow)  # Pyro's own AffineCoupling raises here
