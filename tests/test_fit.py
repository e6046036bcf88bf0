"""fit_density's protocol: Gaussian start, validation, optimizers, resume, bad inputs."""

import copy
import math

import pyro
import pyro.optim
import pytest
import torch

import pyro_flows_ext as pfe
from pyro_flows_ext.infer import density
from pyro_flows_ext.infer.density import (
    DegenerateData,
    SplineBoundWarning,
    TrainingDiverged,
    mean_nll,
)
from pyro_flows_ext.transforms import AffineCoupling, CholeskyAffine, Reverse, Standardize


def gaussian_logp(train, test):
    """Log-density of ``test`` under the maximum-likelihood full-covariance Gaussian of
    ``train`` (1/N covariance), computed with torch.distributions."""
    mean = train.mean(0)
    cov = (train - mean).T @ (train - mean) / len(train)
    return torch.distributions.MultivariateNormal(mean, cov).log_prob(test)


def gaussian_nll(train, test):
    return -gaussian_logp(train, test).mean().item()


def correlated(n, d, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=dtype)
    return torch.randn(n, d, generator=g, dtype=dtype) @ a.T * 3 + 10


def gaussian_start(d, hidden=(16,), couplings=2, dtype=torch.float64):
    layers = []
    for _ in range(couplings):
        layers += [AffineCoupling(d, hidden_dims=hidden), Reverse(d)]
    return pfe.Flow(None, layers + [CholeskyAffine(d), Standardize(d)]).to(dtype)


def test_step_zero_is_the_closed_form_gaussian_fit():
    x = correlated(600, 4)
    train, val = x[:400], x[400:]
    flow = gaussian_start(4)
    history = pfe.infer.fit_density(flow, train, val_data=val, num_steps=0, progress=False)
    assert history["val_step"] == [0] and history["best_step"] == 0
    assert sorted(history["initialized"]) == ["CholeskyAffine", "Standardize"]
    assert math.isclose(history["val_nll"][0], gaussian_nll(train, val), rel_tol=1e-9)
    assert math.isclose(mean_nll(flow, train), gaussian_nll(train, train), rel_tol=1e-9)


def sklearn_set(name):
    sklearn = pytest.importorskip("sklearn.datasets")
    x = torch.as_tensor(getattr(sklearn, f"load_{name}")().data, dtype=torch.float64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))
    n_test = len(x) // 5
    return x[perm[n_test:]], x[perm[:n_test]]


@pytest.mark.parametrize("name", ["wine", "iris"])
@pytest.mark.parametrize("builder", ["realnvp", "nsf", "maf"])
def test_small_real_data_never_worse_than_the_gaussian(name, builder):
    train, test = sklearn_set(name)  # raw units (wine's proline is in the thousands)
    flow = pfe.flows.FLOWS[builder](train.shape[1], num_layers=2, hidden_dims=(32,),
                                    standardize=True).double()
    history = pfe.infer.fit_density(flow, train, num_steps=100, progress=False)
    gaussian = -gaussian_logp(train, test)  # the one-line fit, on all the training rows
    diff = (-flow.log_prob(test).detach()) - gaussian
    se = diff.std().item() / math.sqrt(len(diff))
    assert history["n_val"] == 50 and history["val_step"][0] == 0
    assert history["best_val_nll"] <= history["val_nll"][0]
    # best-step selection starts from the Gaussian: within noise of it on held-out rows, or
    # better, but not implausibly better (a wrong log-det would show up here)
    assert -5.0 < diff.mean().item() < 3 * se + 0.1


def test_validation_split_stays_meaningful_on_small_data():
    for n, expected in [(178, 50), (1000, 200), (20_000, 2000), (60, 30)]:
        assert density.default_val_rows(n, 0.1) == expected
    assert density.default_eval_every(200) == 10 and density.default_eval_every(2000) == 50
    flow = gaussian_start(2, couplings=1)
    history = pfe.infer.fit_density(flow, correlated(178, 2), num_steps=40, progress=False)
    assert (history["n_train"], history["n_val"]) == (128, 50)
    assert history["val_step"] == [0, 10, 20, 30, 40]


