"""Every registered builder is a normalised density: its ``log_prob`` integrates to 1 on a grid
(eval mode, float64, parameters perturbed away from their identity start). Parametrised over
``pfe.flows.FLOWS``, so a builder registered later is covered the day it is registered."""

import inspect

import pytest
import torch

import pyro_flows_ext as pfe
from pyro_flows_ext.flows import FLOWS

from .contract import perturb

# Smaller networks and stacks keep the grid cheap; applied only where a builder takes them.
SMALL = {"hidden_dims": (16, 16), "num_layers": 3, "num_blocks": 2, "width": 16}
# Points per axis. The density vanishes at the box's edges, where a Riemann sum converges
# fast: at spacing ~0.08 it agrees with a 4x finer grid to 3e-5 for smooth flows and to 2e-3
# for abs_flow/rad_flow (kinks where they fold), far inside the 0.02 tolerance.
GRID = {1: 1001, 2: 121}


def perturbed(name, dim):
    builder = FLOWS[name]
    params = inspect.signature(builder).parameters
    try:
        flow = builder(dim, **{k: v for k, v in SMALL.items() if k in params})
    except ValueError as e:  # a builder may refuse a size it cannot split, with a clear error
        if dim == 1:
            pytest.skip(f"{name} does not build at dim 1: {e}")
        raise
    for layer in flow.transforms:
        if isinstance(layer, torch.nn.Module):
            perturb(layer, 0.1)  # moderate: the density stays smooth at the grid's spacing
    return flow.double().eval()


@pytest.mark.parametrize("dim", [1, 2])
@pytest.mark.parametrize("name", sorted(n for n, b in FLOWS.items()
                                        if not getattr(b, "image", False)))
def test_builder_log_prob_integrates_to_one(name, dim):
    flow = perturbed(name, dim)
    if not flow.is_exact:
        pytest.skip(f"{name}: flow.is_exact is False in eval mode, its log_prob is a "
                    "stochastic estimate, not a density to integrate")
    base = torch.distributions.Normal(torch.zeros((), dtype=torch.float64), 1.0)
    with torch.no_grad():
        x = flow.sample((2000,))
        # the perturbation moved the density well away from the N(0, I) base
        assert (flow.log_prob(x.clone()) - base.log_prob(x).sum(-1)).abs().mean() > 0.05
        # a box that holds the flow's draws with room to spare; fresh draws show the mass
        # outside it is negligible (and that the perturbed flow is not heavy-tailed)
        half = max(5.0, 1.25 * x.abs().max().item())
        assert half < 20.0, f"perturbed {name} draws reach {half / 1.25:.1f}"
        fresh = flow.sample((5000,))
        outside = (fresh.abs() > half).any(-1).double().mean().item()
        assert outside < 1e-3
        axis = torch.linspace(-half, half, GRID[dim], dtype=torch.float64)
        grid = (torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
                if dim == 2 else axis[:, None])
        log_p = torch.cat([flow.log_prob(part) for part in grid.split(2048)])
    assert torch.isfinite(log_p).all()
    mass = log_p.exp().sum().item() * (axis[1] - axis[0]).item() ** dim
    assert abs(mass + outside - 1.0) < 0.02, f"{name} at dim {dim}: mass {mass:.4f} on the grid"


def _inverse_chain_log_prob(flow, x):
    """log N(z; 0, I) + log|det dz/dx| with z the composed inverse of the flow's layers and the
    log-det from the full autograd Jacobian (independent of the layers' log-det code)."""
    def to_base(e):
        for t in reversed(flow.transforms):
            e = t._inverse(e[None])[0]
        return e

    out = []
    for event in x:
        jac = torch.autograd.functional.jacobian(to_base, event)
        z = to_base(event)
        out.append(torch.distributions.Normal(0.0, 1.0).log_prob(z).sum()
                   + torch.linalg.slogdet(jac)[1])
    return torch.stack(out)


@pytest.mark.parametrize("kwargs", [{"mask": "alternate"}, {"squash": "rational"},
                                    {"whiten": "data"},
                                    {"mask": "halves", "permute": True}])
def test_realnvp_options_log_prob_matches_autograd(kwargs):
    flow = pfe.flows.realnvp(5, num_layers=3, hidden_dims=(8,), **kwargs)
    for layer in flow.transforms:
        perturb(layer, 0.2)
    flow = flow.double().eval()
    x = torch.randn(6, 5, dtype=torch.float64)
    with torch.no_grad():
        log_p = flow.log_prob(x.clone())
    torch.testing.assert_close(log_p, _inverse_chain_log_prob(flow, x), atol=1e-8, rtol=1e-7)


def test_realnvp_alternate_masks_are_zukos_checkerboard_without_mixing_layers():
    flow = pfe.flows.realnvp(5, num_layers=4, mask="alternate", gaussian_start=False)
    assert [type(t).__name__ for t in flow.transforms] == ["AffineCoupling"] * 4
    for i, t in enumerate(flow.transforms):
        assert t.mask.tolist() == [j % 2 == i % 2 for j in range(5)]
    with pytest.raises(ValueError, match="unknown mask"):
        pfe.flows.realnvp(4, mask="random")


