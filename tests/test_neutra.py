"""neutra_mcmc: NUTS on the funnel through a flow guide; refuses non-bijective layers."""

import importlib.util
import os
import warnings

import pyro
import pytest
import scipy.stats
import torch
from pyro.infer import SVI, Trace_ELBO

import pyro_flows_ext as pfe
from pyro_flows_ext.core import FlowLayer
from pyro_flows_ext.diagnostics import DiagnosticWarning
from pyro_flows_ext.infer import AutoFlowGuide, neutra_mcmc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_example(name):
    path = os.path.join(ROOT, "examples", "models", name + ".py")
    spec = importlib.util.spec_from_file_location("example_" + name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def funnel_guide(dim, steps):
    """A coupling that lets v scale x: the exact funnel map is in its family."""
    funnel = load_example("funnel")

    def model():
        funnel.model(dim)

    mask = torch.arange(dim) == 0  # v (the first latent coordinate) conditions the rest
    guide = AutoFlowGuide(model, flow=lambda d: [pfe.transforms.AffineCoupling(
        d, hidden_dims=(16,), mask=mask)], init_scale=1.0)
    svi = SVI(model, guide, pyro.optim.ClippedAdam({"lr": 2e-2, "lrd": 0.1 ** (1 / steps)}),
              Trace_ELBO(8, vectorize_particles=True))
    for _ in range(steps):
        svi.step()
    return model, guide


def test_neutra_funnel_marginal_of_v():
    model, guide = funnel_guide(4, 600)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DiagnosticWarning)  # one chain: no R-hat
        result = neutra_mcmc(model, guide, num_samples=400, warmup_steps=200, seed=1,
                             max_tree_depth=6, num_chains=1)
    v = result.samples["v"]
    assert v.shape == (400,) and result.samples["x"].shape == (400, 3)
    assert result.latent.shape == (1, 400, 4)
    assert scipy.stats.kstest(v.numpy(), scipy.stats.norm(0, 3).cdf).pvalue > 0.01
    assert 2.0 < float(v.std()) < 4.0
    assert result.idata.posterior["v"].shape == (1, 400)
    assert result.idata.sample_stats["diverging"].shape == (1, 400)


def test_neutra_two_chains_eight_schools():
    schools = load_example("eight_schools")
    guide = AutoFlowGuide(schools.model, flow=lambda d: [pfe.transforms.AffineCoupling(d)])
    svi = SVI(schools.model, guide, pyro.optim.ClippedAdam({"lr": 1e-2}), Trace_ELBO())
    for _ in range(100):
        svi.step()
    with pytest.warns(DiagnosticWarning):  # 30 draws a chain: ESS below 100 per chain
        result = neutra_mcmc(schools.model, guide, num_samples=30, warmup_steps=30,
                             num_chains=2, max_tree_depth=5)
    assert result.samples["theta"].shape == (60, 8)
    assert (result.samples["tau"] > 0).all()
    assert result.idata.posterior["theta"].shape == (2, 30, 8)
    assert all(p.requires_grad for p in guide.parameters())  # restored after sampling


def regression_guide(make, seed=None):
    """A conjugate regression (exact posterior ``mu``, ``cov``) and ``make(model)`` trained on
    it for 300 Adam steps: ``(model, guide, x, y, mu, cov)``."""
    from tests.test_diagnostics import regression_data

    model, x, y, mu, cov, _ = regression_data(n=30, dtype=torch.float32)
    if seed is not None:
        pyro.set_rng_seed(seed)
    guide = make(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 5e-2}), Trace_ELBO())
    for _ in range(300):
        svi.step(x, y)
    return model, guide, x, y, mu, cov


