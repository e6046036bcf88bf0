import math
import warnings

import pyro.optim
import pytest
import torch

import pyro_flows_ext as pfe
from pyro_flows_ext.core import FlowLayer
from pyro_flows_ext.infer.density import TrainingDiverged, mean_nll

from .contract import assert_fit_beats_gaussian
from .densities import assert_nll_not_below_entropy, moons_log_prob


def gaussian_data(n=2000):
    return torch.randn(n, 2) * torch.tensor([2.0, 0.5]) + torch.tensor([1.0, -1.0])


def test_fits_a_gaussian_to_its_entropy():
    data = gaussian_data(4000)
    flow = pfe.flows.realnvp(2, num_layers=2, hidden_dims=(16,), gaussian_start=False)
    history = pfe.infer.fit_density(flow, data, num_steps=300, progress=False,
                                    optim=pyro.optim.Adam({"lr": 1e-2}))
    entropy = 0.5 * 2 * math.log(2 * math.pi * math.e) + math.log(2.0 * 0.5)
    test = gaussian_data(4000)
    assert abs(mean_nll(flow, test) - entropy) < 0.05
    # floor: no better than the data's own density on the same points (closed form)
    truth = torch.distributions.Normal(torch.tensor([1.0, -1.0]), torch.tensor([2.0, 0.5]))
    assert_nll_not_below_entropy(flow, test, lambda x: truth.log_prob(x).sum(-1).double())
    assert history["best_step"] > 0
    assert len(history["loss"]) == 300 or history["stopped"] == (
        f"early stopping at step {len(history['loss'])}")
    assert not flow.training


def test_best_parameters_are_restored():
    flow = pfe.flows.realnvp(2, num_layers=1, hidden_dims=(8,))
    data = gaussian_data()
    history = pfe.infer.fit_density(flow, data, num_steps=60, eval_every=20, progress=False,
                                    val_data=data[:500])
    assert math.isclose(mean_nll(flow, data[:500]), history["best_val_nll"], rel_tol=1e-5)
    assert history["best_val_nll"] == min(history["val_nll"])


@pytest.mark.parametrize("bad, match", [
    (torch.tensor([[0.0, 1.0]] * 20 + [[float("nan"), 0.0]]), r"1 row\(s\) with NaN.*row 20"),
    (torch.tensor([[0.0, float("inf")]] * 20), "NaN or infinite"),
    (torch.randn(50, 3), r"expected events of shape \(2,\), got an array of shape \(50, 3\)"),
    (torch.randn(5, 2), "at least 10 training rows, got 3"),
])
def test_bad_data_is_a_clear_error(bad, match):
    with pytest.raises(ValueError, match=match):
        pfe.infer.fit_density(pfe.flows.realnvp(2, num_layers=1), bad, num_steps=1,
                              progress=False)


class BreaksAfter(FlowLayer):
    """A scale layer whose likelihood goes NaN after a number of calls."""

    def __init__(self, calls):
        super().__init__()
        self.dim, self.calls = 2, calls
        self.log_scale = torch.nn.Parameter(torch.zeros(2))

    def call_and_ladj(self, z):
        return z * self.log_scale.exp(), self.log_scale.sum().expand(z.shape[:-1])

    def inverse_and_ladj(self, x):
        self.calls -= 1
        z = x * torch.exp(-self.log_scale)
        if self.calls < 0:
            z = z * float("nan")
        return z, -self.log_scale.sum().expand(x.shape[:-1])


def test_non_finite_loss_stops_and_keeps_last_good_parameters(tmp_path):
    layer = BreaksAfter(calls=45)
    flow = pfe.Flow(None, [layer])
    flow.spec = None
    with pytest.warns(TrainingDiverged, match="non-finite loss.*restored the last good"):
        history = pfe.infer.fit_density(flow, gaussian_data(), num_steps=100, eval_every=10,
                                        progress=False, optim=pyro.optim.Adam({"lr": 0.05}))
    assert history["stopped"].startswith("non-finite loss")
    assert torch.isfinite(layer.log_scale).all()
    assert len(history["loss"]) < 100
    assert history["best_step"] > 0


def test_checkpoint_is_kept_when_training_diverges(tmp_path):
    flow = pfe.flows.realnvp(2, num_layers=1, hidden_dims=(8,))
    data = gaussian_data()
    ckpt = tmp_path / "model.pt"
    pfe.infer.fit_density(flow, data, num_steps=20, eval_every=10, progress=False, checkpoint=ckpt)
    saved = pfe.load(ckpt).eval()
    with torch.no_grad():
        next(t for t in flow.transforms if hasattr(t, "net")).net.flat.fill_(float("nan"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrainingDiverged)
        history = pfe.infer.fit_density(flow, data, num_steps=40, eval_every=10, progress=False,
                                        checkpoint=ckpt, resume=False)
    assert (history["stopped"].startswith("non-finite loss")
            and history["stopped"].endswith("step 0"))
    reloaded = pfe.load(ckpt).eval()
    x = torch.randn(5, 2)
    torch.testing.assert_close(reloaded.log_prob(x), saved.log_prob(x.clone()))


def test_checkpoint_and_resume(tmp_path):
    data = gaussian_data()
    ckpt = tmp_path / "ckpt.pt"
    flow = pfe.flows.realnvp(2, num_layers=1, hidden_dims=(8,))
    pfe.infer.fit_density(flow, data, num_steps=30, eval_every=10, progress=False, checkpoint=ckpt)
    resumed = pfe.flows.realnvp(2, num_layers=1, hidden_dims=(8,))
    history = pfe.infer.fit_density(resumed, data, num_steps=50, eval_every=10, progress=False,
                                    checkpoint=ckpt, resume=True)
    assert len(history["loss"]) == 50 and history["val_step"] == [0, 10, 20, 30, 40, 50]


def test_per_parameter_pyro_optimizer_path():
    flow = pfe.flows.realnvp(2, num_layers=1, hidden_dims=(8,), gaussian_start=False)
    optim = pyro.optim.Adam(lambda module, param: {"lr": 1e-2})
    # correlated data: ActNorm's start is diagonal, so only training the coupling helps
    data = torch.randn(2000, 2) @ torch.tensor([[1.0, 0.9], [0.0, 0.4]])
    history = pfe.infer.fit_density(flow, data, num_steps=100, progress=False, optim=optim)
    assert history["best_val_nll"] < history["val_nll"][0] - 0.1


@pytest.mark.slow
def test_realnvp_reaches_good_nll_on_moons():
    train, test = pfe.datasets.toy("moons", 20000, 0), pfe.datasets.toy("moons", 5000, 1)
    flow = pfe.flows.realnvp(2)
    pfe.infer.fit_density(flow, train, num_steps=3000, progress=False)
    assert mean_nll(flow, test) < 1.85  # true entropy 1.676; peers reach 1.75 to 2.02
    assert_nll_not_below_entropy(flow, test, moons_log_prob)


def test_realnvp_learns_moons_quickly():
    assert_fit_beats_gaussian(pfe.flows.realnvp(2, num_layers=4), steps=600)
