"""Every registered builder is a normalised density: its ``log_prob`` integrates to 1 on a grid
(eval mode, float64, parameters perturbed away from their identity start). Parametrised over
``pfe.flows.FLOWS``, so a builder registered later is covered the day it is registered."""

import inspect

import pytest
import torch

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