def test_model_with_positional_data():
    """``neutra_mcmc(model, guide, x, y, num_samples=...)`` runs ``model(x, y)``: draws match
    the exact posterior of the data given (a different data set, a different posterior)."""
    # one site: LocScale only
    model, guide, x, y, mu, cov = regression_guide(lambda m: AutoFlowGuide(m, flow=()))
    with warnings.catch_warnings():
        # a clean run (a good guide of a Gaussian posterior, 2 chains): no diagnostic warning.
        # R-hat > 1.01 also trips by chance on short runs (measured: 1 seed in 5 at 400 draws
        # a chain; R-hat's noise is ~1/ESS), so the chains are 1500 draws long
        warnings.simplefilter("error", DiagnosticWarning)
        result = neutra_mcmc(model, guide, x, y, num_samples=1500, warmup_steps=150, seed=1,
                             max_tree_depth=4)
    w = result.samples["w"]
    assert w.shape == (3000, 2) and result.idata.posterior["w"].shape == (2, 1500, 2)
    sd = cov.diagonal().sqrt()
    # the draws are autocorrelated: allow an effective sample size of 50
    assert ((w.mean(0) - mu).abs() < 4 * sd / 50 ** 0.5).all(), (w.mean(0), mu)
    assert ((w.std(0) / sd - 1).abs() < 0.35).all(), (w.std(0), sd)
    # keyword data reach the model the same way
    with pytest.warns(DiagnosticWarning, match="effective sample size"):  # 20 draws a chain
        result = neutra_mcmc(model, guide, x, y=y, num_samples=20, warmup_steps=10, seed=0,
                             max_tree_depth=3, num_chains=1)
    assert result.samples["w"].shape == (20, 2)


def test_options_passed_positionally_fail_clearly():
    funnel = load_example("funnel")
    guide = AutoFlowGuide(funnel.model)
    # the old calling convention neutra_mcmc(model, guide, num_samples, warmup_steps): the
    # funnel takes one argument (dim), so two positional numbers cannot be its arguments
    with pytest.raises(TypeError, match=r"neutra_mcmc: the model cannot be called with "
                                        r"\(10, 10\).*options are keyword-only"):
        neutra_mcmc(funnel.model, guide, 10, 10)
    with pytest.raises(TypeError, match="unexpected keyword argument 'warmup'"):
        neutra_mcmc(funnel.model, guide, num_samples=10, warmup=10)
    assert guide.prototype_trace is None  # refused before anything ran


class Coin(FlowLayer):
    """A tiny non-bijective layer: flips the sign of the event at random (Abs's inverse)."""

    bijective = False

    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def call_and_ladj(self, z):
        sign = torch.randint(0, 2, z.shape[:-1] + (1,)).to(z) * 2 - 1
        return z * sign, torch.zeros(z.shape[:-1])

    def inverse_and_ladj(self, x):
        return x.abs(), torch.zeros(x.shape[:-1])


def test_refuses_non_bijective_layer():
    funnel = load_example("funnel")
    guide = AutoFlowGuide(funnel.model, flow=lambda d: [pfe.transforms.AffineCoupling(d),
                                                         Coin(d)])
    guide()
    with pytest.raises(ValueError, match=r"layer 1 \(Coin\) is not bijective"):
        neutra_mcmc(funnel.model, guide, num_samples=10, warmup_steps=10)


def test_bad_input():
    funnel = load_example("funnel")
    with pytest.raises(TypeError, match="AutoContinuous"):
        neutra_mcmc(funnel.model, pyro.infer.autoguide.AutoNormal(funnel.model),
                    num_samples=10, warmup_steps=10)
    with pytest.raises(ValueError, match="num_samples must be a positive integer"):
        neutra_mcmc(funnel.model, AutoFlowGuide(funnel.model), num_samples=0, warmup_steps=10)
    with pytest.raises(ValueError, match="warmup_steps must be a non-negative integer"):
        neutra_mcmc(funnel.model, AutoFlowGuide(funnel.model), warmup_steps=-1)
    with pytest.raises(ValueError, match="num_chains must be a positive integer, got True"):
        neutra_mcmc(funnel.model, AutoFlowGuide(funnel.model), num_chains=True)


