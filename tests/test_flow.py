import io

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO

import pyro_flows_ext as pfe
from pyro_flows_ext.transforms import ActNorm, AffineCoupling, InvertibleConv1x1

from .contract import perturb
from .densities import assert_nll_not_below_entropy, eight_gaussians_log_prob


def perturbed_realnvp(dim=2, scale=0.1, **kw):
    flow = pfe.flows.realnvp(dim, **kw)
    for layer in flow.transforms:
        perturb(layer, scale)
    return flow


def test_log_prob_integrates_to_one_on_a_grid():
    flow = perturbed_realnvp(num_layers=3, hidden_dims=(16,)).double().eval()
    with torch.no_grad():
        x = torch.randn(2000, 2, dtype=torch.float64)
        gap = flow.log_prob(x) - torch.distributions.Normal(0.0, 1.0).log_prob(x).sum(-1)
        assert gap.abs().mean() > 0.1  # the flow is far from its standard normal base
        axis = torch.linspace(-12, 12, 801, dtype=torch.float64)
        xx, yy = torch.meshgrid(axis, axis, indexing="ij")
        p = flow.log_prob(torch.stack([xx.flatten(), yy.flatten()], -1)).exp()
    mass = p.sum() * (axis[1] - axis[0]) ** 2
    assert abs(mass.item() - 1.0) < 2e-3


def test_sample_and_log_prob_matches_fresh_log_prob():
    flow = perturbed_realnvp(num_layers=2).eval()
    x, lp = flow.sample_and_log_prob((3, 4))
    assert x.shape == (3, 4, 2) and lp.shape == (3, 4)
    torch.testing.assert_close(flow.log_prob(x.clone()), lp, atol=1e-4, rtol=1e-4)


def test_batch_shapes_sample_batch_event():
    flow = perturbed_realnvp(3, num_layers=2).eval()
    x = torch.randn(5, 4, 3)
    assert flow.log_prob(x).shape == (5, 4)
    assert flow.sample((6, 2)).shape == (6, 2, 3)


def test_float64_and_device_moves():
    flow = pfe.flows.realnvp(2, num_layers=2).double()
    x = flow.sample((4,))
    assert x.dtype == torch.float64 and flow.log_prob(x).dtype == torch.float64
    flow = flow.float().to("cpu")
    assert flow.sample((2,)).dtype == torch.float32


def test_to_meta_device_moves_base_and_layers():
    flow = pfe.flows.realnvp(2, num_layers=1).to("meta")
    assert flow.base_dist.base_dist.loc.device.type == "meta"
    assert flow.sample((3,)).device.type == "meta"


def test_mixes_with_pyro_transforms():
    layers = [perturb(AffineCoupling(2)), dist.transforms.Permute(torch.tensor([1, 0])),
              perturb(ActNorm(2)), dist.transforms.AffineTransform(1.0, 2.0, event_dim=1)]
    base = dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1)
    ours = pfe.Flow(base, layers)
    reference = dist.TransformedDistribution(base, layers)
    x = torch.randn(10, 2)
    torch.testing.assert_close(ours.log_prob(x), reference.log_prob(x.clone()))


def test_bad_values_are_clear_errors():
    flow = pfe.flows.realnvp(2, num_layers=1)
    with pytest.raises(ValueError, match=r"event shape \(2,\).*got \(5, 3\)"):
        flow.log_prob(torch.randn(5, 3))
    with pytest.raises(ValueError, match="NaN or infinite"):
        flow.log_prob(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError, match="unknown flow 'nope'"):
        pfe.flows.get_builder("nope")


def test_default_base_needs_a_shape_for_images():
    with pytest.raises(ValueError, match="event_shape"):
        pfe.Flow(None, [InvertibleConv1x1(3, event_dim=3)])
    flow = pfe.Flow(None, [InvertibleConv1x1(3, event_dim=3), ActNorm(3, event_dim=3)],
                    event_shape=(3, 4, 4))
    x = flow.sample((2,))
    assert x.shape == (2, 3, 4, 4) and flow.log_prob(x).shape == (2,)


def test_is_a_module_for_pyro_module_and_state_dict():
    flow = pfe.flows.realnvp(2, num_layers=2)
    pyro.module("flow", flow)
    names = set(pyro.get_param_store().keys())
    assert len(names) == len(list(flow.parameters())) > 0
    buf = io.BytesIO()
    torch.save(flow.state_dict(), buf)


def test_svi_with_flow_as_observed_site():
    """A flow as the observed site of a subsampled plate: Trace_ELBO scales the 256 points'
    log-likelihood by 2000/256, so its loss is the full data set's NLL and loss / 2000 is
    nats per point, the same quantity as a held-out mean NLL."""
    data = pfe.datasets.toy("8gaussians", 2000)
    test = pfe.datasets.toy("8gaussians", 2000, seed=1)
    flow = pfe.flows.realnvp(2, num_layers=2, hidden_dims=(32,))

    def model():
        pyro.module("flow", flow)
        with pyro.plate("data", len(data), subsample_size=256) as idx:
            pyro.sample("x", flow, obs=data[idx])

    svi = SVI(model, lambda: None, pyro.optim.Adam({"lr": 5e-3}), Trace_ELBO())
    per_point = [svi.step() / len(data) for _ in range(150)]
    first, last = sum(per_point[:10]) / 10, sum(per_point[-10:]) / 10
    assert last < first - 0.25  # at least 0.25 nats per point better
    flow.eval()
    with torch.no_grad():
        nll = -flow.log_prob(test).mean().item()
    # the training loss per point is the NLL (a wrong plate scale is off by a factor ~8)
    assert abs(last - nll) < 0.1, (last, nll)
    # bounded both sides: better than the best Gaussian (its MLE, computed independently),
    # no better than the data's own density
    gaussian = torch.distributions.MultivariateNormal(data.mean(0), torch.cov(data.T))
    assert nll < -gaussian.log_prob(test).mean().item() - 0.25
    assert_nll_not_below_entropy(flow, test, eight_gaussians_log_prob)


def test_save_and_load_roundtrip(tmp_path):
    flow = perturbed_realnvp(num_layers=2, lu=True).eval()
    pfe.save(flow, tmp_path / "m.pt")
    loaded = pfe.load(tmp_path / "m.pt").eval()
    x = torch.randn(10, 2)
    torch.testing.assert_close(loaded.log_prob(x), flow.log_prob(x.clone()))


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pfe.load(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="could not load model file"):
        pfe.load(junk)
    torch.save({"a": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a pyro_flows_ext model file"):
        pfe.load(tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not made by a builder"):
        pfe.save(pfe.Flow(None, [ActNorm(2)]), tmp_path / "x.pt")


def test_realnvp_saved_before_its_new_defaults_reloads_as_it_was():
    # a spec written before conv/invert/gaussian_start existed (only the passed kwargs) must
    # rebuild the flow of that version, not one with today's defaults
    from pyro_flows_ext.io import FORMAT, from_record

    from .contract import perturb

    old = perturb(pfe.flows.realnvp(2, num_layers=2, norm="actnorm", conv=True, invert=False,
                                    gaussian_start=False), 0.2)
    record = {"format": FORMAT, "spec": {"flow": "realnvp", "dim": 2, "kwargs": {"num_layers": 2}},
              "state_dict": old.state_dict()}
    loaded = from_record(record)
    x = torch.randn(50, 2)
    old.eval(), loaded.eval()
    torch.testing.assert_close(loaded.log_prob(x), old.log_prob(x))
    assert pfe.flows.realnvp(2).spec["kwargs"]["invert"] is True  # today's default
