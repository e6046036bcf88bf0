"""AutoFlowGuide: exact posterior and evidence on a conjugate model, Pyro integration."""

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import init_to_value

import pyro_flows_ext as pfe
from pyro_flows_ext.infer import AutoFlowGuide
from pyro_flows_ext.infer.guide import LocScale


def make_regression(n=20, d=3, noise=0.5, prior=1.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=dtype)[:d] + noise * torch.randn(
        n, generator=g, dtype=dtype)

    def model(x=x, y=y, subsample_size=None):
        w = pyro.sample("w", dist.Normal(torch.zeros(d, dtype=dtype), prior).to_event(1))
        with pyro.plate("data", len(x), subsample_size=subsample_size) as idx:
            # broadcasts over a leftmost particle dimension (vectorized diagnostics)
            pyro.sample("y", dist.Normal((x[idx] * w).sum(-1), noise), obs=y[idx])

    # exact posterior N(mu, cov) and evidence y ~ N(0, prior^2 X X^T + noise^2 I),
    # computed independently of Pyro
    prec = torch.eye(d, dtype=dtype) / prior**2 + x.T @ x / noise**2
    cov = torch.linalg.inv(prec)
    mu = cov @ x.T @ y / noise**2
    marg = prior**2 * x @ x.T + noise**2 * torch.eye(n, dtype=dtype)
    log_z = torch.distributions.MultivariateNormal(torch.zeros(n, dtype=dtype), marg).log_prob(y)
    return model, mu, cov, float(log_z)


def fit(model, guide, steps, lr=3e-2, particles=1, **kwargs):
    optim = pyro.optim.ClippedAdam({"lr": lr, "lrd": 0.01 ** (1 / steps)})
    svi = SVI(model, guide, optim, Trace_ELBO(particles, vectorize_particles=particles > 1))
    for _ in range(steps):
        loss = svi.step(**kwargs)
        assert math.isfinite(loss)
    return guide


def check_conjugate(steps, lr, mean_tol, cov_tol, elbo_tol, particles=4):
    model, mu, cov, log_z = make_regression()
    guide = fit(model, AutoFlowGuide(model, flow="realnvp"), steps, lr, particles)
    with torch.no_grad():
        w = guide.get_posterior().sample((20_000,))
    assert w.dtype == torch.float64
    sd = cov.diagonal().sqrt()  # ~0.1; tolerances are in posterior standard deviations
    assert ((w.mean(0) - mu).abs() / sd).max() < mean_tol, (w.mean(0), mu)
    assert ((torch.cov(w.T) - cov).abs() / sd.outer(sd)).max() < cov_tol, (torch.cov(w.T), cov)
    from pyro_flows_ext.diagnostics import log_evidence

    est = log_evidence(model, guide, num_samples=4000)
    assert est["elbo"] <= log_z + 4 * est["elbo_se"]
    assert log_z - est["elbo"] < elbo_tol, (est, log_z)
    assert abs(est["log_evidence"] - log_z) < elbo_tol


def test_conjugate_regression_exact():
    # about 10 s on one thread, so it stays in the default suite
    check_conjugate(1500, 0.01, mean_tol=0.3, cov_tol=0.15, elbo_tol=0.1)


def test_init_near_prior_and_init_loc_fn():
    model, *_ = make_regression(dtype=torch.float32)
    loc = torch.tensor([0.3, -0.2, 0.1])
    guide = AutoFlowGuide(model, init_loc_fn=init_to_value(values={"w": loc}), init_scale=0.01)
    with torch.no_grad():
        w = guide.get_posterior().sample((2000,))
    assert torch.allclose(w.mean(0), loc, atol=0.01)
    assert torch.allclose(w.std(0), torch.full((3,), 0.01), rtol=0.2)