def test_realnvp_spec_without_later_arguments_rebuilds_the_legacy_flow(tmp_path):
    # a file written before an argument existed has no entry for it: pfe.load must build
    # the flow that version built (LEGACY_DEFAULTS), whatever today's default is
    legacy = pfe.flows.LEGACY_DEFAULTS["realnvp"]
    old = pfe.flows.realnvp(4, num_layers=2, hidden_dims=(8,), **legacy)
    for layer in old.transforms:
        perturb(layer, 0.2)
    pfe.save(old, tmp_path / "old.pt")
    record = torch.load(tmp_path / "old.pt", weights_only=False)
    for name in legacy:
        record["spec"]["kwargs"].pop(name)
    torch.save(record, tmp_path / "old.pt")
    loaded = pfe.load(tmp_path / "old.pt").eval()
    old.eval()
    assert [type(t) for t in loaded.transforms] == [type(t) for t in old.transforms]
    x = torch.randn(7, 4)
    torch.testing.assert_close(loaded.log_prob(x.clone()), old.log_prob(x.clone()))


@pytest.mark.parametrize("whiten", ["base", "data"])
@pytest.mark.parametrize("standardize", [False, True])
def test_realnvp_gaussian_start_is_the_full_covariance_gaussian_fit(whiten, standardize):
    # step 0 of either layout is the maximum-likelihood Gaussian, computed here with torch.cov
    from pyro_flows_ext.infer.density import prepare

    gen = torch.Generator().manual_seed(0)
    mix = torch.tensor([[2.0, 0.0, 0.0], [1.0, 0.5, 0.0], [0.5, -0.3, 3.0]])
    x = torch.randn(2000, 3, generator=gen, dtype=torch.float64) @ mix.double().T + 5.0
    flow = pfe.flows.realnvp(3, num_layers=2, hidden_dims=(8,), whiten=whiten,
                             standardize=standardize).double()
    names = [type(t).__name__ for t in flow.transforms]
    if whiten == "base":  # Cholesky at the base end, one per-axis Standardize at the data end
        assert names[0] == "CholeskyAffine" and names[1:].count("Standardize") == 1
        assert names[-1] == "Standardize"
    else:  # the earlier layout: both at the data end
        assert names[-2:] == (["CholeskyAffine", "Standardize"] if standardize
                              else ["Permute", "CholeskyAffine"])
    prepare(flow, x)
    gauss = torch.distributions.MultivariateNormal(x.mean(0), torch.cov(x.T, correction=0))
    with torch.no_grad():
        torch.testing.assert_close(flow.log_prob(x[:50].clone()), gauss.log_prob(x[:50]))
    with pytest.raises(ValueError, match="unknown whiten"):
        pfe.flows.realnvp(3, whiten="both")


@pytest.mark.parametrize("name", ["nsf", "maf"])
@pytest.mark.parametrize("whiten", ["base", "data"])
def test_nsf_and_maf_gaussian_start_either_side_is_the_gaussian_fit(name, whiten):
    from pyro_flows_ext.infer.density import prepare

    gen = torch.Generator().manual_seed(1)
    mix = torch.tensor([[1.5, 0.0, 0.0], [-1.0, 0.4, 0.0], [0.2, 0.7, 2.0]], dtype=torch.float64)
    x = torch.randn(2000, 3, generator=gen, dtype=torch.float64) @ mix.T - 2.0
    flow = pfe.flows.FLOWS[name](3, num_layers=2, hidden_dims=(8,), whiten=whiten).double()
    names = [type(t).__name__ for t in flow.transforms]
    assert (names[0] == "CholeskyAffine") == (whiten == "base")
    assert names[-1] == ("Standardize" if whiten == "base" else "CholeskyAffine")
    prepare(flow, x)
    gauss = torch.distributions.MultivariateNormal(x.mean(0), torch.cov(x.T, correction=0))
    with torch.no_grad():
        torch.testing.assert_close(flow.log_prob(x[:50].clone()), gauss.log_prob(x[:50]))
    for layer in flow.transforms:  # and the chain rule holds for the trained-looking layout
        perturb(layer, 0.2)
    flow.eval()
    with torch.no_grad():
        log_p = flow.log_prob(x[:6].clone())
    torch.testing.assert_close(log_p, _inverse_chain_log_prob(flow, x[:6]), atol=1e-7, rtol=1e-7)
    with pytest.raises(ValueError, match="unknown whiten"):
        pfe.flows.FLOWS[name](3, whiten="both")


def test_nsf_spec_from_before_whiten_rebuilds_the_data_side_layout(tmp_path):
    old = pfe.flows.nsf(3, num_layers=2, hidden_dims=(8,), whiten="data")
    for layer in old.transforms:
        perturb(layer, 0.2)
    pfe.save(old, tmp_path / "old.pt")
    record = torch.load(tmp_path / "old.pt", weights_only=False)
    record["spec"]["kwargs"].pop("whiten")  # written before nsf had the argument
    torch.save(record, tmp_path / "old.pt")
    loaded = pfe.load(tmp_path / "old.pt").eval()
    assert [type(t) for t in loaded.transforms] == [type(t) for t in old.eval().transforms]
    x = torch.randn(5, 3)
    torch.testing.assert_close(loaded.log_prob(x.clone()), old.log_prob(x.clone()))
