"""examples/models ring and two_modes: exact evidences, draws and coverage measures."""

import math

import pytest
import torch

from pyro_flows_ext import diagnostics
from tests.test_neutra import load_example


@pytest.mark.parametrize("name", ["ring", "two_modes"])
def test_exact_evidence_and_draws(name):
    m = load_example(name)
    grid = torch.linspace(-8, 8, 481, dtype=torch.float64)
    x = torch.stack(torch.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 2)
    log_joint = m.log_joint(x)
    quadrature = float(torch.logsumexp(log_joint, 0) + 2 * math.log(grid[1] - grid[0]))
    assert abs(m.log_evidence() - quadrature) < 1e-4
    draws = m.exact_sample(20_000, generator=torch.Generator().manual_seed(0)).double()
    weights = torch.softmax(log_joint, 0)
    for f in (lambda v: v.norm(dim=-1), lambda v: v[:, 0], lambda v: v[:, 1] ** 2):
        exact = float((weights * f(x)).sum())
        assert abs(float(f(draws).mean()) - exact) < 4 * float(f(draws).std()) / 20_000**0.5
    assert m.covered_mass(draws) == pytest.approx(1.0)
    # the model's own log density is the exact one (so IW estimates target the evidence)
    import pyro

    def exact_guide():
        pyro.sample("x", pyro.distributions.Delta(torch.zeros(2)).to_event(1))

    lw = diagnostics.log_importance_weights(m.model, exact_guide, num_samples=2)
    torch.testing.assert_close(lw, m.log_joint(torch.zeros(1, 2)).expand(2))


def test_coverage_sees_a_missing_half():
    ring, modes = load_example("ring"), load_example("two_modes")
    draws = ring.exact_sample(4000, generator=torch.Generator().manual_seed(1))
    assert ring.covered_mass(draws[draws[:, 1] > 0]) == pytest.approx(0.5, abs=0.03)
    draws = modes.exact_sample(4000, generator=torch.Generator().manual_seed(1))
    heavy = float(modes.posterior_weights()[0])
    assert modes.covered_mass(draws[draws[:, 0] < 0]) == pytest.approx(heavy)
    assert 0.5 < heavy < 0.7
