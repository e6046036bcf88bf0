"""The exact reference of ``benchmarks/mass_covering.py``: its grid sampler reproduces the
example models' closed-form evidence and exact draws, and its coverage metric reads 1 for
exact draws and the visited share for a guide that misses part of the posterior."""

import importlib.util
import math
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(path, name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _load("benchmarks/mass_covering.py", "mass_covering_bench")


@pytest.mark.parametrize("name", ["ring", "two_modes"])
def test_grid_posterior_matches_the_exact_evidence_and_draws(bench, name):
    module = bench.load_example(name)
    grid = bench.GridPosterior(module.log_joint)
    assert abs(grid.log_evidence - module.log_evidence()) < 1e-3
    g = torch.Generator().manual_seed(0)
    ours = grid.sample(4000, g)
    theirs = module.exact_sample(4000, generator=g)
    # same distribution: W1 near the Monte Carlo floor, same radius / first-coordinate moments
    floor = bench.w1(grid.sample(1000, g), grid.sample(1000, g))
    assert bench.w1(ours[:1000], theirs[:1000]) < 1.5 * floor + 0.02
    if name == "ring":
        r_ours, r_theirs = ours.norm(dim=-1), theirs.norm(dim=-1)
        assert abs(r_ours.mean() - r_theirs.mean()) < 0.02
        assert abs(r_ours.std() - r_theirs.std()) < 0.02
    else:
        heavy = float(module.posterior_weights()[0])
        assert abs(float((ours[:, 0] < 0).float().mean()) - heavy) < 0.03


def test_coverage_of_exact_and_partial_draws(bench):
    module = bench.load_example("ring")
    grid = bench.GridPosterior(module.log_joint)
    mass = grid.region_mass(bench.ring_regions, bench.RING_SECTORS)
    torch.testing.assert_close(mass, torch.full_like(mass, 1 / bench.RING_SECTORS),
                               atol=2e-3, rtol=0)
    draws = grid.sample(20_000, torch.Generator().manual_seed(1))
    covered, overlap = bench.coverage(draws, bench.ring_regions, mass)
    assert covered == pytest.approx(1.0) and overlap > 0.97
    upper = draws[draws[:, 1] > 0]  # half the ring
    covered, overlap = bench.coverage(upper, bench.ring_regions, mass)
    assert covered == pytest.approx(0.5, abs=1e-6) and overlap == pytest.approx(0.5, abs=0.01)

    two = bench.load_example("two_modes")
    grid = bench.GridPosterior(two.log_joint)
    mass = grid.region_mass(bench.two_mode_regions, 2)
    torch.testing.assert_close(mass.float(), two.posterior_weights(), atol=1e-3, rtol=0)
    heavy_only = grid.sample(5000, torch.Generator().manual_seed(2))
    heavy_only = heavy_only[heavy_only[:, 0] < 0]
    covered, overlap = bench.coverage(heavy_only, bench.two_mode_regions, mass)
    assert math.isclose(covered, float(mass[0]), abs_tol=1e-6)
