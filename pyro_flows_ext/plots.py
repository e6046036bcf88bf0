"""Figures: 2-D density heat map, sample scatter, training curve, image grid.

Built on :class:`matplotlib.figure.Figure` with the Agg canvas, never pyplot or
``matplotlib.use``, so importing this module leaves a notebook's backend alone. Every
function returns the figure and, given ``path``, also writes it there as a PNG.
"""

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["data_bounds", "density_grid", "image_grid", "loss_limits", "plot_density",
           "plot_images", "plot_samples", "plot_training"]


def _figure(width, height):
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path):
    if path is not None:
        fig.savefig(path, dpi=100, bbox_inches="tight")
    return fig


def _flow_ref(flow):
    for t in (*flow.parameters(), *flow.buffers()):
        if t.is_floating_point():
            return t
    return torch.zeros(())


def data_bounds(data, margin=0.1, quantile=0.005):
    """Per-axis plot bounds ``((x0, x1), (y0, y1))`` covering the data's central
    ``1 - 2 * quantile`` share on each axis, widened by ``margin`` of the range."""
    x = torch.as_tensor(data).detach().cpu().double()[:, :2]
    lo = torch.quantile(x, quantile, dim=0) if len(x) > 1 else x.min(0).values
    hi = torch.quantile(x, 1 - quantile, dim=0) if len(x) > 1 else x.max(0).values
    width = (hi - lo).clamp_min(1e-12)
    lo, hi = lo - margin * width, hi + margin * width
    return tuple((float(a), float(b)) for a, b in zip(lo, hi))


def _axes_bounds(bounds):
    """``((x0, x1), (y0, y1))`` from a shared ``(lo, hi)`` or per-axis bounds."""
    if np.ndim(bounds[0]) == 0:
        return (tuple(map(float, bounds)),) * 2
    return tuple(tuple(map(float, b)) for b in bounds)


@torch.no_grad()
def density_grid(flow, bounds=(-4.0, 4.0), resolution=200):
    """``(xs, ys, p)``: the flow's density (in the flow's own units) on a ``resolution``^2 grid
    over ``bounds`` (a shared ``(lo, hi)`` or per-axis ``((x0, x1), (y0, y1))``)."""
    ref = _flow_ref(flow)
    (x0, x1), (y0, y1) = _axes_bounds(bounds)
    ax = torch.linspace(x0, x1, resolution, dtype=ref.dtype, device=ref.device)
    ay = torch.linspace(y0, y1, resolution, dtype=ref.dtype, device=ref.device)
    xx, yy = torch.meshgrid(ax, ay, indexing="xy")
    pts = torch.stack([xx.flatten(), yy.flatten()], -1)
    was_training = flow.training
    flow.eval()
    try:
        logp = torch.cat([flow.log_prob(p) for p in pts.split(10_000)])
    finally:
        flow.train(was_training)
    return xx.cpu().numpy(), yy.cpu().numpy(), logp.exp().reshape(xx.shape).cpu().numpy()


def plot_density(flow, path=None, bounds=None, resolution=200, title="learned density",
                 data=None, labels=("x1", "x2")):
    """Heat map of a 2-D flow's density with a colour bar and axis labels. ``bounds`` default
    to the range of ``data`` (in the flow's units, i.e. the data's), else ``(-4, 4)``."""
    if bounds is None:
        bounds = data_bounds(data) if data is not None else (-4.0, 4.0)
    (x0, x1), (y0, y1) = _axes_bounds(bounds)
    xx, yy, p = density_grid(flow, ((x0, x1), (y0, y1)), resolution)
    fig = _figure(6, 5)
    ax = fig.add_subplot()
    mesh = ax.pcolormesh(xx, yy, p, shading="auto", cmap="viridis")
    fig.colorbar(mesh, ax=ax, label="density p(x)")
    ax.set(title=title, xlabel=labels[0], ylabel=labels[1], xlim=(x0, x1), ylim=(y0, y1))
    return _save(fig, path)


@torch.no_grad()
def plot_samples(flow, path=None, n=5000, data=None, bounds=None, labels=("x1", "x2")):
    """Scatter of ``n`` flow samples (beside ``data`` when given), on shared axes."""
    x = flow.sample((n,)).cpu().numpy()
    panels = [("flow samples", x)]
    if data is not None:
        panels.append(("data", torch.as_tensor(data)[:n].detach().cpu().numpy()))
    if bounds is None:
        bounds = data_bounds(panels[-1][1])
    (x0, x1), (y0, y1) = _axes_bounds(bounds)
    fig = _figure(5 * len(panels), 5)
    for i, (title, pts) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.5)
        ax.set(title=title, xlabel=labels[0], ylabel=labels[1], xlim=(x0, x1), ylim=(y0, y1))
    return _save(fig, path)


