"""Figures: 2-D density heat map, sample scatter, training curve (matplotlib, Agg)."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

__all__ = ["density_grid", "plot_density", "plot_samples", "plot_training"]


@torch.no_grad()
def density_grid(flow, bounds=(-4.0, 4.0), resolution=200):
    """``(xs, ys, p)``: the flow's density on a ``resolution``^2 grid over ``bounds``^2."""
    ref = next(flow.parameters(), torch.zeros(()))
    lo, hi = bounds
    axis = torch.linspace(lo, hi, resolution, dtype=ref.dtype, device=ref.device)
    xx, yy = torch.meshgrid(axis, axis, indexing="xy")
    pts = torch.stack([xx.flatten(), yy.flatten()], -1)
    logp = torch.cat([flow.log_prob(p) for p in pts.split(10_000)])
    return xx.cpu().numpy(), yy.cpu().numpy(), logp.exp().reshape(xx.shape).cpu().numpy()


def plot_density(flow, path, bounds=(-4.0, 4.0), resolution=200, title="learned density"):
    """Writes a heat map of a 2-D flow's density to ``path``."""
    xx, yy, p = density_grid(flow, bounds, resolution)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.pcolormesh(xx, yy, p, shading="auto", cmap="viridis")
    ax.set(title=title, aspect="equal", xlim=bounds, ylim=bounds)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


@torch.no_grad()
def plot_samples(flow, path, n=5000, data=None, bounds=(-4.0, 4.0)):
    """Writes a scatter of ``n`` flow samples (beside ``data`` when given) to ``path``."""
    x = flow.sample((n,)).cpu().numpy()
    panels = [("flow samples", x)]
    if data is not None:
        panels.append(("data", torch.as_tensor(data)[:n].cpu().numpy()))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 5), squeeze=False)
    for ax, (title, pts) in zip(axes[0], panels):
        ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.5)
        ax.set(title=title, aspect="equal", xlim=bounds, ylim=bounds)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def plot_training(history, path):
    """Writes the training loss (per step) and validation NLL curve to ``path``."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(range(1, len(history["loss"]) + 1), history["loss"], lw=0.8, alpha=0.7, label="train")
    if history.get("val_nll"):
        ax.plot(history["val_step"], history["val_nll"], "o-", label="validation")
    ax.set(xlabel="step", ylabel="NLL (nats)", title="training")
    ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
