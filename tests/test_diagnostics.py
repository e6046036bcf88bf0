"""psis_khat, log_evidence and to_inference_data against closed forms."""

import arviz as az
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import MCMC, NUTS

from pyro_flows_ext import diagnostics
from pyro_flows_ext.infer import AutoFlowGuide
from tests.test_guide import make_regression


def fixed_guide(loc, cov):
    def guide(**kwargs):
        pyro.sample("w", dist.MultivariateNormal(loc, cov))

    return guide


def test_khat_and_evidence_exact_guide():
    model, mu, cov, log_z = make_regression()
    est = diagnostics.log_evidence(model, fixed_guide(mu, cov), num_samples=500)
    # q equals the posterior: every weight is p(y), so every estimate is exact
    assert abs(est["log_evidence"] - log_z) < 1e-6
    assert abs(est["elbo"] - log_z) < 1e-6
    assert abs(est["ess"] - 500) < 1e-3
    assert diagnostics.psis_khat(model, fixed_guide(mu, cov), num_samples=500) < 0.5


def test_khat_good_vs_too_narrow_guide():
    model, mu, cov, log_z = make_regression()
    wide = diagnostics.psis_khat(model, fixed_guide(mu, 1.3 * cov), num_samples=2000)
    narrow = diagnostics.psis_khat(model, fixed_guide(mu, 0.05 * cov), num_samples=2000)
    assert wide < 0.5
    assert narrow > 0.7
    # a wider-than-posterior proposal gives an importance estimate close to the truth
    est = diagnostics.log_evidence(model, fixed_guide(mu, 1.3 * cov), num_samples=4000)
    assert abs(est["log_evidence"] - log_z) < 0.05
    assert est["elbo"] < log_z


def test_sequential_fallback_for_unvectorizable_model():
    _, mu, cov, log_z = make_regression()
    g = torch.Generator().manual_seed(1)  # the same data as make_regression
    x = torch.randn(20, 3, generator=g, dtype=mu.dtype)
    y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=mu.dtype) + 0.5 * torch.randn(
        20, generator=g, dtype=mu.dtype)

    def model():  # x @ w needs a 1-D w: fails under a particle plate
        w = pyro.sample("w", dist.Normal(torch.zeros(3, dtype=mu.dtype), 1.0).to_event(1))
        pyro.sample("y", dist.Normal(x @ w, 0.5).to_event(1), obs=y)

    lw = diagnostics.log_importance_weights(model, fixed_guide(mu, cov), num_samples=20)
    assert lw.shape == (20,)
    torch.testing.assert_close(lw, torch.full_like(lw, log_z))


