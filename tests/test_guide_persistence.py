"""pfe.save / pfe.load of an AutoFlowGuide, the README's guide example, guide.median, and
mass-covering objectives (RenyiELBO, importance weighting) with a flow guide."""

import math
import os
import re
import subprocess
import sys
import textwrap
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, RenyiELBO, Trace_ELBO
from pyro.infer.importance import vectorized_importance_weights

import pyro_flows_ext as pfe
from pyro_flows_ext.infer import AutoFlowGuide
from tests.test_diagnostics import regression_data
from tests.test_guide import make_regression

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def trained(model, guide, steps, *args):
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    for _ in range(steps):
        svi.step(*args)
    return guide


# the model file the fresh process imports: data as model arguments, a constrained site
MODEL = """
import pyro, pyro.distributions as dist, torch

def model(x, y, scale=1.0):
    w = pyro.sample("w", dist.Normal(torch.zeros(2), scale).to_event(1))
    s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", len(x)):
        pyro.sample("y", dist.Normal((x * w.unsqueeze(-2)).sum(-1), s), obs=y)
"""


def test_save_load_in_a_fresh_process(tmp_path):
    """Three guides (spline, affine, site couplings only) saved here and loaded in a new
    Python process with only the model: the same log_prob of the guides' samples."""
    (tmp_path / "m.py").write_text(MODEL)
    sys.path.insert(0, str(tmp_path))
    try:
        import m
    finally:
        sys.path.remove(str(tmp_path))
    sys.modules.pop("m", None)
    x = torch.randn(15, 2)
    y = x @ torch.tensor([1.0, -0.5]) + 0.3 * torch.randn(15)
    flows = {"nsf": "nsf", "realnvp": "realnvp", "none": ()}
    expected, medians = {}, {}
    for name, flow in flows.items():
        guide = trained(m.model, AutoFlowGuide(m.model, flow=flow), 10, x, y, 2.0)
        z = guide.get_posterior().sample((50,))
        torch.save(z, tmp_path / f"z_{name}.pt")
        pfe.save(guide, tmp_path / f"{name}.pt")
        expected[name] = guide.get_posterior().log_prob(z).detach()
        medians[name] = guide.median()["s"].item()
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(tmp_path)!r})
        import pyro_flows_ext as pfe
        from m import model
        for name in {list(flows)!r}:
            guide = pfe.load({str(tmp_path)!r} + f"/{{name}}.pt", model=model)  # no guide()
            z = torch.load({str(tmp_path)!r} + f"/z_{{name}}.pt")
            lp = guide.get_posterior().log_prob(z).detach()
            torch.save(lp, {str(tmp_path)!r} + f"/lp_{{name}}.pt")
            print(name, guide.median()["s"].item())
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    printed = dict(line.split() for line in done.stdout.splitlines())
    for name in flows:
        torch.testing.assert_close(torch.load(tmp_path / f"lp_{name}.pt"), expected[name])
        assert math.isclose(float(printed[name]), medians[name], rel_tol=1e-5)


def test_load_checks_the_model_and_keeps_the_rng(tmp_path):
    model, x, y, *_ = regression_data(n=20, dtype=torch.float32)
    guide = trained(model, AutoFlowGuide(model, flow="realnvp", num_layers=2), 5, x, y)
    path = tmp_path / "g.pt"
    pfe.save(guide, path)
    rng = torch.get_rng_state()
    restored = pfe.load(path, model=model)
    assert torch.equal(torch.get_rng_state(), rng)  # the prototype trace drew under a fork
    assert len(restored.flow.transforms) == len(guide.flow.transforms)
    assert restored._flow_kwargs == {"num_layers": 2} and restored.latent_dim == 2
    # other data of the same shapes: fine; another latent structure: a clear error
    restored = pfe.load(path, model=model, model_args=(x[:10], y[:10]))
    torch.testing.assert_close(restored.median()["w"], guide.median()["w"])

    def other(x, y):
        pyro.sample("w", dist.Normal(torch.zeros(3), 1.0).to_event(1))

    with pytest.raises(ValueError, match=r"latent sites w \(2,\).*this model has w \(3,\)"):
        pfe.load(path, model=other)
    with pytest.raises(ValueError, match="pass the model it was trained for"):
        pfe.load(path)
    with pytest.raises(ValueError, match="failed to run with the given model arguments"):
        pfe.load(path, model=model, model_args=())
    # without stored arguments the caller passes them
    pfe.save(guide, path, store_model_args=False)
    with pytest.raises(ValueError, match="failed to run with the given model arguments"):
        pfe.load(path, model=model)
    restored = pfe.load(path, model=model, model_args=(x,), model_kwargs={"y": y})
    torch.testing.assert_close(restored.median()["w"], guide.median()["w"])