def test_score_own_sample_never_inverts(monkeypatch):
    model, *_ = make_regression(dtype=torch.float32)
    guide = AutoFlowGuide(model, stl=False)
    guide()
    for t in guide.flow.transforms:
        monkeypatch.setattr(t, "inverse_and_ladj", lambda *a: pytest.fail("inverted"))
    loss = Trace_ELBO().differentiable_loss(model, guide)
    loss.backward()
    assert all(p.grad is not None for p in guide.parameters())


def test_callable_flow_predictive_quantiles_median():
    model, mu, *_ = make_regression(dtype=torch.float32)
    guide = AutoFlowGuide(model, flow=lambda d: [pfe.transforms.AffineCoupling(d)])
    fit(model, guide, 300, lr=3e-2)
    pred = Predictive(model, guide=guide, num_samples=50)()
    assert pred["w"].squeeze(1).shape == (50, 3) and pred["y"].shape == (50, 20)
    q = guide.quantiles([0.1, 0.5, 0.9])
    assert q["w"].shape == (3, 3) and (q["w"][0] < q["w"][2]).all()
    assert torch.allclose(guide.median()["w"], mu.float(), atol=0.15)
    assert isinstance(guide.get_posterior(), pfe.Flow)


def test_plate_subsampling():
    model, mu, *_ = make_regression(dtype=torch.float32)
    # lr 5e-2: the default guide's one shift is LocScale's loc, which Adam moves by at most
    # ~lr a step, and the decayed schedule of fit() at 2e-2 travels only ~1.3 in 300 steps
    guide = fit(model, AutoFlowGuide(model), 300, lr=5e-2, subsample_size=10)
    assert torch.allclose(guide.median()["w"], mu.float(), atol=0.3)


def test_float64_and_to():
    model, *_ = make_regression(dtype=torch.float64)
    guide = AutoFlowGuide(model)
    guide()
    assert all(p.dtype == torch.float64 for p in guide.parameters())
    guide.to(torch.float32).to(torch.float64)
    assert guide.get_posterior().sample((2,)).dtype == torch.float64


def test_constrained_sites_and_one_dim():
    def model():
        s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
        pyro.sample("obs", dist.Normal(0.0, s).expand([2]).to_event(1),
                    obs=torch.tensor([0.5, -1.0]))

    with pytest.warns(UserWarning, match="one latent dimension"):
        guide = fit(model, AutoFlowGuide(model, flow="nsf"), 50)
    assert (guide.quantiles([0.05])["s"] > 0).all()
    with warnings.catch_warnings():  # the default has no builder layers to drop: no warning
        warnings.simplefilter("error")
        guide = fit(model, AutoFlowGuide(model), 50)
    assert (guide.quantiles([0.05])["s"] > 0).all()


@pytest.mark.parametrize("flow", sorted(n for n, b in pfe.flows.FLOWS.items()
                                        if not getattr(b, "image", False)))
def test_every_builder_trains(flow):
    model, *_ = make_regression(dtype=torch.float32)
    fit(model, AutoFlowGuide(model, flow=flow), 20)


def test_bad_arguments():
    model, *_ = make_regression()
    with pytest.raises(ValueError, match="unknown flow 'nope'"):
        AutoFlowGuide(model, flow="nope")
    with pytest.raises(TypeError, match="builder name or a callable"):
        AutoFlowGuide(model, flow=3)
    with pytest.raises(ValueError, match="init_scale"):
        AutoFlowGuide(model, init_scale=0.0)


def test_locscale_jacobian():
    from tests.contract import check_bijection

    layer = LocScale(3, torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.5, 2.0, 30.0]))
    check_bijection(layer, (3,))
    assert torch.allclose(layer.scale.float(), torch.tensor([0.5, 2.0, 30.0]), rtol=1e-5)


def gaussian_model(loc, scale):
    def model():
        pyro.sample("a", dist.Normal(loc[0], scale[0]))
        pyro.sample("b", dist.Normal(loc[1:], scale[1:]).to_event(1))
    return model