def test_to_inference_data_sources(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    model, mu, cov, _ = make_regression(dtype=torch.float32)
    mcmc = MCMC(NUTS(model), num_samples=20, warmup_steps=20, disable_progbar=True)
    mcmc.run()
    idata = diagnostics.to_inference_data(mcmc)
    assert idata.posterior["w"].shape == (1, 20, 3)
    assert set(az.summary(idata).index) == {"w[0]", "w[1]", "w[2]"}
    az.plot_trace(idata)

    guide = AutoFlowGuide(model)
    guide()
    idata = diagnostics.to_inference_data(None, model=model, guide=guide, num_samples=30)
    assert idata.posterior["w"].shape == (1, 30, 3)
    idata = diagnostics.to_inference_data({"a": torch.randn(40, 2)}, num_chains=2)
    assert idata.posterior["a"].shape == (2, 20, 2)
    assert diagnostics.to_inference_data(idata) is idata


def test_bad_input():
    model, mu, cov, _ = make_regression()
    with pytest.raises(ValueError, match="num_samples"):
        diagnostics.psis_khat(model, fixed_guide(mu, cov), num_samples=1)
    with pytest.raises(TypeError, match="MCMC, a dict"):
        diagnostics.to_inference_data([1, 2])
    with pytest.raises(ValueError, match="do not split"):
        diagnostics.to_inference_data({"a": torch.randn(5)}, num_chains=2)
    with pytest.raises(ValueError, match="model= and guide="):
        diagnostics.to_inference_data(None)


def regression_data(n=30, seed=5, dtype=torch.float64):
    """A model whose data are positional arguments, with the exact posterior and evidence for
    the data it is given (closed form, independent of Pyro)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g, dtype=dtype)
    y = x @ torch.tensor([0.7, -1.5], dtype=dtype) + 0.5 * torch.randn(n, generator=g,
                                                                       dtype=dtype)

    def model(x, y):
        w = pyro.sample("w", dist.Normal(torch.zeros(2, dtype=dtype), 1.0).to_event(1))
        with pyro.plate("data", len(x)):
            pyro.sample("y", dist.Normal((x * w.unsqueeze(-2)).sum(-1), 0.5), obs=y)

    cov = torch.linalg.inv(torch.eye(2, dtype=dtype) + x.T @ x / 0.25)
    mu = cov @ x.T @ y / 0.25
    marg = x @ x.T + 0.25 * torch.eye(n, dtype=dtype)
    log_z = torch.distributions.MultivariateNormal(torch.zeros(n, dtype=dtype), marg).log_prob(y)
    return model, x, y, mu, cov, float(log_z)


def positional_guide(loc, cov):
    def guide(x, y):
        pyro.sample("w", dist.MultivariateNormal(loc, cov))

    return guide


def test_model_with_positional_data():
    model, x, y, mu, cov, log_z = regression_data()
    guide = positional_guide(mu, cov)
    # the exact posterior as proposal: every weight is p(y | x), so the estimate is exact
    est = diagnostics.log_evidence(model, guide, x, y, num_samples=300)
    assert abs(est["log_evidence"] - log_z) < 1e-6 and abs(est["elbo"] - log_z) < 1e-6
    assert diagnostics.psis_khat(model, guide, x, y, num_samples=300) < 0.5
    # keyword data, and the sequential path (one trace per draw) get the same arguments
    lw = diagnostics.log_importance_weights(model, guide, x, y=y, num_samples=10)
    torch.testing.assert_close(lw, torch.full_like(lw, log_z))
    lw = diagnostics._sequential_log_weights(model, guide, 5, (x, y), {})
    torch.testing.assert_close(lw, torch.full_like(lw, log_z))
    # a different data set gives its own evidence: the data really reach the model
    other = regression_data(seed=6)
    est = diagnostics.log_evidence(model, positional_guide(*other[3:5]), *other[1:3],
                                   num_samples=50)
    assert abs(est["log_evidence"] - other[5]) < 1e-6 and abs(other[5] - log_z) > 1.0

    idata = diagnostics.to_inference_data(None, x, y, model=model, guide=guide, num_samples=25)
    assert idata.posterior["w"].shape == (1, 25, 2)


def test_options_passed_positionally_fail_clearly():
    model, x, y, mu, cov, _ = regression_data()
    guide = positional_guide(mu, cov)
    # the old calling convention: a count where the model's data go
    with pytest.raises(TypeError, match=r"log_evidence: the model cannot be called with "
                                        r"\(500\).*options are keyword-only"):
        diagnostics.log_evidence(model, guide, 500)
    with pytest.raises(TypeError, match=r"psis_khat: .*\(<tensor \(30, 2\)>, <tensor \(30,\)>, "
                                        r"1000\)"):
        diagnostics.psis_khat(model, guide, x, y, 1000)
    with pytest.raises(TypeError, match="psis_khat: .*unexpected keyword argument 'num_sample'"):
        diagnostics.psis_khat(model, guide, x, y, num_sample=100)  # a typo is no model argument
    with pytest.raises(TypeError, match="only used with source=None.*keyword-only"):
        diagnostics.to_inference_data({"a": torch.randn(40, 2)}, 2)
    with pytest.raises(TypeError, match="to_inference_data: the model cannot be called"):
        diagnostics.to_inference_data(None, x, model=model, guide=guide, num_samples=5)
    with pytest.raises(ValueError, match="num_chains must be a positive integer"):
        diagnostics.to_inference_data({"a": torch.randn(40, 2)}, num_chains=0)


def synthetic_idata(chains=2, draws=400, seed=0, shift=0.0, rho=0.0, diverging=0):
    """``a`` (2 coordinates) and ``b``: iid N(0, 1) draws, chain c shifted by ``c * shift``,
    ``b`` an AR(1) chain with autocorrelation ``rho``; ``diverging`` draws marked divergent."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(chains, draws, 2, generator=g) + shift * torch.arange(chains).view(-1, 1, 1)
    noise = torch.randn(chains, draws, generator=g)
    b = torch.zeros(chains, draws)
    for t in range(draws):
        b[:, t] = (rho * b[:, t - 1] if t else 0) + (1 - rho**2) ** 0.5 * noise[:, t]
    idata = az.from_dict(posterior={"a": a.numpy(), "b": b.numpy()})
    div = torch.zeros(chains * draws, dtype=torch.bool)
    div[:diverging] = True
    idata.add_groups(sample_stats={"diverging": div.reshape(chains, draws).numpy()})
    return idata


def test_mcmc_warnings_quiet_on_clean_draws():
    assert diagnostics.mcmc_warnings(synthetic_idata()) == []
    assert diagnostics.mcmc_warnings(synthetic_idata(diverging=8)) == []  # exactly 1%: fine


def test_mcmc_warnings_name_the_problem_and_the_worst_sites():
    (line,) = diagnostics.mcmc_warnings(synthetic_idata(diverging=9))
    assert line.startswith("9 of 800 draws (1.1%) are divergent")
    lines = diagnostics.mcmc_warnings(synthetic_idata(rho=0.97))
    line = next(line for line in lines if line.startswith("effective sample size"))
    assert "below 100 per chain (200 for 2 chains)" in line
    assert "worst b (" in line and "a[" not in line
    assert all("a[" not in line for line in lines)  # a mixes well: never named
    lines = diagnostics.mcmc_warnings(synthetic_idata(shift=1.0))
    assert any(line.startswith("R-hat above 1.01: worst a[") for line in lines), lines
    assert "b " not in next(line for line in lines if line.startswith("R-hat"))
    assert "\n" not in "".join(lines)
    (line,) = diagnostics.mcmc_warnings(synthetic_idata(chains=1))
    assert line.startswith("one chain: R-hat cannot be computed")


def test_log_evidence_standard_error():
    model, mu, cov, log_z = make_regression()
    exact = diagnostics.log_evidence(model, fixed_guide(mu, cov), num_samples=200)
    assert exact["log_evidence_se"] < 1e-6  # equal weights: no error
    # a wider guide: the s.e. matches the spread of repeated estimates (delta method)
    runs = [diagnostics.log_evidence(model, fixed_guide(mu, 2.0 * cov), num_samples=400)
            for _ in range(30)]
    spread = torch.tensor([r["log_evidence"] for r in runs]).std()
    se = torch.tensor([r["log_evidence_se"] for r in runs]).median()
    assert 0.6 < float(se / spread) < 1.6, (se, spread)
    assert abs(torch.tensor([r["log_evidence"] for r in runs]).mean() - log_z) < 3 * se


def test_non_vectorizable_model_is_probed_before_the_full_vectorized_run(num_samples_spy):
    """A model that does not broadcast over the particle dimension (this regression's
    ``w.unsqueeze(-2)``) would build an (S, S, n) tensor in a vectorized run of S draws: a
    3-draw probe finds it and the weights come from one trace per draw, with the RNG stream
    of the draws untouched by the probe."""
    from pyro_flows_ext import diagnostics

    model, x, y, *_ = regression_data(n=30)
    guide = positional_guide(torch.zeros(2, dtype=torch.float64),
                             torch.eye(2, dtype=torch.float64))
    calls = num_samples_spy(diagnostics, "vectorized_importance_weights")
    torch.manual_seed(0)
    log_w = diagnostics.log_importance_weights(model, guide, x, y, num_samples=400)
    assert calls == [3] and log_w.shape == (400,)
    # the probe leaves the draws alone: the same seed gives the same weights
    torch.manual_seed(0)
    again = diagnostics.log_importance_weights(model, guide, x, y, num_samples=400)
    torch.testing.assert_close(again, log_w)
