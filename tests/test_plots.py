import os
import subprocess
import sys

import numpy as np
import torch

import pyro_flows_ext as pfe
from pyro_flows_ext import plots

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_importing_plots_leaves_the_backend_and_pyplot_alone():
    script = ("import matplotlib; matplotlib.use('svg'); import pyro_flows_ext.plots, sys; "
              "print(matplotlib.get_backend(), 'matplotlib.pyplot' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["svg", "False"]


def test_loss_limits_ignore_a_spike():
    rng = np.random.default_rng(0)
    loss = list(2 + 0.1 * rng.normal(size=1000))
    loss[216] = 202.0  # one minibatch spike, as in the default moons run
    lo, hi = plots.loss_limits(loss)
    assert 1.5 < lo < 2 < hi < 3  # the curve fills the axis; the spike is off it
    fig = plots.plot_training({"loss": loss, "val_step": [0, 500, 1000],
                               "val_nll": [2.5, 2.1, 2.05], "best_step": 1000})
    ax = fig.axes[0]
    assert np.allclose(ax.get_ylim(), plots.loss_limits(loss + [2.5, 2.1, 2.05]))
    assert ax.get_ylim()[1] < 3
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "validation NLL" in labels and any("above the axis" in t for t in labels)
    assert ax.get_ylabel() == "NLL per event (nats)"


def test_density_plot_has_colour_bar_labels_and_data_bounds(tmp_path):
    data = torch.randn(2000, 2) * torch.tensor([2.0, 300.0]) + torch.tensor([10.0, -5000.0])
    flow = pfe.flows.realnvp(2, num_layers=1, hidden_dims=(8,))
    pfe.infer.fit_density(flow, data, num_steps=0, progress=False)  # the Gaussian fit
    fig = plots.plot_density(flow, tmp_path / "d.png", data=data, title="test NLL 1.00 nats")
    assert (tmp_path / "d.png").stat().st_size > 0
    ax, bar = fig.axes
    assert bar.get_ylabel() == "density p(x)"
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("x1", "x2", "test NLL 1.00 nats")
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    assert x0 < 10 < x1 and 4 < x1 - x0 < 20 and y0 < -5000 < y1 and 600 < y1 - y0 < 3000
    # the grid holds the density in data units: it integrates to about 1 over the data's box
    xx, yy, p = plots.density_grid(flow, ((x0, x1), (y0, y1)), 150)
    cell = (xx[0, 1] - xx[0, 0]) * (yy[1, 0] - yy[0, 0])
    assert 0.9 < p.sum() * cell < 1.01


def test_samples_plot(tmp_path):
    flow = pfe.flows.realnvp(2, num_layers=1, hidden_dims=(8,))
    fig = plots.plot_samples(flow, tmp_path / "s.png", n=200, data=torch.randn(300, 2))
    assert len(fig.axes) == 2 and (tmp_path / "s.png").stat().st_size > 0