def test_custom_flow_needs_flow_on_load(tmp_path):
    model, mu, *_ = make_regression(dtype=torch.float32)  # arguments default: none stored

    def flow(d):
        return [pfe.transforms.AffineCoupling(d)]

    guide = trained(model, AutoFlowGuide(model, flow=flow), 5)
    path = tmp_path / "g.pt"
    pfe.save(guide, path)
    with pytest.raises(ValueError, match="user callable or list of transforms.*flow=\\.\\.\\."):
        pfe.load(path, model=model)
    restored = pfe.load(path, model=model, flow=flow)
    u = torch.randn(4, 3)
    with torch.no_grad():
        torch.testing.assert_close(restored.get_transform()(u), guide.get_transform()(u))
    # the density flows' behaviour is unchanged: a flow file refuses guide options
    pfe.save(pfe.flows.realnvp(2), tmp_path / "f.pt")
    assert isinstance(pfe.load(tmp_path / "f.pt"), pfe.Flow)
    with pytest.raises(TypeError, match="holds a flow, not a guide"):
        pfe.load(tmp_path / "f.pt", model=model)
    with pytest.raises(ValueError, match="not AutoNormal"):
        auto = pyro.infer.autoguide.AutoNormal(model)
        auto()
        pfe.save(auto, tmp_path / "a.pt")


def test_unstorable_model_args_warn_on_save(tmp_path):
    def model(data):
        w = pyro.sample("w", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.sample("y", dist.Normal(w.sum(-1), 1.0), obs=data["y"])

    class Data(dict):
        pass

    guide = AutoFlowGuide(model, flow=())
    guide(Data(y=torch.tensor(0.5)))
    with pytest.warns(UserWarning, match="were not stored"):
        pfe.save(guide, tmp_path / "g.pt")
    restored = pfe.load(tmp_path / "g.pt", model=model,
                        model_args=({"y": torch.tensor(0.5)},))
    assert restored.latent_dim == 2


def test_median_is_deterministic_and_leaves_the_rng_alone():
    model, mu, *_ = make_regression(dtype=torch.float32)
    guide = trained(model, AutoFlowGuide(model), 30)
    rng = torch.get_rng_state()
    first, second = guide.median(), guide.median()
    assert torch.equal(first["w"], second["w"])
    assert torch.equal(torch.get_rng_state(), rng)
    # it is the flow's image of the base median, pushed through every layer
    with torch.no_grad():
        torch.testing.assert_close(first["w"], guide.get_transform()(torch.zeros(3)))
    # with an element-wise monotone flow (LocScale only) it is each coordinate's median
    g = AutoFlowGuide(model, flow=(), structured=False)
    g()
    torch.testing.assert_close(g.median()["w"], g.loc_scale.loc.detach())
    q = g.quantiles([0.5], num_samples=20_000)["w"][0]
    assert ((q - g.median()["w"]).abs() < 0.01).all()

    def constrained():
        pyro.sample("s", dist.LogNormal(0.0, 1.0).expand([2]).to_event(1))

    g = AutoFlowGuide(constrained, flow=())
    g()
    assert (g.median()["s"] > 0).all()


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_renyi_elbo_with_a_flow_guide(alpha):
    """RenyiELBO (alpha = 0: the importance-weighted bound) with vectorised particles trains a
    flow guide: finite losses, and the guide ends near the exact evidence."""
    model, mu, cov, log_z = make_regression(dtype=torch.float32)
    guide = AutoFlowGuide(model, flow="realnvp", stl=False)  # RenyiELBO needs the full gradient
    svi = SVI(model, guide, pyro.optim.ClippedAdam({"lr": 2e-2}),
              RenyiELBO(alpha=alpha, num_particles=8, vectorize_particles=True))
    losses = [svi.step() for _ in range(60)]
    assert all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-10:]) < sum(losses[:10])
    from pyro_flows_ext.diagnostics import log_evidence

    est = log_evidence(model, guide, num_samples=300)
    assert math.isfinite(est["log_evidence"]) and abs(est["log_evidence"] - log_z) < 2.0