def loss_limits(values, low=1.0, high=99.0, margin=0.1):
    """Y-limits from the ``low``-``high`` percentiles of ``values`` with a ``margin``, so a
    few spikes (a 200-nat minibatch among 2-nat ones) do not flatten the curve."""
    v = np.asarray([u for u in values if np.isfinite(u)], dtype=float)
    if len(v) == 0:
        return None
    lo, hi = np.percentile(v, [low, high])
    span = max(hi - lo, 1e-6 * max(1.0, abs(hi)))
    return lo - margin * span, hi + margin * span


def plot_training(history, path=None, title="training", units="nats"):
    """Training loss per step and validation NLL (markers; step 0 is the start), with y-limits
    from robust percentiles of both; points outside are marked at the edge."""
    loss = np.asarray(history["loss"], dtype=float)
    steps = np.arange(1, len(loss) + 1)
    val_steps = np.asarray(history.get("val_step", []), dtype=float)
    val = np.asarray(history.get("val_nll", []), dtype=float)
    fig = _figure(7, 4)
    ax = fig.add_subplot()
    if len(loss):
        ax.plot(steps, loss, lw=0.8, alpha=0.6, color="C0", label="training minibatch NLL")
    if len(val):
        ax.plot(val_steps, val, "o-", ms=3, color="C1", label="validation NLL")
        best = history.get("best_step")
        if best is not None and best in val_steps:
            ax.axvline(best, color="C2", ls="--", lw=1, label=f"best step {best}")
    limits = loss_limits(np.concatenate([loss, val]))
    if limits is not None:
        ax.set_ylim(*limits)
        clipped = steps[loss > limits[1]] if len(loss) else []
        if len(clipped):
            ax.plot(clipped, np.full(len(clipped), limits[1]), "^", color="C3", ms=4,
                    label=f"{len(clipped)} step(s) above the axis")
    ax.set(xlabel="step", ylabel=f"NLL per event ({units})", title=title)
    ax.legend(loc="upper right", fontsize="small")
    return _save(fig, path)


def image_grid(images, ncol=10, pad=1, fill=None):
    """``(N, C, H, W)`` images (C = 1 or 3) tiled into one ``(rows * (H + pad) - pad, ncol *
    (W + pad) - pad[, 3])`` numpy array, row by row; gaps and missing tiles hold ``fill``
    (default: the images' maximum, a light frame)."""
    x = torch.as_tensor(images).detach().cpu().double()
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"image_grid expects images (N, C, H, W) with 1 or 3 channels, got "
                         f"shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    ncol = max(1, min(int(ncol), n))
    rows = -(-n // ncol)
    fill = float(x.max()) if fill is None and n else (fill or 0.0)
    grid = torch.full((c, rows * (h + pad) - pad, ncol * (w + pad) - pad), fill,
                      dtype=torch.float64)
    for i in range(n):
        r, q = divmod(i, ncol)
        grid[:, r * (h + pad): r * (h + pad) + h, q * (w + pad): q * (w + pad) + w] = x[i]
    return grid[0].numpy() if c == 1 else grid.permute(1, 2, 0).numpy()


def plot_images(images, path=None, ncol=10, title=None, vmax=None, row_labels=None):
    """A grid of ``(N, C, H, W)`` images (grey levels for one channel, black = 0), ``ncol`` per
    row, optionally with a label per row (e.g. the digit class of a conditional model's
    samples). ``vmax``: the white level (default: the images' maximum, e.g. ``k - 1``)."""
    x = torch.as_tensor(images).detach().cpu().double()
    ncol = max(1, min(int(ncol), len(x)))
    vmax = float(x.max()) if vmax is None else float(vmax)
    grid = image_grid(x, ncol, fill=0.4 * vmax)  # grey gaps between black-background tiles
    rows = -(-len(x) // ncol)
    fig = _figure(max(3.0, 0.6 * ncol), max(2.0, 0.6 * rows + (0.4 if title else 0.0)))
    ax = fig.add_subplot()
    if grid.ndim == 3:
        ax.imshow(np.clip(grid / max(vmax, 1e-12), 0, 1), interpolation="nearest")
    else:
        ax.imshow(grid, cmap="gray", vmin=0.0, vmax=vmax, interpolation="nearest")
    ax.set_xticks([])
    if row_labels is not None:
        h = x.shape[-2]
        ax.set_yticks([r * (h + 1) + (h - 1) / 2 for r in range(len(row_labels))])
        ax.set_yticklabels([str(v) for v in row_labels])
    else:
        ax.set_yticks([])
    if title:
        ax.set_title(title)
    return _save(fig, path)
