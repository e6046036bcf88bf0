"""MCMC layers (Stochastic Normalizing Flows): invariance, unbiased weights, the scoring bound,
Pyro-model energies, SVI with an SNF guide, training, and the layer protocol."""

import copy
import io
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide.initialization import init_to_value
from scipy import stats

import pyro_flows_ext as pfe
from pyro_flows_ext import Flow
from pyro_flows_ext.stochastic import (
    AutoSNFGuide,
    HMCLayer,
    InterpolatedEnergy,
    LangevinLayer,
    MetropolisLayer,
    effective_sample_size,
    fit_snf,
    importance_weights,
    ladder,
    potential_from_model,
    standard_normal_energy,
)
from pyro_flows_ext.stochastic.train import default_snf_layers
from pyro_flows_ext.transforms import AffineCoupling


class GaussianEnergy:
    """U(x) = (x - mu)^T P (x - mu) / 2 + const for a full covariance (exact sampler too)."""

    def __init__(self, mean, cov, const=0.0):
        self.mean, self.cov = torch.as_tensor(mean), torch.as_tensor(cov)
        self.prec, self.const = torch.linalg.inv(self.cov), const
        self.dim = len(self.mean)

    def __call__(self, x):
        d = x - self.mean.to(x)
        return 0.5 * (d @ self.prec.to(x) * d).sum(-1) + self.const

    def sample(self, n):
        return dist.MultivariateNormal(self.mean, self.cov).sample((n,))


LAYERS = {
    "metropolis": lambda e: MetropolisLayer(e),
    "mala": lambda e: LangevinLayer(e),
    "hmc": lambda e: HMCLayer(e),
}
ULA = {"ula": lambda e: LangevinLayer(e, adjusted=False, step_size=0.02)}
ALL = {**LAYERS, **ULA}
TARGETS = {
    "1d": GaussianEnergy([0.5], [[0.64]], const=3.0),
    "2d": GaussianEnergy([0.5, -1.0], [[1.0, 0.6], [0.6, 0.8]], const=-2.0),
}


def se_mean(x):
    return x.std() / math.sqrt(len(x))


# -- invariance: z ~ pi  =>  x ~ pi ----------------------------------------------------------

@pytest.mark.parametrize("target", TARGETS, ids=list(TARGETS))
@pytest.mark.parametrize("name", LAYERS, ids=list(LAYERS))
def test_invariance(name, target):
    energy = TARGETS[target]
    layer = LAYERS[name](energy)  # default settings
    n = 20000
    z = energy.sample(n)
    x = layer(z)
    moved = (x != z).any(-1).float().mean().item()
    assert moved > 0.3, f"only {moved:.2f} of the chains moved: invariance would be trivial"
    assert (x - z).abs().mean() > 0.05
    whiten = torch.linalg.cholesky(energy.prec)  # x L ~ N(., I) for x ~ pi
    for k in range(energy.dim):
        xs = x[:, k]
        mu, sd = energy.mean[k].item(), energy.cov[k, k].sqrt().item()
        assert abs(xs.mean().item() - mu) < 4 * sd / math.sqrt(n)
        assert abs(xs.std().item() - sd) < 4 * sd / math.sqrt(2 * n)
        assert stats.kstest(xs.numpy(), stats.norm(mu, sd).cdf).pvalue > 1e-3
        w = ((x - energy.mean) @ whiten)[:, k]
        assert stats.kstest(w.numpy(), stats.norm(0, 1).cdf).pvalue > 1e-3


def test_ula_marginal_is_the_exact_gaussian_recursion():
    """ULA is biased by O(eps); on a Gaussian its law after n steps is known exactly."""
    s2, eps, steps, n = 0.36, 0.05, 5, 20000
    layer = LangevinLayer(GaussianEnergy([0.0], [[s2]]), steps=steps, step_size=eps,
                          adjusted=False)
    x = layer(torch.randn(n, 1))[:, 0]
    c = 1 - eps / s2
    var = c ** (2 * steps) + 2 * eps * (1 - c ** (2 * steps)) / (1 - c * c)
    assert stats.kstest(x.numpy(), stats.norm(0, math.sqrt(var)).cdf).pvalue > 1e-3
    assert abs(x.var().item() - var) < 4 * var * math.sqrt(2 / n)