def loss_grads(model, guide, particles=1):
    for p in guide.parameters():
        p.grad = None
    elbo = Trace_ELBO(particles, vectorize_particles=particles > 1)
    loss = elbo.differentiable_loss(model, guide)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in guide.parameters()])


@pytest.mark.parametrize("stl", [True, False])
def test_sticking_the_landing_is_noise_free_at_the_posterior(stl):
    # q = p exactly: every single-sample STL gradient is zero; the standard one is not
    loc = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    scale = torch.tensor([0.3, 2.0, 0.7], dtype=torch.float64)
    model = gaussian_model(loc, scale)
    guide = AutoFlowGuide(model, flow=lambda d: [], structured=False, stl=stl,
                          init_loc_fn=init_to_value(values={"a": loc[0], "b": loc[1:]}))
    guide()
    with torch.no_grad():
        s = scale - 1e-6
        guide.loc_scale.raw_scale.copy_(torch.expm1(s).log())
    grads = torch.stack([loss_grads(model, guide) for _ in range(5)])
    if stl:
        assert grads.abs().max() < 1e-9
    else:
        assert grads.abs().max() > 1e-2


def test_sticking_the_landing_is_unbiased():
    # away from the optimum the STL and the standard gradient estimate the same expectation
    loc = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    scale = torch.tensor([0.3, 2.0, 0.7], dtype=torch.float64)
    model = gaussian_model(loc, scale)
    means = []
    for stl in (True, False):
        pyro.set_rng_seed(1)
        guide = AutoFlowGuide(model, flow=lambda d: [pfe.transforms.AffineCoupling(d)],
                              stl=stl, init_scale=0.5, clip=False)  # the raw estimators
        guide()
        with torch.no_grad():
            for p in guide.parameters():
                p.add_(0.1 * torch.randn_like(p))  # a generic, non-identity coupling
        pyro.set_rng_seed(2)
        means.append(loss_grads(model, guide, particles=20000))
    stl_grad, plain_grad = means
    assert torch.allclose(stl_grad, plain_grad, atol=0.03 + 0.03 * plain_grad.abs().max())
    assert plain_grad.abs().max() > 0.3  # the check has something to compare


def test_stl_chosen_from_layers_and_warns_for_unsuited_layers():
    model = gaussian_model(torch.zeros(3), torch.ones(3))
    guide = AutoFlowGuide(model)  # affine layers only: STL, with clipped gradients
    guide()
    assert guide.stl is True and guide._clip == pfe.infer.guide.STL_CLIP
    for flow in ("nsf", "iaf", "residual_flow"):  # splines, IAF, iterative inverses: off
        guide = AutoFlowGuide(model, flow=flow)
        guide()
        assert guide.stl is False and guide._clip is False
    for flow in ("nsf", "iaf"):
        with pytest.warns(UserWarning, match="stl=True"):
            AutoFlowGuide(model, flow=flow, stl=True)()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        guide = AutoFlowGuide(model, flow="realnvp", stl=True)
        guide()
    assert guide.stl


def test_site_couplings_follow_model_order():
    from pyro_flows_ext.infer.guide import site_couplings

    layers = site_couplings([1, 2, 3])
    assert [t.mask.tolist() for t in layers] == [[True] + [False] * 5,
                                                 [True] * 3 + [False] * 3]
    assert site_couplings([4]) == []
    assert len(site_couplings([1] * 30, max_layers=8)) == 8
    model = gaussian_model(torch.zeros(3), torch.ones(3))
    guide = AutoFlowGuide(model, flow=lambda d: [])
    guide()
    assert len(guide.flow.transforms) == 2 and guide.flow.transforms[0].mask.tolist() == [
        True, False, False]
    assert len(AutoFlowGuide(model, flow=lambda d: [], structured=False)
               .get_posterior().transforms) == 1
    assert len(AutoFlowGuide(model, flow=()).get_posterior().transforms) == 2
    with pytest.raises(TypeError, match="transforms"):
        AutoFlowGuide(model, flow=[torch.nn.Linear(3, 3)])
    with pytest.raises(TypeError, match="flow_kwargs"):
        AutoFlowGuide(model, flow=(), num_layers=2)


