"""Data-parallel training: 2 gloo processes on CPU (spawned from the test, 1 thread each)
against single-process references computed here.

One launch runs every scenario (:func:`_scenarios`), so the default suite pays for one
process start; the CLI's ``--nproc 2`` is a second one. The references are independent of
the distributed code: single-process ``fit_density``, stock ``pyro.infer.SVI``, and the
data's own statistics from numpy-style formulas.
"""

import json
import os

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

import pyro_flows_ext as pfe
from pyro_flows_ext import distributed as D
from pyro_flows_ext.infer import AutoFlowGuide
from pyro_flows_ext.infer.density import fit_density
from pyro_flows_ext.transforms import ActNorm, CholeskyAffine, Standardize

TIMEOUT = 300  # seconds for a whole launch (and for any collective inside it)
STEPS, BATCH = 30, 101  # an odd global batch: shards of 51 and 50 rows
ADAM = {"lr": 0.03}
N_SVI, B_SVI, SVI_STEPS = 64, 15, 6  # subsample of 15: shares of 8 and 7


# -- data and models shared by the workers and the references --------------------------------

def density_data():
    """Correlated, bimodal 3-D float64 rows far from the origin (train, validation)."""
    g = torch.Generator().manual_seed(1)
    mix = torch.tensor([[2.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.5, 0.3]], dtype=torch.float64)
    x = torch.randn(700, 3, generator=g, dtype=torch.float64) @ mix + 5.0
    x[::2, 0] += 8.0  # two modes: training improves on the Gaussian start
    return x[:600], x[600:]


def data_parallel_flow():
    """Standardize, CholeskyAffine and ActNorms: every data-initialised layer (the data-side
    layout, so the CholeskyAffine sees the standardised rows, as the independent check
    below assumes)."""
    torch.manual_seed(0)
    return pfe.flows.realnvp(3, num_layers=2, hidden_dims=(8,), norm="actnorm",
                             standardize=True, whiten="data").double()


def noisy_flow():
    """A residual flow whose training log-det is a Hutchinson power series (per-row noise)."""
    torch.manual_seed(0)
    return pfe.flows.residual_flow(3, num_blocks=1, hidden_dims=(8,), logdet="power").double()


def svi_data():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(N_SVI, 3, generator=g, dtype=torch.float64)
    y = (torch.rand(N_SVI, generator=g, dtype=torch.float64)
         < torch.sigmoid(x @ torch.tensor([1.5, -1.0, 0.5], dtype=torch.float64))).double()
    return x, y


def logistic(x, y, idx):
    """Bayesian logistic regression; the plate scores the rows ``idx`` of ``N_SVI``."""
    w = pyro.sample("w", dist.Normal(torch.zeros(3, dtype=x.dtype), 1.0).to_event(1))
    with pyro.plate("data", N_SVI, subsample=idx):
        pyro.sample("y", dist.Bernoulli(logits=x[idx] @ w), obs=y[idx])


def svi_batches():
    g = torch.Generator().manual_seed(3)
    return [torch.randperm(N_SVI, generator=g)[:B_SVI] for _ in range(SVI_STEPS)]