def test_early_stopping_is_on_by_default():
    # a Gaussian: the Gaussian start is already optimal, so validation cannot improve for long
    flow = gaussian_start(2, couplings=1)
    history = pfe.infer.fit_density(flow, correlated(2000, 2), num_steps=2000, progress=False,
                                    optim=pyro.optim.Adam({"lr": 1e-2}))
    assert history["stopped"] is not None and history["stopped"].startswith("early stopping")
    assert 100 <= len(history["loss"]) < 2000


def test_fit_does_not_touch_pyro_param_store():
    other = pfe.flows.realnvp(2, num_layers=1, hidden_dims=(8,))
    pyro.module("flow", other)  # the README's SVI example registers a module called "flow"
    before = copy.deepcopy(other.state_dict())
    store = dict(pyro.get_param_store().items())
    flow = pfe.flows.realnvp(2, num_layers=1, hidden_dims=(8,))
    start = copy.deepcopy(flow.state_dict())
    optim = pyro.optim.Adam(lambda name: {"lr": 1e-2})  # per-parameter arguments
    history = pfe.infer.fit_density(flow, correlated(500, 2), num_steps=30, progress=False,
                                    optim=optim, patience=None)
    assert history["loss"][-1] < history["loss"][0]
    assert any(not torch.equal(v, start[k]) for k, v in flow.state_dict().items())
    for k, v in other.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert dict(pyro.get_param_store().items()).keys() == store.keys()
    for k, v in pyro.get_param_store().items():
        assert v is store[k]


def _plain_flow():
    torch.manual_seed(3)
    return pfe.Flow(None, [AffineCoupling(2, hidden_dims=(8,)), Reverse(2),
                           AffineCoupling(2, hidden_dims=(8,))]).double()


@pytest.mark.parametrize("make_optim", [
    lambda: pyro.optim.ClippedAdam({"lr": 0.05, "clip_norm": 1e-3}),
    lambda: pyro.optim.Adam({"lr": 0.05}, {"clip_norm": 1e-3}),
    lambda: pyro.optim.SGD({"lr": 0.5}, {"clip_value": 1e-3}),
    lambda: pyro.optim.Adam(lambda module, name: {"lr": 0.05 if "layers.0" in name else 0.01}),
], ids=["ClippedAdam", "Adam-clip_args", "SGD-clip_value", "per-parameter"])
def test_pyro_optimizer_arguments_are_honoured(make_optim):
    """Three steps equal Pyro's own per-parameter stepping (through the param store, on a copy)
    of the same full-batch loss."""
    x = correlated(64, 2) / 10
    flow = _plain_flow()
    reference = copy.deepcopy(flow)
    pfe.infer.fit_density(flow, x, num_steps=3, batch_size=64, val_fraction=0, progress=False,
                          optim=make_optim(), patience=None)
    pyro.clear_param_store()
    pyro.module("flow", reference)
    params = [p for p in reference.parameters()]
    optim = make_optim()
    for _ in range(3):
        for p in params:
            p.grad = None
        (-reference.log_prob(x.clone()).mean()).backward()
        optim(params)
    pyro.clear_param_store()
    for (name, p), q in zip(flow.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12, msg=name)
    moved = max((p - q).abs().max().item() for p, q in
                zip(flow.parameters(), _plain_flow().parameters()))
    assert moved > 1e-6  # it did train


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, monkeypatch):
    data = correlated(1000, 2, dtype=torch.float32)
    kwargs = dict(num_steps=60, batch_size=128, eval_every=10, progress=False, patience=None)

    def run(ckpt, resume=False):
        flow = pfe.flows.realnvp(2, num_layers=2, hidden_dims=(8,))
        pfe.infer.fit_density(flow, data, checkpoint=ckpt, resume=resume, **kwargs)
        return flow

    torch.manual_seed(5)
    straight = run(tmp_path / "a.pt")

    class Interrupt(Exception):
        pass

    real_step = density.FlowOptimizer.step
    calls = {"n": 0}

    def interrupting_step(self):
        calls["n"] += 1
        if calls["n"] == 37:  # after the checkpoint at step 30
            raise Interrupt
        real_step(self)

    torch.manual_seed(5)
    monkeypatch.setattr(density.FlowOptimizer, "step", interrupting_step)
    with pytest.raises(Interrupt):
        run(tmp_path / "b.pt")
    monkeypatch.setattr(density.FlowOptimizer, "step", real_step)
    torch.manual_seed(123)  # the global RNG comes from the checkpoint, not from here
    resumed = run(tmp_path / "b.pt", resume=True)
    record = torch.load(tmp_path / "b.pt", weights_only=True)
    assert record["history"]["start_step"] == 30 and record["step"] == 60
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