# -- unbiased weights: E_q[p(x) / q_hat(x)] = 1 -----------------------------------------------

@pytest.mark.parametrize("name", ALL, ids=list(ALL))
def test_weights_have_mean_one(name):
    """A normalised base N(0, 1) and final target N(0.5, 1); the layer targets a different,
    unnormalised energy. Sign errors in V or a non-invariant kernel move the mean."""
    layer = ALL[name](GaussianEnergy([1.0], [[0.64]], const=7.0))
    flow = Flow(None, [layer])
    n = 20000
    with torch.no_grad():
        x, log_q = flow.sample_and_log_prob((n,))
    w = (dist.Normal(0.5, 1.0).log_prob(x[:, 0]) - log_q).exp()
    assert abs(w.mean().item() - 1) < 4 * se_mean(w).item()
    assert 0.005 < se_mean(w).item() < 0.05  # the weights are not trivially constant


def test_weights_through_a_coupling_and_a_ladder():
    torch.manual_seed(1)
    target = GaussianEnergy([1.0, -0.5], [[0.5, 0.2], [0.2, 0.4]])
    c = AffineCoupling(2, hidden_dims=(8,))
    with torch.no_grad():
        for p in c.parameters():
            p.add_(0.3 * torch.randn_like(p))
    e1, e2 = ladder(target, 2)
    flow = Flow(None, [c, MetropolisLayer(e1), AffineCoupling(2, hidden_dims=(8,)),
                       LangevinLayer(e2)])
    with torch.no_grad():
        x, log_q = flow.sample_and_log_prob((20000,))
    log_p = -target(x) - 0.5 * torch.logdet(2 * math.pi * target.cov)
    w = (log_p - log_q).exp()
    assert abs(w.mean().item() - 1) < 4 * se_mean(w).item()


# -- the scoring direction: a bound on the flow's marginal ----------------------------------

def _metropolis_one_step_marginal(x, energy, step):
    """p1(x) for z ~ N(0, 1) and one RW Metropolis step, by quadrature (independent of the
    layer): int p0(z) q(x|z) a(z, x) dz + p0(x) (1 - int q(y|x) a(x, y) dy)."""
    grid = torch.linspace(-12, 12, 48001, dtype=torch.float64)
    dz = grid[1] - grid[0]
    log_pi = lambda t: -energy(t[..., None])  # noqa: E731
    p0 = dist.Normal(0.0, 1.0).log_prob(grid).exp()
    out = []
    for xv in x.tolist():
        xt = torch.tensor(xv, dtype=torch.float64)
        q = dist.Normal(grid, step).log_prob(xt).exp()
        a = (log_pi(xt) - log_pi(grid)).exp().clamp(max=1)
        moved_in = (p0 * q * a).sum() * dz
        q_out = dist.Normal(xt, step).log_prob(grid).exp()
        a_out = (log_pi(grid) - log_pi(xt)).exp().clamp(max=1)
        stay = 1 - (q_out * a_out).sum() * dz
        out.append(moved_in + dist.Normal(0.0, 1.0).log_prob(xt).exp() * stay)
    return torch.stack(out)


def test_scoring_is_a_bound_on_the_metropolis_marginal():
    energy = GaussianEnergy(torch.tensor([1.0], dtype=torch.float64),
                            torch.tensor([[0.49]], dtype=torch.float64), const=2.0)
    layer = MetropolisLayer(energy, steps=1, step_size=1.0, adapt=False).double()
    flow = Flow(None, [layer])
    points = torch.tensor([-1.0, 0.3, 1.2, 2.5], dtype=torch.float64)
    exact = _metropolis_one_step_marginal(points, energy, 1.0).log()
    k = 20000
    for xv, log_p1 in zip(points, exact):
        log_q = flow.log_prob(xv.reshape(1, 1).expand(k, 1))  # k independent backward draws
        assert log_q.std() > 0.05  # the draws differ
        mean, se = log_q.mean(), se_mean(log_q)
        assert mean + 4 * se < log_p1, "E[log q_hat(x)] must lie below log q(x)"
        assert mean > log_p1 - 2.0
        q = log_q.exp()
        assert abs(q.mean() - log_p1.exp()) < 4 * se_mean(q)  # exp is unbiased