def run_svi(step_fn_factory, default_guide=False):
    """``SVI_STEPS`` steps from seed 0 in float64; ``(losses, {param: value})``. With
    ``default_guide``, ``AutoFlowGuide``'s defaults (sticking the landing and its in-guide
    elementwise gradient clip)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        pyro.clear_param_store()
        torch.manual_seed(0)
        x, y = svi_data()
        # stl=False: no gradient clipping inside the guide (a per-rank elementwise clip
        # before the reduction is not the clip of the summed gradient)
        guide = (AutoFlowGuide(logistic) if default_guide else
                 AutoFlowGuide(logistic, flow="maf", num_layers=1, hidden_dims=(8,), stl=False))
        step = step_fn_factory(guide)
        losses = [step(x, y, idx) for idx in svi_batches()]
        return losses, {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    finally:
        torch.set_default_dtype(old)


def _fit(flow, **kwargs):
    train, val = density_data()
    kwargs = {"num_steps": STEPS, "batch_size": BATCH, "eval_every": 4, "patience": None,
              "progress": False, "val_data": val, **kwargs}
    history = fit_density(flow, train, **kwargs)
    return {k: v.detach().clone() for k, v in flow.state_dict().items()}, history


# -- the 2-process scenarios -------------------------------------------------------------------

def _scenarios(folder):
    rank = D.get_rank()
    out = {"rank": rank, "world": D.get_world_size()}

    # 1. the start: a different random start on rank 1 is replaced by rank 0's, and the
    # data-initialised layers are set from both shards' statistics
    flow = data_parallel_flow()
    if rank == 1:
        with torch.no_grad():
            for p in flow.parameters():
                p.add_(torch.randn_like(p))
    out["start"] = _fit(flow, num_steps=0)[0]
    # 2. training: 30 steps on odd global batches
    out["fit"] = _fit(data_parallel_flow(), eval_every=10, optim=pyro.optim.Adam(ADAM))

    # 3. ActNorm's own initialisation inside synchronized_statistics: rank r passes its rows
    train, _ = density_data()
    layer = ActNorm(3).double()
    with D.synchronized_statistics():
        layer._initialize(D.shard(train))
    out["actnorm"] = (layer.loc.detach().clone(), layer.log_scale.detach().clone())

    # 4. files and resume: each rank works in its own folder (no shared disk), so rank 1
    # must write nothing and resumes from what rank 0 read
    own = os.path.join(folder, f"rank{rank}")
    os.makedirs(own, exist_ok=True)
    os.chdir(own)
    out["whole"] = _fit(noisy_flow(), num_steps=16, checkpoint="whole.pt")
    _fit(noisy_flow(), num_steps=8, checkpoint="cut.pt")  # stopped after 8 of 16 steps
    resumed = noisy_flow()
    with torch.no_grad():
        for p in resumed.parameters():
            p.add_(1.0)  # replaced by the checkpoint's parameters
    out["resumed"] = _fit(resumed, num_steps=16, checkpoint="cut.pt", resume=True)
    out["files"] = sorted(os.listdir(own))
    out["noise"] = torch.randn(4)  # per-rank streams differ

    # 5. data-parallel SVI on each rank's share of the same global subsamples
    def factory(guide):
        svi = D.DistributedSVI(logistic, guide, pyro.optim.Adam({"lr": 0.05}),
                               pyro.infer.Trace_ELBO())
        return lambda x, y, idx: svi.step(x, y, D.shard(idx))

    out["svi"] = run_svi(factory)
    out["svi_default"] = run_svi(factory, default_guide=True)

    # 6. a plate drawing its own subsample would draw the same rows on every rank
    def drawing(x, y):
        w = pyro.sample("w", dist.Normal(torch.zeros(3, dtype=x.dtype), 1.0).to_event(1))
        with pyro.plate("data", N_SVI, subsample_size=B_SVI) as idx:
            pyro.sample("y", dist.Bernoulli(logits=x[idx] @ w), obs=y[idx])

    pyro.clear_param_store()
    svi = D.DistributedSVI(drawing, pyro.infer.autoguide.AutoNormal(drawing),
                           pyro.optim.Adam({"lr": 0.05}), pyro.infer.Trace_ELBO())
    try:
        svi.step(*(t.float() for t in svi_data()))
    except ValueError as e:
        out["self_drawn"] = str(e)
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ranks")
    return D.launch(_scenarios, 2, str(folder), timeout=TIMEOUT)


def assert_states_close(a, b, tol):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].double(), b[k].double(), rtol=0, atol=tol), k


# -- tests ---------------------------------------------------------------------------------------

def test_both_ranks_ran(two_ranks):
    assert [r["rank"] for r in two_ranks] == [0, 1]
    assert all(r["world"] == 2 for r in two_ranks)


def test_data_initialised_layers_match_the_whole_data(two_ranks):
    train, _ = density_data()
    ref = data_parallel_flow()
    fit_density(ref, train, num_steps=0, val_data=density_data()[1], progress=False)
    for r in two_ranks:  # identical on both ranks and equal to one process on all rows
        assert_states_close(r["start"], ref.state_dict(), 1e-12)
    # the independent check: Standardize holds the column means and (population) std devs,
    # and CholeskyAffine the Cholesky factor of the correlation matrix
    layers = {type(t).__name__: t for t in ref.transforms}
    assert isinstance(layers["Standardize"], Standardize)
    assert isinstance(layers["CholeskyAffine"], CholeskyAffine)
    rows = train.numpy()
    std = rows.std(0)
    np.testing.assert_allclose(layers["Standardize"].loc.numpy(), rows.mean(0), atol=1e-12)
    np.testing.assert_allclose(layers["Standardize"].scale.numpy(), std, atol=1e-12)
    tril = layers["CholeskyAffine"].scale_tril().detach().numpy()
    np.testing.assert_allclose(tril @ tril.T, np.corrcoef(rows, rowvar=False), atol=1e-10)
    assert sum(type(t).__name__ == "ActNorm" for t in ref.transforms) == 2


def test_two_processes_train_as_one_on_the_same_global_batches(two_ranks):
    state, history = _fit(data_parallel_flow(), eval_every=10, optim=pyro.optim.Adam(ADAM))
    assert history["best_step"] > 0  # the compared parameters are trained ones
    for r in two_ranks:
        theirs, their_history = r["fit"]
        assert_states_close(theirs, state, 1e-9)
        np.testing.assert_allclose(their_history["loss"], history["loss"], rtol=1e-10)
        np.testing.assert_allclose(their_history["val_nll"], history["val_nll"], rtol=1e-10)
        assert their_history["best_step"] == history["best_step"]
    assert len(history["loss"]) == STEPS
    start = two_ranks[0]["start"]  # it trained: the couplings moved away from the start
    assert max((state[k].double() - start[k].double()).abs().max().item() for k in state
               if state[k].is_floating_point()) > 1e-3


def test_actnorm_lazy_start_uses_all_ranks_rows(two_ranks):
    train, _ = density_data()
    rows = train.numpy()
    for r in two_ranks:
        loc, log_scale = r["actnorm"]
        np.testing.assert_allclose(loc.numpy(), rows.mean(0), atol=1e-12)
        np.testing.assert_allclose(log_scale.exp().numpy(), rows.std(0, ddof=1), atol=1e-12)


def test_only_rank_zero_writes_files(two_ranks):
    assert two_ranks[0]["files"] == ["cut.pt", "whole.pt"]
    assert two_ranks[1]["files"] == []


def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(two_ranks):
    for r in two_ranks:
        whole, whole_history = r["whole"]
        resumed, resumed_history = r["resumed"]
        assert resumed_history["start_step"] == 8
        # 1e-10, not 0: the residual block's spectral-norm state is rebuilt on load (one
        # process resumes to the same 1e-10); a rank given another rank's or a fresh noise
        # stream after the restart differs by ~1e-2
        assert_states_close(resumed, whole, 1e-8)
        np.testing.assert_allclose(resumed_history["loss"], whole_history["loss"], rtol=1e-8)
    # the ranks' Hutchinson noise comes from different streams
    assert not torch.equal(two_ranks[0]["noise"], two_ranks[1]["noise"])


def test_data_parallel_svi_matches_one_process(two_ranks):
    def factory(guide):
        svi = pyro.infer.SVI(logistic, guide, pyro.optim.Adam({"lr": 0.05}),
                             pyro.infer.Trace_ELBO())
        return svi.step

    losses, params = run_svi(factory)
    for r in two_ranks:
        their_losses, their_params = r["svi"]
        np.testing.assert_allclose(their_losses, losses, rtol=1e-10)
        assert_states_close(their_params, params, 1e-10)
    assert len(params) > 0


def test_data_parallel_svi_with_the_default_guide_clips_the_summed_gradient(two_ranks):
    # the default guide clips its gradients elementwise inside the backward pass; summing
    # clipped parts would differ from one process's clip of the sum (the clip binds early on)
    def factory(guide):
        svi = pyro.infer.SVI(logistic, guide, pyro.optim.Adam({"lr": 0.05}),
                             pyro.infer.Trace_ELBO())
        return svi.step

    losses, params = run_svi(factory, default_guide=True)
    for r in two_ranks:
        their_losses, their_params = r["svi_default"]
        np.testing.assert_allclose(their_losses, losses, rtol=1e-10)
        assert_states_close(their_params, params, 1e-10)


def test_svi_refuses_plates_that_draw_their_own_subsample(two_ranks):
    for r in two_ranks:
        assert "subsample=svi.subsample" in r.get("self_drawn", "")


def test_cli_nproc_2_matches_one_process(tmp_path):
    from pyro_flows_ext.cli import main

    common = ["fit", "moons", "--steps", "20", "--num-points", "1000", "--batch-size", "128",
              "--quiet"]
    assert main(common + ["--nproc", "2", "--out", str(tmp_path / "two")]) == 0
    assert main(common + ["--out", str(tmp_path / "one")]) == 0
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    for key in ("train_nll", "val_nll", "test_nll"):
        assert abs(two[key] - one[key]) < 1e-4, key
    assert two["steps"] == one["steps"] == 20
    assert sorted(os.listdir(tmp_path / "two")) == sorted(os.listdir(tmp_path / "one"))


# -- single-process behaviour (no group) -------------------------------------------------------

def test_without_a_group_helpers_are_the_identity():
    x = torch.arange(5.0)
    assert D.get_rank() == 0 and D.get_world_size() == 1 and D.is_main_process()
    assert torch.equal(D.shard(x), x) and torch.equal(D.all_reduce_sum(x), x)
    assert D.resolve(None) is False
    with pytest.raises(RuntimeError, match="process group"):
        D.resolve(True)
    with pytest.raises(RuntimeError, match="torchrun"):
        fit_density(data_parallel_flow(), density_data()[0], num_steps=1, distributed=True)


def test_distributed_svi_without_a_group_is_plain_svi():
    def plain(guide):
        return pyro.infer.SVI(logistic, guide, pyro.optim.Adam({"lr": 0.05}),
                              pyro.infer.Trace_ELBO()).step

    def wrapped(guide):
        return D.DistributedSVI(logistic, guide, pyro.optim.Adam({"lr": 0.05}),
                                pyro.infer.Trace_ELBO()).step

    (a, pa), (b, pb) = run_svi(plain), run_svi(wrapped)
    assert a == b
    assert_states_close(pa, pb, 0.0)


@pytest.mark.parametrize("n, world", [(10, 3), (2, 4), (101, 2), (0, 2)])
def test_shards_cover_the_rows_once_in_order(n, world):
    parts = [D.shard_bounds(n, r, world) for r in range(world)]
    assert parts[0][0] == 0 and parts[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
    sizes = [b - a for a, b in parts]
    assert max(sizes) - min(sizes) <= 1


def test_bad_launch_arguments_are_clear():
    with pytest.raises(ValueError, match="nproc"):
        D.launch(print, 0)
    with pytest.raises(ValueError, match="distributed"):
        D.resolve("yes")


@pytest.mark.slow
def test_torchrun_cli_matches_one_process(tmp_path):
    import subprocess
    import sys

    common = ["fit", "moons", "--steps", "20", "--num-points", "1000", "--batch-size", "128",
              "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc-per-node", "2", "-m", "pyro_flows_ext.cli", *common,
                    "--out", str(tmp_path / "two")], check=True, env=env, timeout=TIMEOUT)
    subprocess.run([sys.executable, "-m", "pyro_flows_ext.cli", *common,
                    "--out", str(tmp_path / "one")], check=True, env=env, timeout=TIMEOUT)
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    for key in ("train_nll", "val_nll", "test_nll"):
        assert abs(two[key] - one[key]) < 1e-4, key