def test_resume_with_other_flow_or_data_is_one_clear_line(tmp_path):
    data = correlated(500, 2, dtype=torch.float32)
    ckpt = tmp_path / "c.pt"
    pfe.infer.fit_density(pfe.flows.realnvp(2, num_layers=1), data, num_steps=10,
                          checkpoint=ckpt, progress=False)
    cases = [(pfe.flows.nsf(2, num_layers=1), data, "holds a different flow"),
             (pfe.flows.realnvp(2, num_layers=1), data[:400],
              r"trained on data of shape \(400, 2\), these training data have shape \(320, 2\)"),
             (pfe.flows.realnvp(2, num_layers=1), data + 1, "other data of the same shape")]
    for flow, x, match in cases:
        with pytest.raises(ValueError, match=match) as info:
            pfe.infer.fit_density(flow, x, num_steps=20, checkpoint=ckpt, resume=True,
                                  progress=False)
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_steps=-5), "num_steps must be a non-negative integer"),
    (dict(num_steps=2.5), "num_steps must be a non-negative integer"),
    (dict(batch_size=0), "batch_size must be a positive integer, got 0"),
    (dict(eval_every=0), "eval_every must be a positive integer"),
    (dict(val_fraction=1.5), r"val_fraction must be a number in \[0, 1\) .*got 1.5"),
    (dict(val_fraction=-0.1), r"val_fraction must be a number in \[0, 1\)"),
    (dict(patience=0), "patience must be a positive integer"),
    (dict(weight_decay=-1.0), "weight_decay must be a finite number >= 0"),
    (dict(num_threads=0), "num_threads must be a positive integer"),
    (dict(clip_norm=0), "clip_norm must be a positive number"),
])
def test_bad_settings_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pfe.infer.fit_density(pfe.flows.realnvp(2, num_layers=1), torch.randn(100, 2),
                              progress=False, **kwargs)


def test_nan_row_is_reported_by_its_index_in_the_raw_data():
    x = torch.randn(5000, 2)
    x[4321, 1] = float("nan")
    with pytest.raises(ValueError, match=r"1 row\(s\) with NaN or infinite values \(first: "
                                         r"row 4321"):
        pfe.infer.fit_density(pfe.flows.realnvp(2, num_layers=1), x, progress=False)


def test_float64_and_numpy_data_are_converted_to_the_flow():
    flow = pfe.flows.realnvp(2, num_layers=1, hidden_dims=(8,))  # float32
    x64 = correlated(300, 2)
    history = pfe.infer.fit_density(flow, x64, num_steps=5, progress=False)
    assert math.isfinite(history["best_val_nll"])
    assert math.isclose(mean_nll(flow, x64.numpy()), mean_nll(flow, x64.float()), rel_tol=1e-6)
    pfe.infer.fit_density(flow, x64.numpy(), num_steps=5, progress=False)


def test_non_numeric_data_is_a_type_error():
    with pytest.raises(TypeError, match="must be a tensor or a numeric array"):
        pfe.infer.fit_density(pfe.flows.realnvp(2, num_layers=1), [["a", "b"]] * 20,
                              progress=False)


@pytest.mark.parametrize("make, match", [
    (lambda x: torch.cat([x, torch.full((len(x), 1), 3.0)], 1), r"constant column\(s\) \[2\]"),
    (lambda x: torch.cat([x, x[:, :1]], 1), "duplicate columns 0 and 2"),
    (lambda x: torch.cat([x, x[:, :1] + 2 * x[:, 1:]], 1), "linearly dependent columns"),
    (lambda x: torch.cat([x, (x[:, :1] > 0).float()], 1), r"discrete column\(s\) 2 \(2 distinct"),
])
def test_degenerate_columns_warn(make, match):
    x = make(torch.randn(300, 2))
    with pytest.warns(DegenerateData, match=match + ".*the density is degenerate"):
        pfe.infer.fit_density(pfe.flows.realnvp(3, num_layers=1), x, num_steps=1,
                              progress=False)