def test_scoring_is_a_bound_on_the_ula_marginal():
    s2, eps, steps = 0.36, 0.05, 5
    layer = LangevinLayer(GaussianEnergy([0.0], [[s2]]), steps=steps, step_size=eps,
                          adjusted=False).double()
    c = 1 - eps / s2
    var = c ** (2 * steps) + 2 * eps * (1 - c ** (2 * steps)) / (1 - c * c)
    flow = Flow(None, [layer])
    for xv in (-1.5, 0.0, 0.8):
        log_exact = dist.Normal(0.0, math.sqrt(var)).log_prob(torch.tensor(xv)).item()
        log_q = flow.log_prob(torch.full((20000, 1), xv, dtype=torch.float64))
        assert log_q.mean() + 4 * se_mean(log_q) < log_exact
        q = log_q.exp()
        assert abs(q.mean().item() - math.exp(log_exact)) < 4 * se_mean(q).item()


# -- potential_from_model --------------------------------------------------------------------

def constrained_model(y):
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
    w = pyro.sample("w", dist.Dirichlet(torch.ones(3)))
    with pyro.plate("groups", 2):
        t = pyro.sample("t", dist.HalfCauchy(1.0))
    with pyro.plate("data", len(y)):
        # written to broadcast over a leading batch dimension (w[..., 0], not w[0])
        pyro.sample("y", dist.Normal(mu + w[..., 0] + t.sum(-1, keepdim=True), s), obs=y)


def test_potential_matches_pyro_on_single_points():
    y = torch.randn(6)
    U = potential_from_model(constrained_model, y)
    assert U.vectorized and U.dim == 1 + 1 + 2 + 2
    assert list(U.sites) == ["mu", "s", "w", "t"]
    x = torch.randn(8, U.dim)
    mine = U(x)
    pyro_u = torch.stack([U.pyro_potential(p) for p in x])  # initialize_model's potential_fn
    torch.testing.assert_close(mine, pyro_u, rtol=1e-5, atol=1e-4)
    # batched: any batch shape, and the same as one point at a time
    xb = torch.randn(3, 4, U.dim)
    assert U(xb).shape == (3, 4)
    torch.testing.assert_close(U(xb).reshape(-1), torch.stack([U(p) for p in xb.reshape(-1, 6)]))
    # the map back to constrained sites
    sites = U.constrain(xb)
    assert sites["w"].shape == (3, 4, 3) and sites["t"].shape == (3, 4, 2)
    torch.testing.assert_close(sites["w"].sum(-1), torch.ones(3, 4))
    torch.testing.assert_close(sites["s"], xb[..., 1].exp())
    assert (sites["t"] > 0).all()
    torch.testing.assert_close(U.pack(sites), xb, rtol=1e-4, atol=1e-4)


def test_potential_of_a_factor_model_and_the_loop_fallback():
    def model():
        x = pyro.sample("x", dist.Normal(0.0, 3.0).expand([2]).to_event(1))
        pyro.factor("f", -x[..., 0] ** 2 * x[..., 1].abs())

    def unbatched_model():  # indexes x[0]: does not broadcast over a batch
        x = pyro.sample("x", dist.Normal(0.0, 3.0).expand([2]).to_event(1))
        pyro.factor("f", -x[0] ** 2 * x[1].abs())

    x = torch.randn(5, 2)
    expected = (-dist.Normal(0.0, 3.0).log_prob(x).sum(-1) + x[:, 0] ** 2 * x[:, 1].abs())
    U = potential_from_model(model)
    assert U.vectorized
    torch.testing.assert_close(U(x), expected)
    with pytest.warns(UserWarning, match="one point at a time"):
        V = potential_from_model(unbatched_model)
    assert not V.vectorized
    torch.testing.assert_close(V(x), expected)


