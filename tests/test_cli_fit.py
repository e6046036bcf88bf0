"""`pyro-flows fit`/`sample` in data units, resume, raw-data errors, and global-state scoping."""

import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import pyro_flows_ext as pfe
from pyro_flows_ext.cli import main
from pyro_flows_ext.io import FORMAT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_csv(path, n=1500, seed=0):
    """Correlated 2-D Gaussian rows far from the origin and at very different scales."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 2)) @ np.array([[1.0, 0.0], [0.8, 0.6]]).T
    data = z * [2.0, 300.0] + [10.0, -5000.0]
    np.savetxt(path, data, delimiter=",", header="a,b", comments="")
    return data


def printed(out, split):
    return float(re.search(rf"{split} NLL: (-?[0-9.]+)", out).group(1))


def test_csv_checkpoint_reloads_in_data_units_in_a_fresh_process(tmp_path, capsys):
    data = write_csv(tmp_path / "d.csv")
    out = tmp_path / "run"
    assert main(["fit", str(tmp_path / "d.csv"), "--steps", "30", "--out", str(out),
                 "--quiet", "--flow", "realnvp"]) == 0
    text = capsys.readouterr().out
    train_nll, test_nll = printed(text, "train"), printed(text, "test")
    metrics = json.loads((out / "metrics.json").read_text())
    n_test = metrics["n_test"]
    expected = ((len(data) - n_test) * train_nll + n_test * test_nll) / len(data)
    script = textwrap.dedent(f"""
        import numpy as np, torch
        import pyro_flows_ext as pfe
        torch.set_num_threads(1)
        flow = pfe.load({str(out / "model.pt")!r})
        x = torch.as_tensor(np.loadtxt({str(tmp_path / "d.csv")!r}, delimiter=",",
                                       skiprows=1), dtype=torch.float32)
        torch.manual_seed(0)
        with torch.no_grad():
            nll = -flow.log_prob(x).mean().item()
            s = flow.sample((20000,)).double()
        print(nll, *s.mean(0).tolist(), *torch.cov(s.T).flatten().tolist())
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    values = [float(v) for v in res.stdout.split()]
    nll, mean, cov = values[0], np.array(values[1:3]), np.array(values[3:]).reshape(2, 2)
    assert abs(nll - expected) < 2e-3  # the printed NLLs are rounded to 4 decimals
    # in data units: entropy of the data's Gaussian is about log(2 pi e) + log det^(1/2)
    data_cov = np.cov(data.T)
    entropy = np.log(2 * np.pi * np.e) + 0.5 * np.log(np.linalg.det(data_cov))
    assert entropy - 0.2 < nll < entropy + 0.3
    std = np.sqrt(np.diag(data_cov))
    assert (np.abs(mean - data.mean(0)) < 0.05 * std).all()
    assert (np.abs(cov - data_cov) < 0.1 * np.outer(std, std)).all()


def test_sample_command_is_in_data_units(tmp_path):
    data = write_csv(tmp_path / "d.csv", n=600)
    assert main(["fit", str(tmp_path / "d.csv"), "--steps", "10", "--out", str(tmp_path / "o"),
                 "--quiet"]) == 0
    assert main(["sample", str(tmp_path / "o" / "model.pt"), "-n", "4000",
                 "-o", str(tmp_path / "s.npy")]) == 0
    s = np.load(tmp_path / "s.npy")
    std = data.std(0)
    assert (np.abs(s.mean(0) - data.mean(0)) < 0.1 * std).all()
    assert (np.abs(s.std(0) / std - 1) < 0.1).all()