def test_state_dict_round_trip_and_pfe_save(tmp_path):
    model, *_ = make_regression(dtype=torch.float32)
    guide = fit(model, AutoFlowGuide(model), 50, lr=2e-2)
    path = tmp_path / "guide.pt"
    torch.save(guide.state_dict(), path)
    restored = AutoFlowGuide(model)
    restored()
    restored.load_state_dict(torch.load(path))
    u = torch.randn(5, 3)
    with torch.no_grad():
        assert torch.equal(guide.get_transform()(u), restored.get_transform()(u))
    pfe.save(guide, tmp_path / "x.pt")  # and without tracing: tests/test_guide_persistence.py
    with torch.no_grad():
        assert torch.equal(pfe.load(tmp_path / "x.pt", model=model).get_transform()(u),
                           guide.get_transform()(u))


def test_readouts_scaled_so_first_adam_steps_do_not_compound():
    # Adam's first step moves every readout weight by ~lr; with H hidden units the coupling
    # outputs (log-scales, shifts) then move by ~lr * H * E|h| unless the readout is scaled
    model, *_ = make_regression(dtype=torch.float32)

    def output_after_one_step(**flow_kwargs):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = AutoFlowGuide(model, flow="realnvp", **flow_kwargs)
        SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO()).step()
        nets = [m for m in guide.modules() if isinstance(m, pfe.nn.MLP)]
        with torch.no_grad():
            return nets, max(net(torch.randn(256, net.shapes[0][1])).abs().max().item()
                             for net in nets)

    nets, moved = output_after_one_step()
    assert nets and all(m.readout_scale == 1 / m.shapes[-1][1] for m in nets)
    assert all(float(m.readout) == m.readout_scale for m in nets)  # saved in the state_dict
    _, moved_unscaled = output_after_one_step(readout_scale=1.0)
    assert moved < 0.05 < 0.2 < moved_unscaled, (moved, moved_unscaled)
    coupling = next(t for t in pfe.flows.realnvp(4).transforms if hasattr(t, "net"))
    assert coupling.net.readout_scale == 1.0  # density flows: as is


def correlated_logistic(n=100, d=6, rho=0.9):
    """Logistic regression on features with pairwise correlation ``rho``: the posterior's
    weights are strongly (negatively) correlated, which a diagonal guide cannot represent."""
    g = torch.Generator().manual_seed(3)
    cov = torch.full((d, d), rho) + (1 - rho) * torch.eye(d)
    x = torch.randn(n, d, generator=g) @ torch.linalg.cholesky(cov).T
    w_true = torch.linspace(-1.0, 1.0, d)
    y = torch.bernoulli(torch.sigmoid(x @ w_true), generator=g)

    def model():
        w = pyro.sample("w", dist.Normal(torch.zeros(d), 1.0).to_event(1))
        with pyro.plate("data", n):
            # w: (*particles, 1, d) under an outer particle plate
            pyro.sample("y", dist.Bernoulli(logits=(x * w).sum(-1)), obs=y)
    return model


def test_default_guide_not_below_automvn_on_correlated_logistic():
    # the plain loop (Adam 1e-2, 1 particle), same steps for both guides; ELBOs from
    # 2000 fresh draws each
    from pyro.infer.autoguide import AutoMultivariateNormal

    from pyro_flows_ext.diagnostics import log_evidence

    model = correlated_logistic()
    est = {}
    for name, make in (("flow", AutoFlowGuide), ("mvn", AutoMultivariateNormal)):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = make(model)
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
        for _ in range(800):
            assert math.isfinite(svi.step())
        est[name] = log_evidence(model, guide, num_samples=2000)
        if name == "mvn":  # an IW estimate of log p(y) from independent draws
            est["iw"] = log_evidence(model, guide, num_samples=8000)
    flow, mvn, iw = est["flow"], est["mvn"], est["iw"]
    noise = 3 * math.hypot(flow["elbo_se"], mvn["elbo_se"])
    assert flow["elbo"] >= mvn["elbo"] - noise - 0.02, (flow, mvn)
    # the ELBO is below log p(y): above the IW estimate (a lower bound of it) only by noise
    assert flow["elbo"] <= iw["log_evidence"] + 3 * (flow["elbo_se"] + iw["log_evidence_se"])
    assert iw["khat"] < 0.7  # the upper reference is itself trustworthy