def test_interpolated_energy():
    target = GaussianEnergy([1.0, 2.0], torch.eye(2) * 0.5)
    x = torch.randn(7, 2)
    e = InterpolatedEnergy(target, 0.25)
    torch.testing.assert_close(e(x), 0.75 * standard_normal_energy(x) + 0.25 * target(x))
    lams = [en.lam for en in ladder(target, 4)]
    assert lams == [0.25, 0.5, 0.75, 1.0]
    with pytest.raises(ValueError, match="lam"):
        InterpolatedEnergy(target, 1.5)


# -- SVI: an SNF guide on a bimodal target ---------------------------------------------------

MODE = 1.5


def bimodal_model():
    x = pyro.sample("x", dist.Normal(0.0, 5.0).expand([2]).to_event(1))
    comps = torch.stack([dist.Normal(torch.tensor([MODE, 0.0]), 0.5).log_prob(x).sum(-1),
                         dist.Normal(torch.tensor([-MODE, 0.0]), 0.5).log_prob(x).sum(-1)])
    pyro.factor("mixture", torch.logsumexp(comps, 0))


def _svi(mcmc_steps, steps=60):
    pyro.clear_param_store()

    def layers(dim, potential, init):
        mcmc = ([MetropolisLayer(potential, steps=mcmc_steps, step_size=1.5, adapt=False)]
                if mcmc_steps else [])
        return default_snf_layers(dim, potential, init, 0.1, mcmc=mcmc, hidden_dims=(16,))

    guide = AutoSNFGuide(bimodal_model, layers=layers,
                         init_loc_fn=init_to_value(values={"x": torch.tensor([MODE, 0.0])}))
    svi = pyro.infer.SVI(bimodal_model, guide, pyro.optim.Adam({"lr": 1e-2}),
                         pyro.infer.Trace_ELBO(num_particles=32, vectorize_particles=True,
                                               max_plate_nesting=0))
    losses = [svi.step() for _ in range(steps)]
    x = guide.sample_unconstrained(num_samples=2000)
    return losses, (x[:, 0] > 0).float().mean().item(), guide


def test_svi_snf_guide_covers_both_modes():
    losses, right, guide = _svi(mcmc_steps=20)
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.2
    assert 0.25 < right < 0.75, f"SNF guide: {right:.2f} of the mass right of 0"
    assert isinstance(guide.potential, pfe.stochastic.ModelPotential)
    losses_b, right_b, _ = _svi(mcmc_steps=0)
    assert sum(losses_b[-10:]) / 10 < sum(losses_b[:10]) / 10 - 0.2
    assert right_b > 0.95, f"bijective guide: {right_b:.2f} of the mass right of 0"


# -- training: fit_density, reverse KL, the mix; step sizes ----------------------------------

def double_well(x):
    d = x[..., 0]
    return d ** 4 - 6 * d ** 2 - 0.5 * d + 0.5 * x[..., 1] ** 2