def test_divergence_on_huge_data_advises_standardising():
    x = torch.randn(200, 2) * 1e37 + 1e38
    with pytest.warns(TrainingDiverged, match="reach .x. = 1.*e.38.*standardise them first"):
        pfe.infer.fit_density(pfe.flows.realnvp(2, num_layers=1, gaussian_start=False), x,
                              num_steps=5, progress=False)
    # the default Gaussian start (statistics in float64) copes with that scale
    flow = pfe.flows.realnvp(2, num_layers=1)
    history = pfe.infer.fit_density(flow, x, num_steps=5, progress=False)
    assert history["stopped"] is None or history["stopped"].startswith("early")
    expected = math.log(1e37) * 2 + 2.84  # about the entropy of N(0, (1e37)^2 I_2)
    assert abs(history["best_val_nll"] - expected) < 0.3


def test_divergence_on_unit_data_advises_the_optimizer():
    flow = pfe.flows.realnvp(2, num_layers=1, hidden_dims=(8,))
    with torch.no_grad():
        next(t for t in flow.transforms if hasattr(t, "net")).net.flat.fill_(float("nan"))
    with pytest.warns(TrainingDiverged, match="smaller learning rate"):
        pfe.infer.fit_density(flow, torch.randn(200, 2), num_steps=5, progress=False)


def test_spline_bound_warning_after_the_fixed_layers():
    x = torch.randn(2000, 2) * 8  # 53% of the values outside [-5, 5]
    with pytest.warns(SplineBoundWarning, match=r"% of the training values fall outside .*"
                                                r"\[-5, 5\] of SplineCoupling"):
        pfe.infer.fit_density(pfe.flows.nsf(2, num_layers=1, gaussian_start=False), x,
                              num_steps=1, progress=False)
    for flow in (pfe.flows.nsf(2, num_layers=1),  # the Gaussian start whitens the data
                 pfe.flows.nsf(2, num_layers=1, gaussian_start=False, standardize=True)):
        with _no_warning(SplineBoundWarning):
            pfe.infer.fit_density(flow, x, num_steps=1, progress=False)


class _no_warning:
    def __init__(self, category):
        self.category = category

    def __enter__(self):
        import warnings
        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("error", self.category)

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def test_num_threads_is_scoped(monkeypatch):
    torch.set_num_threads(1)
    seen = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (seen.append(n), real(n)))
    pfe.infer.fit_density(pfe.flows.realnvp(2, num_layers=1), torch.randn(100, 2),
                          num_steps=2, progress=False, num_threads=2)
    assert seen == [2, 1] and torch.get_num_threads() == 1


def test_weight_decay_shrinks_network_weights_only():
    x = pfe.datasets.toy("moons", 1000).numpy()  # non-Gaussian: training improves on step 0

    def fit(wd):
        torch.manual_seed(0)
        flow = gaussian_start(2, couplings=1, dtype=torch.float32)
        pfe.infer.fit_density(flow, x, num_steps=100, progress=False, weight_decay=wd,
                              optim=pyro.optim.SGD({"lr": 0.05}), patience=None)
        return flow

    plain, decayed = fit(0.0), fit(1.0)
    assert plain.transforms[0].net.flat.norm() > 1.0  # the plain fit moved the weights
    assert (decayed.transforms[0].net.flat.norm() < 0.8 * plain.transforms[0].net.flat.norm())
    # the data-initialised layer is not pulled towards zero
    torch.testing.assert_close(decayed.transforms[2].loc, plain.transforms[2].loc,
                               atol=0.05, rtol=0.05)


def test_pyro_lr_scheduler_is_stepped_once_per_step(monkeypatch):
    flow = _plain_flow()
    sched = pyro.optim.ExponentialLR({"optimizer": torch.optim.SGD, "optim_args": {"lr": 0.1},
                                      "gamma": 0.5})
    seen = []
    real = density.FlowOptimizer.step

    def recording_step(self):
        real(self)
        seen.append(self.optimizers[0].param_groups[0]["lr"])

    monkeypatch.setattr(density.FlowOptimizer, "step", recording_step)
    pfe.infer.fit_density(flow, correlated(64, 2) / 10, num_steps=3, batch_size=64,
                          val_fraction=0, progress=False, optim=sched, patience=None)
    assert seen == [0.05, 0.025, 0.0125]