def test_clip_bounds_every_gradient_element_and_survives_copies():
    import copy

    model, *_ = make_regression(dtype=torch.float64)
    guide = AutoFlowGuide(model, init_scale=1e-3)  # far from the posterior: large gradients
    guide()
    assert guide._clip == pfe.infer.guide.STL_CLIP
    for g in (guide, copy.deepcopy(guide)):  # a copy hooks its own tensors on first use
        grads = loss_grads(model, g)
        assert grads.abs().max() <= g._clip
    free = AutoFlowGuide(model, init_scale=1e-3, clip=False)
    free()
    assert loss_grads(model, free).abs().max() > 10 * pfe.infer.guide.STL_CLIP
    with pytest.raises(ValueError, match="clip must be"):
        AutoFlowGuide(model, clip=-1.0)


def test_file_from_before_full_rank_and_clip_rebuilds_that_guide(tmp_path):
    # a record written before full_rank/clip existed has neither key: it held a diagonal
    # LocScale and no clipping, and must rebuild as such (GUIDE_LEGACY_ARGS)
    from pyro_flows_ext.io import to_record

    model, *_ = make_regression(dtype=torch.float32)
    old = AutoFlowGuide(model, flow="nsf", stl=False, full_rank=False, clip=False)
    fit(model, old, 20)
    record = to_record(old)
    for key in ("full_rank", "clip"):
        del record["guide_args"][key]
    torch.save(record, tmp_path / "old.pt")
    loaded = pfe.load(tmp_path / "old.pt", model=model)
    assert not loaded.loc_scale.full_rank and loaded._clip is False and not loaded.stl
    with torch.no_grad():
        x = old.get_posterior().sample((5,))
        assert torch.allclose(loaded.get_posterior().log_prob(x), old.get_posterior().log_prob(x))
    new = fit(model, AutoFlowGuide(model), 20)  # and the new defaults round-trip
    pfe.save(new, tmp_path / "new.pt")
    again = pfe.load(tmp_path / "new.pt", model=model)
    assert again.loc_scale.full_rank and again.stl and again._clip == new._clip
    with torch.no_grad():
        x = new.get_posterior().sample((5,))
        assert torch.allclose(again.get_posterior().log_prob(x), new.get_posterior().log_prob(x))


def test_file_from_before_site_clamp_rebuilds_that_guide(tmp_path):
    # site couplings bound their log-scales at 10 now (a funnel's neck needs e^{-4.5} and
    # more); a record written before site_clamp existed used 5 and must rebuild with it
    from pyro_flows_ext.io import to_record

    def model():  # two sites: one site coupling
        v = pyro.sample("v", dist.Normal(0.0, 3.0))
        pyro.sample("x", dist.Normal(0.0, torch.exp(v / 2).unsqueeze(-1).expand(
            v.shape + (3,))).to_event(1))

    pyro.set_rng_seed(0)
    old = fit(model, AutoFlowGuide(model, site_clamp=5.0), 200)
    record = to_record(old)
    del record["guide_args"]["site_clamp"]
    torch.save(record, tmp_path / "old.pt")
    loaded = pfe.load(tmp_path / "old.pt", model=model)
    (coupling,) = [t for t in loaded.flow.transforms if hasattr(t, "clamp")]
    assert coupling.clamp == 5.0
    assert [t.clamp for t in AutoFlowGuide(model).get_posterior().transforms
            if hasattr(t, "clamp")] == [10.0]
    with torch.no_grad():
        x = old.get_posterior().sample((50,))
        assert torch.allclose(loaded.get_posterior().log_prob(x), old.get_posterior().log_prob(x))
        wrong = AutoFlowGuide(model)  # the same state under clamp 10 is another density
        wrong()
        wrong.load_state_dict(old.state_dict())
        assert not torch.allclose(wrong.get_posterior().log_prob(x),
                                  old.get_posterior().log_prob(x))
    with pytest.raises(ValueError, match="site_clamp must be a positive number"):
        AutoFlowGuide(model, site_clamp=0)


