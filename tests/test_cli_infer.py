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
    assert "NeuTra NUTS: 2 chains x 15 draws" in captured.out and "r_hat" in captured.out
    summary = (tmp_path / "summary.csv").read_text().splitlines()
    assert "r_hat" in summary[0] and any(line.startswith("tau,") for line in summary)
    # the command's --threads and --seed do not leak into the caller's process
    assert torch.get_num_threads() == threads and torch.equal(torch.get_rng_state(), rng)


def warning_lines(out):
    return [line for line in out.splitlines() if line.startswith("warning: ")]


def test_infer_warns_on_a_known_problem(tmp_path, capsys):
    """Centered eight schools, a 20-step guide and short NUTS: every problem gets its line."""
    rc = main(["infer", f"{SCHOOLS}:model", "--steps", "20", "--diag-samples", "500",
               "--neutra", "--num-samples", "20", "--warmup", "20", "--max-tree-depth", "3",
               "--quiet", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    lines = warning_lines(out)
    assert lines[0].startswith("warning: the guide's PSIS k-hat is")
    assert "not good enough for NeuTra" in lines[0] and "non-centred" in lines[0]
    assert "--flow none" not in lines[0]  # the default guide is what ran
    assert any("effective sample size below 100 per chain (200 for 2 chains): worst" in line
               for line in lines)
    assert any("R-hat above 1.01: worst" in line or "divergent" in line for line in lines)
    assert lines[-1].startswith("warning: ") and "do not trust this summary" in lines[-1]
    # the warnings come before the summary they qualify
    assert out.index(lines[1]) < out.index("posterior summary")
    khat = next(line for line in out.splitlines() if line.startswith("PSIS k-hat"))
    assert "tails are not too light" in khat and "never visits" in khat
    assert "NeuTra NUTS: 2 chains x 20 draws" in out
    evidence = next(line for line in out.splitlines() if "log evidence" in line)
    assert "+-" in evidence and "s.e." in evidence
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["chains"] == 2 and len(metrics["warnings"]) == len(lines) - 1
    assert metrics["log_evidence_se"] > 0


CONJUGATE = """import pyro, pyro.distributions as dist, torch
Y = torch.tensor([0.3, -0.5, 1.2, 0.8, 0.1])
def model():
    m = pyro.sample("m", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    with pyro.plate("data", 5):
        pyro.sample("y", dist.Normal(m[..., :1] + m[..., 1:], 1.0), obs=Y)
"""


def test_infer_quiet_on_a_clean_run(tmp_path, capsys):
    """A conjugate Gaussian posterior, a good guide and enough NUTS draws: no warning line.
    (R-hat above 1.01 trips by chance on about 1 clean run in 5 at 400 draws a chain, its
    noise being ~1/ESS: the chains are 1500 draws long.)"""
    rc = main(["infer", write(tmp_path, CONJUGATE) + ":model", "--flow", "none", "--steps",
               "1500", "--diag-samples", "4000", "--neutra", "--num-samples", "1500", "--warmup",
               "150", "--max-tree-depth", "4", "--quiet", "--out", str(tmp_path / "o"),
               "--seed", "0"])
    out = capsys.readouterr().out
    assert rc == 0
    assert warning_lines(out) == [], out
    assert "NeuTra NUTS: 2 chains x 1500 draws, 0 divergences" in out


def test_infer_chains_option(tmp_path, capsys):
    rc = main(["infer", write(tmp_path, CONJUGATE) + ":model", "--flow", "none", "--steps",
               "5", "--diag-samples", "10", "--neutra", "--num-samples", "5", "--warmup", "5",
               "--max-tree-depth", "2", "--chains", "1", "--quiet", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0 and "NeuTra NUTS: 1 chain x 5 draws" in out
    assert any(line.startswith("warning: one chain: R-hat cannot be computed")
               for line in warning_lines(out))
    assert main(["infer", "x.py:model", "--chains", "0"]) == 2
    assert "--chains must be a positive integer" in capsys.readouterr().err


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


def test_infer_jit_training(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["infer", f"{SCHOOLS}:model", "--jit", "--steps", "300", "--diag-samples", "400",
               "--num-samples", "40", "--quiet", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "does not trace" not in captured.out
    metrics = json.loads((out / "metrics.json").read_text())
    # eight schools' log evidence is about -31 to -32 (both parameterisations, NUTS/IW
    # estimates); a guide trained 300 traced steps lands within a few nats below it
    assert metrics["jit"] is True and -40 < metrics["elbo"] < -30, metrics


def test_infer_jit_falls_back_to_eager(tmp_path, capsys, monkeypatch):
    import pyro

    from pyro_flows_ext import cli

    class Untraceable(pyro.infer.Trace_ELBO):
        def loss_and_grads(self, *args, **kwargs):
            raise RuntimeError("cannot trace this model")

    monkeypatch.setattr(cli, "_elbo", lambda jit: Untraceable() if jit else
                        pyro.infer.Trace_ELBO())
    rc = main(["infer", f"{SCHOOLS}:model", "--jit", "--steps", "20", "--diag-samples", "50",
               "--num-samples", "20", "--quiet", "--out", str(tmp_path / "run")])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "warning: --jit: the model does not trace (cannot trace this model)" in captured.out
