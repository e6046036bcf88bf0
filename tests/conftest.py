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


@pytest.fixture
def num_samples_spy(monkeypatch):
    """``spy(module, name)`` wraps ``module.name`` so each call's ``num_samples`` is recorded
    in the list it returns (the call itself goes through)."""

    def spy(module, name):
        calls, real = [], getattr(module, name)

        def wrapper(*args, num_samples, **kwargs):
            calls.append(num_samples)
            return real(*args, num_samples=num_samples, **kwargs)

        monkeypatch.setattr(module, name, wrapper)
        return calls

    return spy


# -- hypothesis profiles (tests/test_properties.py) ------------------------------------------
# "default": a few examples per property, derandomized, so the default suite stays fast and
# reproducible; "long": many random examples, loaded for -m slow or with
# PFE_HYPOTHESIS_PROFILE=long.
try:
    import os

    from hypothesis import HealthCheck, settings

    _relaxed = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                HealthCheck.filter_too_much, HealthCheck.data_too_large]
    settings.register_profile("default", max_examples=20, deadline=None, derandomize=True,
                              suppress_health_check=_relaxed, print_blob=True)
    settings.register_profile("long", max_examples=300, deadline=None,
                              suppress_health_check=_relaxed, print_blob=True)
    settings.load_profile(os.environ.get("PFE_HYPOTHESIS_PROFILE", "default"))
except ImportError:  # hypothesis (the "test" extra) missing: test_properties skips
    settings = None


def pytest_configure(config):
    markexpr = config.getoption("markexpr", "") or ""
    if settings is not None and "slow" in markexpr and "not slow" not in markexpr:
        settings.load_profile(os.environ.get("PFE_HYPOTHESIS_PROFILE", "long"))