def test_importance_weighted_objective_with_a_flow_guide():
    """The IWAE bound log mean_k w_k from Pyro's vectorised importance weights, optimised
    directly: gradients reach every guide parameter and the bound stays finite."""
    model, mu, cov, log_z = make_regression(dtype=torch.float32)
    guide = AutoFlowGuide(model, flow="realnvp")
    guide()
    optim = torch.optim.Adam(guide.parameters(), lr=2e-2)
    bounds = []
    for _ in range(40):
        log_w = vectorized_importance_weights(model, guide, num_samples=8,
                                              max_plate_nesting=1)[0]
        bound = torch.logsumexp(log_w, 0) - math.log(8)
        optim.zero_grad()
        (-bound).backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all()
                   for p in guide.parameters())
        optim.step()
        bounds.append(float(bound.detach()))
    assert all(math.isfinite(b) for b in bounds)
    assert max(bounds[-5:]) < log_z + 1.0 and sum(bounds[-5:]) > sum(bounds[:5])


def readme_guide_example():
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split("## Flows as guides, NeuTra and diagnostics", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_guide_example_runs(tmp_path, monkeypatch):
    """The README's guide snippet as written, with short runs (each substitution must match
    exactly once, so the test follows the README)."""
    code = readme_guide_example()
    for old, new in [("range(2000)", "range(30)"),
                     ("num_samples=1000, warmup_steps=500)",
                      "num_samples=20, warmup_steps=20, max_tree_depth=4)")]:
        assert code.count(old) == 1, old
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    with warnings.catch_warnings():
        from pyro_flows_ext.diagnostics import DiagnosticWarning

        warnings.simplefilter("ignore", DiagnosticWarning)  # 20 draws: small ESS, by design
        exec(compile(code, "README.md", "exec"), namespace)
    assert (tmp_path / "guide.pt").exists()
    assert set(namespace["result"].samples) == {"slope", "intercept", "noise"}
    assert isinstance(namespace["guide"], AutoFlowGuide)


def test_renyi_elbo_with_sticking_the_landing_warns():
    """RenyiELBO's gradient is biased under sticking the landing: the default (STL) guide says
    so once; stl=False and Trace_ELBO stay quiet."""
    import warnings as _warnings

    from pyro.infer import SVI, RenyiELBO, Trace_ELBO

    def model():
        pyro.sample("a", pyro.distributions.Normal(0.0, 1.0))
        pyro.sample("b", pyro.distributions.Normal(0.0, 2.0))

    def steps(guide, loss, n=3):
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), loss)
        with _warnings.catch_warnings(record=True) as caught:
            _warnings.simplefilter("always")
            for _ in range(n):
                svi.step()
        return [str(w.message) for w in caught if "RenyiELBO" in str(w.message)]

    renyi = RenyiELBO(alpha=0.5, num_particles=4, vectorize_particles=True)
    said = steps(AutoFlowGuide(model), renyi)
    assert len(said) == 1 and "stl=False" in said[0] and "iw_dreg_loss" in said[0]
    assert steps(AutoFlowGuide(model, stl=False), renyi) == []
    assert steps(AutoFlowGuide(model), Trace_ELBO()) == []
