"""Caches that cannot go stale, contexts that broadcast both ways, and Flow inside a plate."""

import pyro
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO

import pyro_flows_ext as pfe
from pyro_flows_ext.transforms import (
    ActNorm,
    AffineCoupling,
    InvertibleBatchNorm,
    MaskedAutoregressive,
    Permute,
    SplineCoupling,
)

from .contract import perturb


def small_flow():
    return pfe.Flow(None, [AffineCoupling(2, hidden_dims=(16,)), Permute(2, [1, 0]),
                           SplineCoupling(2, hidden_dims=(16,)), ActNorm(2)])


def full_batch_params(fresh_tensor_each_step, steps=100):
    torch.manual_seed(1)
    flow = small_flow()
    data = pfe.datasets.toy("moons", 256, 0)
    opt = torch.optim.Adam(flow.parameters(), lr=1e-2)
    for _ in range(steps):
        batch = data.clone() if fresh_tensor_each_step else data
        loss = -flow.log_prob(batch).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return [p.detach().clone() for p in flow.parameters()]


def test_full_batch_loop_over_one_tensor_trains_like_fresh_tensors():
    same, fresh = full_batch_params(False), full_batch_params(True)
    for a, b in zip(same, fresh):
        torch.testing.assert_close(a, b)
    assert any((p - q).abs().max() > 1e-2 for p, q in zip(same, full_batch_params(True, 1)))


def test_scoring_after_a_step_gives_the_new_value():
    flow = small_flow()
    data = pfe.datasets.toy("moons", 128, 0)
    opt = torch.optim.Adam(flow.parameters(), lr=5e-2)
    before = flow.log_prob(data)
    (-before.mean()).backward()
    opt.step()
    after = flow.log_prob(data)
    torch.testing.assert_close(after, flow.log_prob(data.clone()))
    assert (after - before).abs().max() > 1e-3