def two_site_regression():
    """make_regression's posterior with w = (a, b) split over two sites (prior 1, noise 0.5)."""
    base, mu, cov, log_z = make_regression()
    x, y, _ = base.__defaults__

    def model():
        a = pyro.sample("a", dist.Normal(torch.zeros(1, dtype=x.dtype), 1.0).to_event(1))
        b = pyro.sample("b", dist.Normal(torch.zeros(2, dtype=x.dtype), 1.0).to_event(1))
        with pyro.plate("data", len(x)):
            pyro.sample("y", dist.Normal((x * torch.cat([a, b], -1)).sum(-1), 0.5), obs=y)

    return model, mu, cov, log_z


def test_default_guide_trains_under_jit_trace_elbo():
    """Pyro's JitTrace_ELBO trains the default guide to the exact posterior; the regression's
    weights are split over two sites, so the site coupling is traced too."""
    from pyro.infer import JitTrace_ELBO

    from pyro_flows_ext.diagnostics import log_evidence

    model, mu, cov, log_z = two_site_regression()
    pyro.set_rng_seed(0)
    guide = AutoFlowGuide(model)
    optim = pyro.optim.ClippedAdam({"lr": 0.01, "lrd": 0.01 ** (1 / 1500)})
    # 4 vectorized particles, as check_conjugate (the gradients match eager ones: next test)
    svi = SVI(model, guide, optim, JitTrace_ELBO(4, vectorize_particles=True,
                                                 ignore_jit_warnings=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(1500):
            assert math.isfinite(svi.step())
    with torch.no_grad():
        draws = guide.get_posterior().sample((20_000,))
    sd = cov.diagonal().sqrt()
    assert ((draws.mean(0) - mu).abs() / sd).max() < 0.3, (draws.mean(0), mu)
    assert ((torch.cov(draws.T) - cov).abs() / sd.outer(sd)).max() < 0.15
    est = log_evidence(model, guide, num_samples=4000)
    assert est["elbo"] <= log_z + 4 * est["elbo_se"]
    assert log_z - est["elbo"] < 0.1, (est, log_z)


def test_jit_trace_elbo_gradients_equal_eager_ones():
    from pyro.infer import JitTrace_ELBO

    model = two_site_regression()[0]
    pyro.set_rng_seed(0)
    guide = AutoFlowGuide(model)
    guide()
    params = dict(guide.named_parameters())
    with torch.no_grad():  # away from the identity start, so every gradient is non-trivial
        for p in params.values():
            p.add_(0.1 * torch.randn_like(p))

    def grads(elbo, seed):
        for p in params.values():
            p.grad = None
        pyro.set_rng_seed(seed)
        loss = elbo.loss_and_grads(model, guide)
        return loss, [p.grad.clone() for p in params.values()]

    traced = JitTrace_ELBO(ignore_jit_warnings=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        grads(traced, 5)  # the first call traces
        for seed in (1, 2):
            (eager_loss, eager), (jit_loss, jit) = grads(Trace_ELBO(), seed), grads(traced, seed)
            assert eager_loss == pytest.approx(jit_loss, rel=1e-12)
            for e, j in zip(eager, jit):
                assert e.abs().max() > 0 and torch.allclose(e, j, rtol=1e-10, atol=1e-12)