def test_warnings_fire_on_a_known_problem():
    """Centered eight schools with a 20-step default guide and short NUTS: the guide's
    k-hat is refused before sampling, and the draws' problems are named after it."""
    schools = load_example("eight_schools")
    pyro.set_rng_seed(0)
    guide = AutoFlowGuide(schools.model)
    svi = SVI(schools.model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    for _ in range(20):
        svi.step()
    with pytest.warns(DiagnosticWarning) as caught:
        neutra_mcmc(schools.model, guide, num_samples=20, warmup_steps=20, seed=0,
                    max_tree_depth=3)
    lines = [str(w.message) for w in caught if w.category is DiagnosticWarning]
    assert lines[0].startswith("neutra_mcmc: the guide's PSIS k-hat is")
    assert "not good enough for NeuTra" in lines[0] and "plain NUTS" in lines[0]
    assert "cannot see posterior regions the guide never visits" in lines[0]
    after = lines[1:]
    assert any("effective sample size below 100 per chain" in line for line in after)
    assert any("R-hat above 1.01" in line or "divergent" in line for line in after), after
    assert all("\n" not in line for line in lines)
    named = [line for line in after if "worst" in line]
    assert named and all(any(s in line for s in ("theta[", "mu", "tau")) for line in named)


def test_guide_check_leaves_the_chains_alone():
    """The k-hat check draws under a forked RNG: seeded chains are the same with or without
    it; a k-hat passed in is used as is."""
    from tests.test_diagnostics import regression_data

    model, x, y, *_ = regression_data(n=30, dtype=torch.float32)
    guide = AutoFlowGuide(model, flow=())
    guide(x, y)
    runs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DiagnosticWarning)
        for check in (True, False):
            runs.append(neutra_mcmc(model, guide, x, y, num_samples=5, warmup_steps=5,
                                    seed=3, max_tree_depth=2, check_guide=check))
    assert torch.equal(runs[0].latent, runs[1].latent)
    with pytest.warns(DiagnosticWarning, match="k-hat is 0.90"):
        neutra_mcmc(model, guide, x, y, num_samples=5, warmup_steps=5, max_tree_depth=2,
                    check_guide=0.9)


def test_guide_check_uses_check_draws_guide_draws(num_samples_spy):
    """k-hat from a few hundred draws is noisy (0.3-0.9 for one funnel guide at 500), so the
    check before sampling takes CHECK_DRAWS (4000) draws."""
    from pyro_flows_ext import diagnostics
    from pyro_flows_ext.infer import neutra as neutra_module
    from tests.test_diagnostics import regression_data

    model, x, y, *_ = regression_data(n=30, dtype=torch.float32)
    guide = AutoFlowGuide(model, flow=())
    guide(x, y)
    seen = num_samples_spy(diagnostics, "psis_khat")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DiagnosticWarning)
        neutra_mcmc(model, guide, x, y, num_samples=5, warmup_steps=5, max_tree_depth=2)
    assert seen == [neutra_module.CHECK_DRAWS], seen
    assert neutra_module.CHECK_DRAWS >= 4000


