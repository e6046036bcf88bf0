"""torch.compile: no graph breaks on the hot path, the same numbers as eager, and
``fit_density(compile=...)``.

Graph counts come from ``torch._dynamo.explain`` (tracing only, fast). Numerical agreement
runs every builder through dynamo and AOT autograd with the ``aot_eager`` backend (the same
graphs inductor gets, executed with eager kernels: seconds, not minutes); inductor itself
(minutes on a shared CPU) runs for one builder here and for every builder under ``-m slow``.
"""

import warnings

import pytest
import torch
import torch._dynamo as dynamo

import pyro_flows_ext as pfe
from pyro_flows_ext._compile import compiled_nll, graph_report

# tiny versions of every builder (compile time grows with the number of layers)
TINY = {
    "realnvp": dict(num_layers=2, hidden_dims=(8,)),
    "nsf": dict(num_layers=2, hidden_dims=(8,), count_bins=4),
    "maf": dict(num_layers=2, hidden_dims=(8,)),
    "iaf": dict(num_layers=2, hidden_dims=(8,)),
    "residual_flow": dict(num_blocks=2, hidden_dims=(8,)),
    "ffjord": dict(hidden_dims=(8,), solver="rk4", eval_trace="exact"),
    "ot_flow": dict(width=8, num_steps=2, eval_steps=2),
    "abs_flow": dict(num_layers=1, hidden_dims=(8,), sign_hidden_dims=(8,)),
    "rad_flow": dict(num_layers=1, hidden_dims=(8,), gate_hidden_dims=(8,)),
    "glow": dict(levels=1, steps_per_level=1, hidden_channels=8),
}
HOT = ["realnvp", "nsf", "maf", "iaf", "residual_flow"]  # the four families
DEFAULT = ("realnvp", "nsf")  # the rest of the builder sweep runs with -m slow
SWEEP = [pytest.param(n, marks=() if n in DEFAULT else pytest.mark.slow)
         for n in sorted(pfe.flows.FLOWS)]


def tiny_flow(name):
    if name == "glow":
        return pfe.flows.FLOWS[name]((4, 4, 4), **TINY[name]), torch.rand(16, 4, 4, 4)
    kwargs = TINY.get(name, {})
    try:
        flow = pfe.flows.FLOWS[name](2, **kwargs)
    except TypeError:  # a builder added later with other arguments: its defaults
        flow = pfe.flows.FLOWS[name](2)
    return flow, pfe.datasets.toy("moons", 64, 0)


def initialized(name):
    flow, x = tiny_flow(name)
    with torch.no_grad():
        flow.log_prob(x)  # data-dependent layers set eagerly (once, before any compiled call)
    return flow, x


@pytest.fixture(autouse=True)
def fresh_dynamo():
    dynamo.reset()
    yield
    dynamo.reset()


@pytest.mark.parametrize("name", HOT)
def test_no_graph_breaks_on_the_hot_path(name):
    """The training loss (train mode) and eval log_prob each trace to one graph."""
    flow, x = initialized(name)
    graphs, reasons = graph_report(lambda v: -flow.log_prob(v).mean(), x)
    assert (graphs, reasons) == (1, [])
    flow.eval()
    with torch.no_grad():
        graphs, reasons = graph_report(flow.log_prob, x)
    assert (graphs, reasons) == (1, [])


def test_fresh_flow_compiles_in_one_graph():
    """A flow never called before (empty caches, no data-dependent layer) compiles with
    ``fullgraph=True``: the pair cache's parameter walk used to break the graph."""
    flow = pfe.flows.realnvp(2, num_layers=2, hidden_dims=(8,), gaussian_start=False)
    x = torch.randn(32, 2)
    compiled = torch.compile(flow.log_prob, backend="aot_eager", fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(x), flow.log_prob(x))


@pytest.mark.parametrize("name", SWEEP)
def test_compiled_log_prob_matches_eager(name):
    """Every builder: compiled ``log_prob`` (dynamo + AOT autograd) equals eager, in eval
    mode and for the gradient of the training loss in train mode."""
    flow, x = initialized(name)
    flow.eval()
    compiled = torch.compile(flow.log_prob, backend="aot_eager", dynamic=False)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), flow.log_prob(x), atol=1e-5, rtol=1e-5)
    if not flow.is_exact or name in ("ffjord", "ot_flow"):
        return  # stochastic estimates (fresh noise per call) / ODE solves: eval only
    flow.train()
    loss_fn = compiled_nll(flow, backend="aot_eager")
    grads = []
    for fn in (loss_fn, loss_fn.eager):
        flow.zero_grad()
        fn(x).backward()
        grads.append([p.grad.clone() for p in flow.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(pfe.flows.FLOWS))
def test_inductor_every_builder(name):
    """The default backend (inductor), forward only (about 10 s per builder on a CPU)."""
    flow, x = initialized(name)
    flow.eval()
    compiled = torch.compile(flow.log_prob, dynamic=False)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), flow.log_prob(x), atol=1e-5, rtol=1e-5)


def _fit(compile, name="realnvp", steps=12):
    torch.manual_seed(0)
    flow, _ = tiny_flow(name)
    data = pfe.datasets.toy("moons", 600, 0)
    history = pfe.infer.fit_density(flow, data, num_steps=steps, batch_size=64, progress=False,
                                    eval_every=4, compile=compile)
    return flow, history


@pytest.mark.parametrize("name", ["realnvp", pytest.param("residual_flow",
                                                         marks=pytest.mark.slow)])
def test_fit_density_compiled_equals_eager(name):
    """A compiled training run ends with the eager run's parameters and losses."""
    eager, h_eager = _fit(False, name)
    compiled, h_compiled = _fit({"backend": "aot_eager"}, name)
    assert len(h_eager["loss"]) == len(h_compiled["loss"]) == 12
    torch.testing.assert_close(torch.tensor(h_compiled["loss"]), torch.tensor(h_eager["loss"]),
                               atol=1e-5, rtol=1e-5)
    for a, b in zip(compiled.parameters(), eager.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", HOT)
def test_fit_density_inductor_equals_eager(name):
    eager, h_eager = _fit(False, name)
    compiled, h_compiled = _fit(True, name)
    torch.testing.assert_close(torch.tensor(h_compiled["loss"]), torch.tensor(h_eager["loss"]),
                               atol=1e-4, rtol=1e-4)


def _failing_backend(gm, example_inputs):
    raise RuntimeError("this backend always fails")


def test_compile_failure_falls_back_to_eager():
    """A compiler failure warns once and the run continues eagerly with the same numbers."""
    eager, h_eager = _fit(False, steps=6)
    with pytest.warns(UserWarning, match="torch.compile failed .*continuing without"):
        compiled, h_compiled = _fit({"backend": _failing_backend}, steps=6)
    assert h_compiled["loss"] == h_eager["loss"]


def test_model_errors_are_not_swallowed():
    """An error of the model itself is raised (eagerly), not hidden by the fallback."""
    flow, _ = initialized("realnvp")
    nll = compiled_nll(flow, backend="aot_eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="expects events of size 2"):
            nll(torch.randn(8, 3))


def test_compile_ignored_with_training_penalties():
    torch.manual_seed(0)
    flow = pfe.flows.ot_flow(2, **TINY["ot_flow"])
    data = pfe.datasets.toy("moons", 400, 0)
    with pytest.warns(UserWarning, match="ignored for flows with training penalties"):
        pfe.infer.fit_density(flow, data, num_steps=2, batch_size=32, progress=False,
                              compile=True)