def double_well_samples(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    grid = torch.linspace(-3.5, 3.5, 20001, dtype=torch.float64)
    p = (-(grid ** 4 - 6 * grid ** 2 - 0.5 * grid)).exp()
    cdf = p.cumsum(0) / p.sum()
    x1 = grid[torch.searchsorted(cdf, torch.rand(n, generator=g, dtype=torch.float64))]
    return torch.stack([x1.float(), torch.randn(n, generator=g)], -1)


def test_fit_density_with_mcmc_layers():
    data = double_well_samples(2000)
    flow = Flow(None, [AffineCoupling(2, hidden_dims=(16, 16)),
                       AffineCoupling(2, hidden_dims=(16, 16), mask=torch.tensor([False, True])),
                       MetropolisLayer(double_well, steps=5)])
    hist = pfe.infer.fit_density(flow, data, num_steps=150, batch_size=128, progress=False,
                                 optim=pyro.optim.Adam({"lr": 5e-3}), patience=None)
    assert hist["best_val_nll"] < hist["val_nll"][0] - 0.5
    assert all(math.isfinite(v) for v in hist["loss"])


def test_reverse_kl_and_mixed_training():
    flow = Flow(None, [AffineCoupling(2, hidden_dims=(16, 16)),
                       AffineCoupling(2, hidden_dims=(16, 16), mask=torch.tensor([False, True])),
                       LangevinLayer(double_well, steps=3)])
    before = importance_weights(flow, energy=double_well, num_samples=2000)
    hist = fit_snf(flow, energy=double_well, num_steps=100, batch_size=64, lr=2e-2)
    kl = hist["kl"]
    assert sum(kl[-10:]) / 10 < sum(kl[:10]) / 10 - 1.0
    after = importance_weights(flow, energy=double_well, num_samples=2000)
    assert after.reverse_kl < before.reverse_kl
    mixed = fit_snf(flow, energy=double_well, data=double_well_samples(500), num_steps=5,
                    batch_size=32, schedule=lambda s: (1.0, 0.0) if s < 2 else (0.5, 0.5))
    assert math.isnan(mixed["kl"][0]) and math.isfinite(mixed["kl"][-1])
    assert all(math.isfinite(v) for v in mixed["nll"])


def test_gradients_reach_layers_before_mcmc():
    c = AffineCoupling(2, hidden_dims=(8,))
    for layer in (LangevinLayer(double_well, steps=2), HMCLayer(double_well, steps=2),
                  MetropolisLayer(double_well, steps=2)):
        c.zero_grad()
        flow = Flow(None, [c, layer])
        x, log_q = flow.sample_and_log_prob((64,))
        (double_well(x) + log_q).mean().backward()
        grads = [p.grad for p in c.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert sum(g.abs().sum() for g in grads) > 0


def test_step_size_adapts_in_training_and_not_in_eval():
    e = GaussianEnergy([0.0, 0.0], torch.eye(2))
    layer = MetropolisLayer(e, steps=5, step_size=4.0)
    for _ in range(40):
        layer(torch.randn(256, 2))
    assert layer.step_size < 3.0
    assert abs(layer.accept_rate.item() - layer.target_accept) < 0.1
    layer.eval()
    s = layer.step_size.clone()
    layer(torch.randn(256, 2))
    assert torch.equal(layer.step_size, s)
    with pytest.raises(ValueError, match="not both"):
        MetropolisLayer(e, adapt=True, learn_step_size=True)


def test_learnable_step_size_is_trained():
    layer = LangevinLayer(double_well, steps=3, step_size=0.01, adjusted=False,
                          learn_step_size=True)
    assert isinstance(layer.log_step_size, torch.nn.Parameter)
    flow = Flow(None, [AffineCoupling(2, hidden_dims=(8,)), layer])
    before = layer.log_step_size.item()
    fit_snf(flow, energy=double_well, num_steps=3, batch_size=32, lr=1e-2)
    assert layer.log_step_size.item() != before
    assert math.isfinite(layer.log_step_size.item())


# -- the protocol: caches, batches, copies, dtypes, devices ----------------------------------

@pytest.mark.parametrize("name", ALL, ids=list(ALL))
def test_no_state_shared_across_batch_entries(name):
    layer = ALL[name](double_well).eval()
    z = torch.randn(16, 2)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        x1 = layer(z)
    z2 = z.clone()
    z2[5] = torch.tensor([30.0, -40.0])  # a wild chain (huge energies and forces)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        x2 = layer(z2)
    keep = torch.arange(16) != 5
    torch.testing.assert_close(x1[keep], x2[keep], rtol=0, atol=0)
    same = layer(torch.zeros(2).expand(500, 2))  # identical starts, independent chains
    assert same.unique(dim=0).shape[0] > 100


@pytest.mark.parametrize("name", ALL, ids=list(ALL))
def test_cache_deepcopy_and_save_after_sampling(name):
    flow = Flow(None, [AffineCoupling(2, hidden_dims=(8,)), ALL[name](double_well)])
    x, log_q = flow.sample_and_log_prob((10,))
    assert torch.equal(flow.log_prob(x), log_q)  # the sample's own path: no new draw
    xd = x.detach()
    first = flow.log_prob(xd)
    assert torch.equal(flow.log_prob(xd), first)  # the same tensor reuses its draw
    assert not torch.equal(flow.log_prob(xd.clone()), first)  # a clone draws again
    clone = copy.deepcopy(flow)
    buf = io.BytesIO()
    torch.save(flow, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    fresh = x.detach().clone()
    for other in (clone, loaded):
        other.eval()
        flow.eval()
        with torch.random.fork_rng():
            torch.manual_seed(7)
            a = other.log_prob(fresh.clone())
        with torch.random.fork_rng():
            torch.manual_seed(7)
            b = flow.log_prob(fresh.clone())
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", ALL, ids=list(ALL))
def test_float64_and_to(name):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    layer = ALL[name](double_well)
    layer.dim = 2
    layer = layer.to(device=device, dtype=torch.float64)
    assert layer.log_step_size.dtype == torch.float64
    flow = Flow(None, [layer])
    assert flow.base_dist.mean.dtype == torch.float64
    x, log_q = flow.sample_and_log_prob((50,))
    assert x.dtype == log_q.dtype == torch.float64 and x.device.type == device
    assert torch.isfinite(log_q).all()
    assert flow.log_prob(x.clone()).dtype == torch.float64


def test_energy_shape_is_checked():
    layer = MetropolisLayer(lambda x: x.sum(-1, keepdim=True), dim=2)
    with pytest.raises(ValueError, match=r"\(\.\.\., D\) to \(\.\.\.\)"):
        layer(torch.randn(4, 2))
    with pytest.raises(ValueError, match="expects events"):
        MetropolisLayer(double_well, dim=2)(torch.randn(4, 3))


def test_importance_weights_and_ess():
    lw = torch.tensor([0.0, 0.0, 0.0, 0.0])
    assert effective_sample_size(lw).item() == pytest.approx(4.0)
    assert effective_sample_size(torch.tensor([0.0, -1e9])).item() == pytest.approx(1.0)
    target = GaussianEnergy([0.3, 0.0], torch.eye(2), const=1.5)  # log Z = log 2 pi - 1.5
    flow = Flow(None, [MetropolisLayer(target, steps=3)])
    iw = importance_weights(flow, energy=target, num_samples=20000, batch_size=7000)
    assert iw.samples.shape == (20000, 2) and iw.weights.sum().item() == pytest.approx(1.0)
    assert 0.3 < iw.ess_fraction <= 1.0
    assert abs(iw.log_evidence - (math.log(2 * math.pi) - 1.5)) < 4 * iw.log_evidence_se
    mean = iw.expectation(lambda x: x)
    assert abs(mean[0].item() - 0.3) < 0.05
    assert flow.training  # the mode is restored


def test_guide_latent_layout_matches_the_potential():
    y = torch.randn(6)
    guide = AutoSNFGuide(constrained_model,
                         layers=lambda dim, potential, init: [MetropolisLayer(potential)])
    guide(y)  # traces the model, builds the potential and the flow
    x = torch.randn(guide.latent_dim)
    from torch.distributions import biject_to

    theirs = {site["name"]: biject_to(site["fn"].support)(u)
              for site, u in guide._unpack_latent(x)}
    mine = guide.potential.constrain(x)
    assert list(theirs) == list(mine)
    for name in mine:
        torch.testing.assert_close(mine[name], theirs[name])
    trace = pyro.poutine.trace(guide).get_trace(y)
    assert set(trace.nodes) >= {"mu", "s", "w", "t"}


@pytest.mark.parametrize("name", ALL, ids=list(ALL))
def test_likelihood_of_an_unseen_pair(name):
    layer = ALL[name](double_well)
    z, x = torch.randn(5, 2), torch.randn(5, 2)
    if name == "ula":
        with pytest.raises(pfe.core.UnseenPairError):
            layer.log_abs_det_jacobian(z, x)
        return
    # -V = log pi(z) - log pi(x), computed here from the energy directly
    torch.testing.assert_close(layer.log_abs_det_jacobian(z, x), double_well(x) - double_well(z))
    # and the pair the layer made itself matches the same closed form
    x2, ladj = layer.call_and_ladj(z)
    torch.testing.assert_close(ladj, double_well(x2) - double_well(z), rtol=1e-5, atol=1e-4)
