import json
import math
import re

import numpy as np
import pytest
import torch

import pyro_flows_ext as pfe
from pyro_flows_ext.cli import main


def test_fit_and_sample_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["fit", "moons", "--steps", "30", "--n", "2000", "--out", str(out),
                 "--quiet"]) == 0
    for name in ("model.pt", "metrics.json", "density.png", "samples.png", "loss.png"):
        assert (out / name).stat().st_size > 0, name
    metrics = json.loads((out / "metrics.json").read_text())
    assert np.isfinite(metrics["test_nll"]) and metrics["exact"]
    assert "test NLL" in capsys.readouterr().out
    assert main(["sample", str(out / "model.pt"), "-n", "7", "-o", str(tmp_path / "s.csv")]) == 0
    assert np.loadtxt(tmp_path / "s.csv", delimiter=",").shape == (7, 2)
    # resume continues from the checkpoint
    assert main(["fit", "moons", "--steps", "40", "--n", "2000", "--out", str(out), "--quiet",
                 "--resume"]) == 0
    assert json.loads((out / "metrics.json").read_text())["steps"] == 40


def test_fit_a_csv_file_in_its_own_units(tmp_path, capsys):
    # scales whose log-sum (log 200 = 5.3 nats) is the unit conversion under test
    loc, scale = np.array([100.0, -3.0, 0.0]), np.array([10.0, 0.5, 40.0])
    data = np.random.default_rng(0).normal(size=(2000, 3)) * scale + loc
    path = tmp_path / "d.csv"
    np.savetxt(path, data, delimiter=",", header="a,b,c", comments="")
    assert main(["fit", str(path), "--steps", "20", "--out", str(tmp_path / "o"), "--quiet"]) == 0
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    printed = re.search(r"test NLL[^:\n]*: (-?[\d.]+)", capsys.readouterr().out)
    assert printed and abs(float(printed.group(1)) - metrics["test_nll"]) < 1e-3
    # the Gaussian's entropy in closed form, in the data's units
    entropy = 1.5 * math.log(2 * math.pi * math.e) + np.log(scale).sum()
    # a held-out NLL estimates it with s.e. sqrt(D / 2) / sqrt(n_test); the flow starts at
    # (or near) the Gaussian fit, so allow that and 0.1 nats of fitting error on either side
    se = math.sqrt(1.5 / metrics["n_test"])
    assert entropy - 3 * se < metrics["test_nll"] < entropy + 3 * se + 0.1, metrics["test_nll"]
    assert main(["sample", str(tmp_path / "o" / "model.pt"), "-n", "2000",
                 "-o", str(tmp_path / "s.npy")]) == 0
    samples = np.load(tmp_path / "s.npy")
    assert (np.abs(samples.mean(0) - loc) < 5 * scale / math.sqrt(2000)).all()  # data units
    assert (np.abs(samples.std(0) / scale - 1) < 0.1).all()


@pytest.mark.parametrize("argv, message", [
    (["fit", "moons", "--flow", "nope"], "unknown flow 'nope'"),
    (["fit", "nowhere.csv"], "neither a toy data set"),
    (["fit", "moons", "--steps", "0"], "--steps must be a positive integer"),
    (["fit", "moons", "--lr", "-1"], "--lr must be positive"),
    (["fit", "moons", "--device", "nodevice"], "device 'nodevice' is not usable"),
    (["sample", "missing.pt"], "does not exist"),
])
def test_cli_errors_are_one_line(argv, message, capsys, tmp_path):
    assert main(argv + (["--out", str(tmp_path)] if argv[0] == "fit" else [])) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_sample_rejects_a_foreign_file(tmp_path, capsys):
    (tmp_path / "x.pt").write_text("hello")
    assert main(["sample", str(tmp_path / "x.pt")]) == 2
    assert "could not load model file" in capsys.readouterr().err
    # a corrupt pickle: torch's advice to retry with weights_only=False (which would run a
    # foreign file's code and cannot fix a corrupt one) is not passed on
    (tmp_path / "y.pt").write_bytes(b"\x80\x02garbage" * 50)
    assert main(["sample", str(tmp_path / "y.pt")]) == 2
    err = capsys.readouterr().err
    assert "could not load model file" in err and "weights_only" not in err


def test_toy_sets_are_seeded_and_shaped():
    for name in pfe.datasets.TOY:
        a, b = pfe.datasets.toy(name, 500, seed=3), pfe.datasets.toy(name, 500, seed=3)
        assert a.shape == (500, 2) and torch.equal(a, b) and torch.isfinite(a).all()
    with pytest.raises(ValueError, match="unknown toy data set"):
        pfe.datasets.toy("circles")


def test_checkerboard_is_uniform_on_its_squares():
    x = pfe.datasets.toy("checkerboard", 20000)
    cells = torch.floor(x / 2).long() + 2  # 4 x 4 cells of side 2 on [-4, 4]^2
    assert ((cells >= 0) & (cells < 4)).all()
    assert ((cells[:, 0] + cells[:, 1]) % 2 == 0).all()  # only the dark squares
    counts = torch.bincount(cells[:, 0] * 4 + cells[:, 1], minlength=16).float()
    occupied = counts[counts > 0]
    assert len(occupied) == 8 and (occupied / occupied.mean() - 1).abs().max() < 0.1


def test_load_csv_npy_npz(tmp_path):
    data = np.arange(12.0).reshape(4, 3)
    np.savetxt(tmp_path / "a.csv", data, delimiter=",")
    np.save(tmp_path / "b.npy", data)
    np.savez(tmp_path / "c.npz", data=data)
    for name in ("a.csv", "b.npy", "c.npz"):
        torch.testing.assert_close(pfe.datasets.load(tmp_path / name), torch.tensor(data).float())
    with pytest.raises(ValueError, match="unsupported extension"):
        (tmp_path / "d.txt").write_text("1,2")
        pfe.datasets.load(tmp_path / "d.txt")
    with pytest.raises(FileNotFoundError):
        pfe.datasets.load(tmp_path / "none.csv")
