"""Image data end to end: a dequantized Glow on digits from Python and from the CLI."""

import json
import math

import numpy as np
import pyro
import pytest
import torch

import pyro_flows_ext as pfe
from pyro_flows_ext.cli import main
from pyro_flows_ext.infer import bits_per_dim, categorical_bits_per_dim, iw_bits_per_dim
from pyro_flows_ext.surjections import UniformDequantization, VariationalDequantization
from pyro_flows_ext.transforms import Logit


def small_glow(**kwargs):
    return pfe.flows.glow((1, 8, 8), levels=2, steps_per_level=2, hidden_channels=16, k=17,
                          **kwargs)


@pytest.mark.parametrize("dequantize", ["uniform", "variational"])
def test_glow_dequantize_option_builds_saves_and_loads(dequantize, tmp_path):
    flow = small_glow(dequantize=dequantize)
    deq = (UniformDequantization if dequantize == "uniform" else VariationalDequantization)
    assert isinstance(flow.transforms[-1], deq) and isinstance(flow.transforms[-2], Logit)
    assert not flow.is_exact and flow.event_shape == (1, 8, 8)
    assert flow.spec["kwargs"]["dequantize"] == dequantize and flow.spec["kwargs"]["k"] == 17
    x = pfe.datasets.digits("test")[:20].float()
    flow.log_prob(x)  # training mode: sets the ActNorms
    s = flow.sample((6,))
    assert s.shape == (6, 1, 8, 8) and (s == s.floor()).all() and 0 <= s.min() <= s.max() <= 16
    pfe.save(flow, tmp_path / "g.pt")
    loaded = pfe.load(tmp_path / "g.pt")
    flow.eval(), loaded.eval()
    torch.manual_seed(3)
    mine = flow.log_prob(x.clone())
    torch.manual_seed(3)
    torch.testing.assert_close(loaded.log_prob(x.clone()), mine)
    with pytest.raises(ValueError, match="dequantize"):
        small_glow(dequantize="gaussian")


def test_glow_on_digits_beats_the_per_pixel_categorical_baseline():
    train, test = pfe.datasets.digits("train"), pfe.datasets.digits("test")
    baseline = categorical_bits_per_dim(train, test, 17)
    assert 2.3 < baseline < 2.5  # scikit-learn's digits: about 2.42 bits/dim
    flow = small_glow(dequantize="uniform")
    pfe.infer.fit_density(flow, train.float(), num_steps=300, batch_size=64, progress=False,
                          optim=pyro.optim.Adam({"lr": 3e-3}))
    bpd = bits_per_dim(flow, test)
    # below the baseline; far above zero (a lost log k term would be 4.09 bits lower)
    assert 1.5 < bpd < baseline - 0.05
    torch.manual_seed(1)
    iw = iw_bits_per_dim(flow, test, num_samples=8)
    assert bpd - 0.1 < iw < bpd + 0.01  # tighter (lower) than the single-draw bound


def test_cli_fit_digits_writes_files_and_prints_bits(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["fit", "digits", "--flow", "glow", "--steps", "20", "--hidden-channels", "8",
                 "--steps-per-level", "1", "--iw-samples", "3", "--factor-out", "maxpool",
                 "--quiet", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    for name in ("model.pt", "metrics.json", "loss.png", "samples.png"):
        assert (out / name).exists(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["factor_out"] == "maxpool" and metrics["iw_samples"] == 3
    for key in ("test_bits_per_dim", "test_iw_bits_per_dim", "categorical_bits_per_dim"):
        assert f"{metrics[key]:.4f}" in printed
        assert 1.0 < metrics[key] < 2 * math.log2(17)
    flow = pfe.load(out / "model.pt")
    assert flow.sample((2,)).shape == (2, 1, 8, 8)
    # pyro-flows sample: .npy keeps the image shape and the integer levels, .csv a row each
    npy, csv = str(tmp_path / "s.npy"), str(tmp_path / "s.csv")
    assert main(["sample", str(out / "model.pt"), "-n", "3", "-o", npy]) == 0
    assert main(["sample", str(out / "model.pt"), "-n", "3", "-o", csv]) == 0
    images = np.load(npy)
    assert images.shape == (3, 1, 8, 8)
    assert np.all(images == np.round(images)) and images.min() >= 0 and images.max() <= 16
    assert np.loadtxt(csv, delimiter=",").shape == (3, 64)


@pytest.mark.parametrize("argv,message", [
    (["--flow", "realnvp"], "needs an image flow: --flow glow"),
    (["--flow", "glow", "--levels", "4"], "divisible by 16"),
    (["--flow", "glow", "--iw-samples", "0"], "--iw-samples must be a positive integer"),
], ids=["vector-flow", "too-many-levels", "iw-samples"])
def test_cli_fit_digits_bad_options_are_one_line_errors(argv, message, capsys, tmp_path):
    code = main(["fit", "digits", "--steps", "1", "--quiet", "--out", str(tmp_path)] + argv)
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_plot_images_grid():
    from pyro_flows_ext import plots

    x = pfe.datasets.digits("test")[:23]
    grid = plots.image_grid(x, ncol=10)
    assert grid.shape == (3 * 9 - 1, 10 * 9 - 1)
    assert (grid[:8, :8] == x[0, 0].numpy()).all() and (grid[18:, 27:] == 16).all()
    fig = plots.plot_images(x, ncol=10, vmax=16, row_labels=[0, 1, 2])
    assert len(fig.axes) == 1
    with pytest.raises(ValueError, match="1 or 3 channels"):
        plots.image_grid(torch.zeros(2, 2, 4, 4))


def test_cli_fit_digits_conditional(tmp_path, capsys):
    out = tmp_path / "cond"
    code = main(["fit", "digits", "--flow", "glow", "--conditional", "--steps", "5",
                 "--hidden-channels", "8", "--steps-per-level", "1", "--iw-samples", "2",
                 "--quiet", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "given its class" in printed and (out / "samples.png").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["conditional"] and metrics["val_nll"] is None
    flow = pfe.load(out / "model.pt")
    three = torch.eye(10)[3]
    assert flow.condition(three).sample((4,)).shape == (4, 1, 8, 8)


def test_cli_fit_digits16_uses_three_levels(tmp_path, capsys):
    out = tmp_path / "d16"
    code = main(["fit", "digits16", "--flow", "glow", "--steps", "3", "--hidden-channels", "4",
                 "--steps-per-level", "1", "--iw-samples", "2", "--dequantize", "variational",
                 "--quiet", "--out", str(out)])
    assert code == 0, capsys.readouterr()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["levels"] == 3 and metrics["dequantize"] == "variational"
    flow = pfe.load(out / "model.pt")
    assert flow.event_shape == (1, 16, 16) and flow.base_dist.event_shape == (16, 2, 2)
    assert flow.sample((2,)).shape == (2, 1, 16, 16)