def test_observed_site_svi_over_one_data_tensor_trains_like_clones():
    def run(clone):
        pyro.clear_param_store()
        torch.manual_seed(2)
        flow = small_flow()
        data = pfe.datasets.toy("moons", 200, 0)

        def model(x):
            pyro.module("flow", flow)
            with pyro.plate("data", len(x)):
                pyro.sample("x", flow, obs=x)

        svi = SVI(model, lambda x: None, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
        losses = [svi.step(data.clone() if clone else data) for _ in range(100)]
        return losses, [p.detach().clone() for p in flow.parameters()]

    (loss_a, params_a), (loss_b, params_b) = run(False), run(True)
    assert loss_a == pytest.approx(loss_b)
    assert loss_a[-1] < loss_a[0] - 100  # it trains (200 points: ~0.5 nats each at least)
    for a, b in zip(params_a, params_b):
        torch.testing.assert_close(a, b)


def test_sample_then_score_does_no_inversion(monkeypatch):
    flow = small_flow()
    calls = []
    for layer in flow.transforms:
        original = layer.inverse_and_ladj
        monkeypatch.setattr(layer, "inverse_and_ladj",
                            lambda x, _f=original: calls.append(1) or _f(x))
    x = flow.rsample((64,))
    flow.log_prob(x)
    x, lp = flow.sample_and_log_prob((32,))
    torch.testing.assert_close(flow.log_prob(x), lp)
    assert calls == []
    flow.log_prob(x.clone())  # a different tensor is scored afresh
    assert len(calls) == len(flow.transforms)


def test_sample_under_no_grad_is_rescored_with_a_graph():
    flow = small_flow()
    with torch.no_grad():
        x = flow.sample((8,))
    lp = flow.log_prob(x)
    assert lp.requires_grad  # not the cached graph-less value


def test_flow_in_a_plate_stays_a_flow():
    flow = small_flow()
    expanded = flow.expand((5,))
    assert isinstance(expanded, pfe.Flow) and expanded.batch_shape == (5,)
    assert expanded.is_exact and expanded.event_shape == (2,)
    x, lp = expanded.sample_and_log_prob((3,))
    assert x.shape == (3, 5, 2) and lp.shape == (3, 5)
    torch.testing.assert_close(expanded.log_prob(x.clone()), lp, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="event shape"):
        expanded.log_prob(torch.zeros(5, 3))

    def model():
        with pyro.plate("n", 4):
            return pyro.sample("x", flow)

    trace = pyro.poutine.trace(model).get_trace()
    assert isinstance(trace.nodes["x"]["fn"], pfe.Flow)


def test_default_base_follows_the_layers_dtype_and_device():
    flow = pfe.Flow(None, [AffineCoupling(2).double()])
    assert flow.base_dist.mean.dtype == torch.float64
    assert flow.sample((3,)).dtype == torch.float64
    flow = flow.float()
    assert flow.base_dist.mean.dtype == torch.float32


CONDITIONAL = {
    "affine-coupling": lambda: AffineCoupling(3, hidden_dims=(8,), context_dim=2),
    "spline-coupling": lambda: SplineCoupling(3, hidden_dims=(8,), context_dim=2),
    "maf": lambda: MaskedAutoregressive(3, hidden_dims=(8,), context_dim=2),
    "iaf-spline": lambda: MaskedAutoregressive(3, "spline", inverse=True, hidden_dims=(8,),
                                               context_dim=2),
}


@pytest.mark.parametrize("name", CONDITIONAL)
def test_one_event_against_many_contexts(name):
    layer = perturb(CONDITIONAL[name]())
    flow = pfe.Flow(None, [layer])
    x, c = torch.randn(3), torch.randn(7, 2)
    lp = flow.condition(c).log_prob(x)
    assert lp.shape == (7,)
    one_by_one = torch.stack([pfe.Flow(None, [layer]).condition(ci).log_prob(x) for ci in c])
    torch.testing.assert_close(lp, one_by_one)
    # and many events against one context, and (sample, batch) events against batch contexts
    assert flow.condition(c[0]).log_prob(torch.randn(4, 3)).shape == (4,)
    assert flow.condition(c).log_prob(torch.randn(5, 7, 3)).shape == (5, 7)
    z, ladj = layer.call_and_ladj(torch.randn(3), context=c)
    assert z.shape == (7, 3) and ladj.shape == (7,)


@pytest.mark.parametrize("make", [lambda: Permute(3), lambda: ActNorm(3),
                                  lambda: InvertibleBatchNorm(3), lambda: pfe.transforms.Exp(3),
                                  lambda: pfe.transforms.InvertibleConv1x1(3),
                                  lambda: pfe.infer.guide.LocScale(3)])
def test_every_layer_checks_its_event_size(make):
    layer = make()
    for call in (layer, layer.inv):
        with pytest.raises(ValueError, match=f"{type(layer).__name__} expects events of size 3"):
            call(torch.ones(2, 4))


def test_batchnorm_eval_scores_each_event_on_its_own():
    layer = perturb(InvertibleBatchNorm(2)).eval()
    flow = pfe.Flow(None, [layer])
    x = torch.randn(6, 2)
    torch.testing.assert_close(flow.log_prob(x)[:2], flow.log_prob(x[:2].clone()))


def test_log_prob_takes_array_likes_and_names_dtype_mismatches():
    import numpy as np

    flow = small_flow()
    x = np.random.default_rng(0).normal(size=(5, 2))
    torch.testing.assert_close(flow.log_prob(x), flow.log_prob(torch.tensor(x).float()))
    assert flow.log_prob([[0.1, 0.2]]).shape == (1,)
    with pytest.raises(TypeError, match="float64 values on cpu for a flow in torch.float32"):
        flow.log_prob(torch.zeros(3, 2, dtype=torch.float64))
    with pytest.raises(TypeError, match="tensor or a numeric array"):
        flow.log_prob("abc")


def test_conditioned_inference_surjection_scores_an_unseen_pair_with_its_context():
    layer = perturb(pfe.surjections.Abs(3, context_dim=2))
    c, x = torch.randn(2), torch.randn(4, 3)
    conditioned = layer.condition(c)
    v = layer.inverse_and_ladj(x, context=c)[1]  # V(x | c), computed by the layer itself
    torch.testing.assert_close(conditioned.log_abs_det_jacobian(x.abs(), x), -v)
    assert not torch.allclose(v, layer.inverse_and_ladj(x, context=-c)[1])  # c matters
