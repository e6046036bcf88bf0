"""`pyro-flows infer`: an example model end to end, and one-line errors."""

import json
import os

import pytest
import torch

from pyro_flows_ext.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHOOLS = os.path.join(ROOT, "examples", "models", "eight_schools.py")


def test_infer_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["infer", f"{SCHOOLS}:model", "--flow", "realnvp", "--steps", "30",
               "--diag-samples", "50", "--num-samples", "40", "--quiet", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    for key in ("ELBO", "PSIS k-hat", "log evidence", "tau", "theta[7]"):
        assert key in captured.out
    for name in ("trace.png", "posterior.png", "summary.csv", "metrics.json"):
        assert (out / name).stat().st_size > 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["flow"] == "realnvp" and metrics["khat"] == metrics["khat"]


def test_infer_neutra(tmp_path, capsys):
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    rc = main(["infer", f"{SCHOOLS}:model_noncentered", "--flow", "realnvp", "--steps", "20",
               "--diag-samples", "20", "--neutra", "--num-samples", "15", "--warmup", "10",
               "--max-tree-depth", "4", "--quiet", "--out", str(tmp_path),
               "--threads", str(threads + 1)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "NeuTra NUTS: 15 draws" in captured.out and "r_hat" in captured.out
    summary = (tmp_path / "summary.csv").read_text().splitlines()
    assert "r_hat" in summary[0] and any(line.startswith("tau,") for line in summary)
    # the command's --threads and --seed do not leak into the caller's process
    assert torch.get_num_threads() == threads and torch.equal(torch.get_rng_state(), rng)


def write(tmp_path, text):
    path = tmp_path / "m.py"
    path.write_text(text)
    return str(path)


BROKEN = "import pyro, pyro.distributions as dist\ndef model():\n    raise KeyError('boom')\n"


@pytest.mark.parametrize("spec, message", [
    ("missing.py:model", "model file 'missing.py' does not exist"),
    (f"{SCHOOLS}:nope", "has no function 'nope' (found: model, model_noncentered)"),
    ("BROKEN:model", "the model failed to run with no arguments: KeyError: 'boom'"),
    ("SYNTAX:model", "could not import"),
    ("EMPTY:model", "no latent sample sites"),
], ids=["missing-file", "missing-function", "fails-to-trace", "bad-import", "no-latents"])
def test_infer_errors_are_one_line(tmp_path, capsys, spec, message):
    if spec.startswith("BROKEN"):
        spec = write(tmp_path, BROKEN) + ":model"
    elif spec.startswith("SYNTAX"):
        spec = write(tmp_path, "def model(:\n") + ":model"
    elif spec.startswith("EMPTY"):
        spec = write(tmp_path, "def model():\n    pass\n") + ":model"
    rc = main(["infer", spec, "--steps", "5", "--quiet", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err
    assert err.count("\n") == 1 and err.startswith("pyro-flows: error:")


def test_infer_unknown_flow(tmp_path, capsys):
    assert main(["infer", f"{SCHOOLS}:model", "--flow", "nope", "--quiet"]) == 2
    assert "unknown flow 'nope'" in capsys.readouterr().err