def _reparam_potential(model, guide):
    """The potential Pyro's own NeuTraReparam gives NUTS (the independent reference)."""
    from pyro import poutine
    from pyro.infer.mcmc.util import initialize_model
    from pyro.infer.reparam import NeuTraReparam

    latent = {name for name, _ in guide.prototype_trace.iter_stochastic_nodes()}
    neutra = NeuTraReparam(guide)
    reparam = poutine.reparam(model, config=lambda s: neutra if s["name"] in latent else None)
    init, potential, _, _ = initialize_model(reparam)
    (name,) = init
    return lambda z: potential({name: z})


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_warped_potential_equals_neutra_reparam(jit, dtype):
    """U(z) = -log p(x, f(z)) - log|det f'(z)|, value and gradient, equals the potential of
    Pyro's NeuTraReparam at random base points, eager and traced; on eight schools (a plate,
    a positive site) with a partly trained default guide."""
    from pyro_flows_ext.infer.neutra import warped_potential

    schools = load_example("eight_schools")
    torch.set_default_dtype(dtype)
    try:
        pyro.set_rng_seed(0)
        guide = AutoFlowGuide(schools.model)
        svi = SVI(schools.model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
        for _ in range(50):
            svi.step()
        guide.requires_grad_(False)
        potential, traced = warped_potential(schools.model, guide, jit_compile=jit)
        assert traced is jit
        reference = _reparam_potential(schools.model, guide)
        for _ in range(3):
            z = torch.randn(guide.latent_dim).requires_grad_()
            u = potential({"z": z})
            (g,) = torch.autograd.grad(u, z)
            z_ref = z.detach().clone().requires_grad_()  # a new tensor: no cached pairs
            u_ref = reference(z_ref)
            (g_ref,) = torch.autograd.grad(u_ref, z_ref)
            assert u.dtype == dtype and u.shape == ()
            tol = 1e-4 if dtype == torch.float32 else 1e-9
            assert torch.allclose(u, u_ref, rtol=tol), (u, u_ref)
            assert torch.allclose(g, g_ref, rtol=tol, atol=tol), (g, g_ref)
    finally:
        torch.set_default_dtype(torch.float32)


def _branching_model(threshold):
    def model():
        a = pyro.sample("a", pyro.distributions.Normal(0.0, 1.0))
        scale = 1.0 if float(a) > threshold else 3.0  # a branch torch.jit.trace would freeze
        pyro.sample("b", pyro.distributions.Normal(a, scale))

    return model


def test_warped_potential_falls_back_where_a_trace_would_be_wrong():
    """A model whose Python control flow depends on a latent value cannot be traced: the
    check points see the difference (unless all of them fall on the traced branch, 1 in 16
    here), jit_compile=None then runs eager, right on both branches; jit_compile=True
    refuses."""
    from pyro_flows_ext.infer.neutra import warped_potential

    model = _branching_model(0.0)
    guide = AutoFlowGuide(model, init_scale=1.0)  # a = z_0: the check points straddle 0
    guide()
    guide.requires_grad_(False)
    reference = _reparam_potential(model, guide)
    fallbacks = 0
    for seed in range(10):
        pyro.set_rng_seed(seed)
        potential, traced = warped_potential(model, guide)
        fallbacks += not traced
        if not traced:
            for z in (torch.tensor([1.0, 0.3]), torch.tensor([-1.0, 0.3])):
                assert torch.allclose(potential({"z": z}), reference(z))
    assert fallbacks >= 7, fallbacks
    with pytest.raises(ValueError, match="jit_compile=True, but tracing the potential failed"):
        for seed in range(10):
            pyro.set_rng_seed(seed)
            warped_potential(model, guide, jit_compile=True)


def test_neutra_rechecks_the_trace_on_its_draws():
    """A branch the check points never reach (an untrained guide of scale 0.1 puts them at
    |a| < 0.5; the model branches at a = 1) but the chains do: neutra_mcmc finds the trace
    wrong at its draws, says so and reruns eager, so the draws still follow the model."""
    model = _branching_model(1.0)
    guide = AutoFlowGuide(model)  # init_scale 0.1: the posterior is 10 base sds wide
    guide()
    with pytest.warns(DiagnosticWarning, match="traced potential differs .* rerunning"):
        result = neutra_mcmc(model, guide, num_samples=300, warmup_steps=200, seed=0,
                             check_guide=False)
    a = result.samples["a"]
    # exact marginal of a: N(0, 1) (b is integrated out whatever its scale)
    assert scipy.stats.kstest(a.numpy(), scipy.stats.norm(0, 1).cdf).pvalue > 1e-3


@pytest.mark.parametrize("make", [pyro.infer.autoguide.AutoMultivariateNormal,
                                  lambda m: pyro.infer.autoguide.AutoIAFNormal(m)])
def test_neutra_with_pyro_autoguides(make):
    """Pyro's own AutoContinuous guides (a Cholesky affine, an IAF) warp the potential too:
    the draws match the exact Gaussian posterior of a regression."""
    model, guide, x, y, mu, cov = regression_guide(make, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DiagnosticWarning)
        result = neutra_mcmc(model, guide, x, y, num_samples=800, warmup_steps=200, seed=0,
                             max_tree_depth=5)
    w = result.samples["w"]
    sd = cov.diagonal().sqrt()
    assert w.shape == (1600, 2)
    assert ((w.mean(0) - mu).abs() < 4 * sd / 100 ** 0.5).all(), (w.mean(0), mu)
    assert ((w.std(0) / sd - 1).abs() < 0.25).all(), (w.std(0), sd)
