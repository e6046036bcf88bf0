import pyro
import pytest
import torch

# One thread: on a shared 2-core machine OpenMP spin-waiting against another busy process
# turns millisecond steps into hundreds of milliseconds.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same seed and leaves the global RNG as it found it."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        pyro.clear_param_store()
        yield