def test_nan_row_is_reported_as_the_row_of_the_file(tmp_path, capsys):
    data = np.random.default_rng(0).normal(size=(5000, 2))
    data[4321, 1] = np.nan
    np.savetxt(tmp_path / "d.csv", data, delimiter=",", header="a,b", comments="")
    assert main(["fit", str(tmp_path / "d.csv"), "--steps", "5", "--out", str(tmp_path / "o"),
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "1 row(s) with NaN or infinite values (first: row 4321 (line 4323 of the file)" in err
    assert err.count("\n") == 1


def test_resume_says_what_it_did_and_rejects_other_flows_and_data(tmp_path, capsys):
    write_csv(tmp_path / "d.csv", n=400)
    out = ["--out", str(tmp_path / "o"), "--quiet"]
    csv = str(tmp_path / "d.csv")
    assert main(["fit", csv, "--steps", "20"] + out) == 0
    capsys.readouterr()
    assert main(["fit", csv, "--steps", "20", "--resume"] + out) == 0
    assert "nothing was trained; pass a larger --steps" in capsys.readouterr().out
    assert main(["fit", csv, "--steps", "30", "--resume"] + out) == 0
    assert "continued from step 20 to step 30 of --steps 30 (a total): 10 more steps" in (
        capsys.readouterr().out)
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["steps"] == 30
    assert main(["fit", csv, "--steps", "40", "--resume", "--flow", "nsf"] + out) == 2
    err = capsys.readouterr().err
    assert "holds a different flow" in err and err.count("\n") == 1
    write_csv(tmp_path / "d.csv", n=400, seed=1)  # same shape, other values
    assert main(["fit", csv, "--steps", "40", "--resume"] + out) == 2
    err = capsys.readouterr().err
    assert "other data of the same shape" in err and err.count("\n") == 1


def test_help_says_steps_is_a_total(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "continues up to this total (it is not a number of additional steps)" in text


def test_main_restores_threads_and_rngs(tmp_path):
    torch.set_num_threads(1)
    torch.manual_seed(42)
    before = torch.get_rng_state()
    np.random.seed(3)
    np_before = np.random.get_state()[1].copy()
    assert main(["fit", "moons", "--steps", "3", "--n", "500", "--threads", "2", "--seed", "7",
                 "--out", str(tmp_path), "--quiet"]) == 0
    assert torch.get_num_threads() == 1
    assert torch.equal(torch.get_rng_state(), before)
    assert (np.random.get_state()[1] == np_before).all()


def test_old_checkpoint_with_data_loc_and_scale_loads_as_a_standardize_layer(tmp_path):
    # the flow an old version built for this spec (its defaults: ActNorm, conv, generative)
    old = pfe.flows.realnvp(2, num_layers=1, hidden_dims=(8,), gaussian_start=False,
                            **pfe.flows.LEGACY_DEFAULTS["realnvp"])
    with torch.no_grad():
        for p in old.parameters():
            p.add_(0.1 * torch.randn_like(p))
    loc, scale = torch.tensor([10.0, -5.0]), torch.tensor([2.0, 0.5])
    record = {"format": FORMAT, "spec": {"flow": "realnvp", "dim": 2,
                                         "kwargs": {"num_layers": 1, "hidden_dims": (8,)}},
              "state_dict": old.state_dict(), "data_loc": loc, "data_scale": scale}
    torch.save(record, tmp_path / "old.pt")
    flow = pfe.load(tmp_path / "old.pt").eval()
    old.eval()
    x = torch.randn(6, 2) * scale + loc
    expected = old.log_prob((x - loc) / scale) - scale.log().sum()
    torch.testing.assert_close(flow.log_prob(x), expected)
    assert type(flow.transforms[-1]).__name__ == "Standardize"
    assert main(["sample", str(tmp_path / "old.pt"), "-n", "3000",
                 "-o", str(tmp_path / "s.npy")]) == 0
    s = np.load(tmp_path / "s.npy")
    assert (np.abs(s.mean(0) - loc.numpy()) < 0.5 * scale.numpy()).all()


def test_spec_records_the_full_signature_and_reloads_identically(tmp_path):
    flow = pfe.flows.nsf(3, num_layers=2)
    kwargs = flow.spec["kwargs"]
    assert kwargs["count_bins"] == 8 and kwargs["hidden_dims"] == (64, 64)
    assert kwargs["gaussian_start"] is True and kwargs["standardize"] is False
    names = [type(t).__name__ for t in flow.transforms]
    assert (names[0], names[-1]) == ("CholeskyAffine", "Standardize")  # whiten="base"
    assert type(pfe.flows.nsf(3, whiten="data").transforms[-1]).__name__ == "CholeskyAffine"
    pfe.infer.fit_density(flow, torch.randn(300, 3) * 3 + 1, num_steps=5, progress=False)
    pfe.save(flow, tmp_path / "m.pt")
    loaded = pfe.load(tmp_path / "m.pt").eval()
    x = torch.randn(8, 3)
    torch.testing.assert_close(loaded.log_prob(x), flow.log_prob(x.clone()))
    assert loaded.spec == flow.spec
    rf = pfe.flows.residual_flow(2, num_blocks=1, n_power_terms=3)  # **block_kwargs flattened
    assert rf.spec["kwargs"]["n_power_terms"] == 3 and rf.spec["kwargs"]["lipschitz"] == 0.97
    assert type(pfe.load(_saved(rf, tmp_path)).transforms[0]).__name__ == "ResidualBlock"


def _saved(flow, tmp_path):
    pfe.save(flow, tmp_path / "rf.pt")
    return tmp_path / "rf.pt"
