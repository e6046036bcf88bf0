import pyro
import pytest
import torch


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same seed and leaves the global RNG as it found it."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        pyro.clear_param_store()
        yield
