"""Maximum-likelihood fitting of a flow to data with a Pyro optimizer."""

import math
import os
import warnings

import pyro
import pyro.optim
import torch
from tqdm.auto import tqdm

from ..io import FORMAT, atomic_save, read, to_record

MIN_ROWS = 10


class TrainingDiverged(UserWarning):
    """Training stopped on a non-finite loss; the last good parameters were restored."""


def as_data(data, flow, name="data"):
    """``data`` as a tensor on the flow's device and dtype, checked for shape and values."""
    ref = next(flow.parameters(), None)
    dtype = ref.dtype if ref is not None else torch.get_default_dtype()
    device = ref.device if ref is not None else None
    data = torch.as_tensor(data, dtype=dtype, device=device)
    event = tuple(flow.event_shape)
    if data.dim() != 1 + len(event) or tuple(data.shape[1:]) != event:
        raise ValueError(f"{name} must have shape (N, {', '.join(map(str, event))}): "
                         f"expected events of shape {event}, got an array of shape "
                         f"{tuple(data.shape)}")
    bad = ~torch.isfinite(data.reshape(len(data), -1)).all(-1)
    if bad.any():
        rows = bad.nonzero().flatten()
        raise ValueError(f"{name} has {len(rows)} row(s) with NaN or infinite values (first: "
                         f"row {rows[0].item()}); expected finite numbers: drop or impute them")
    return data


def _make_optimizer(optim, params, flow):
    """One torch optimizer over all parameters when the Pyro optimizer allows it (much less
    per-step overhead than one optimizer per parameter); otherwise Pyro's own per-parameter
    stepping. Returns ``(zero_grad, step, torch_optimizer_or_None)``."""
    if isinstance(optim, torch.optim.Optimizer):
        return optim.zero_grad, optim.step, optim
    if not isinstance(optim, pyro.optim.PyroOptim):
        raise TypeError(f"optim must be a pyro.optim optimizer (e.g. pyro.optim.Adam"
                        f"({{'lr': 1e-3}})) or a torch optimizer, got {type(optim).__name__}")
    if isinstance(optim.pt_optim_args, dict) and not isinstance(optim, pyro.optim.PyroLRScheduler):
        opt = optim.pt_optim_constructor(params, **optim.pt_optim_args)
        return opt.zero_grad, opt.step, opt

    pyro.module("flow", flow)  # per-parameter arguments are looked up by param-store name

    def zero_grad():
        for p in params:
            p.grad = None

    return zero_grad, lambda: optim(params), None


def _batches(n, batch_size, generator, device):
    """Endless shuffled minibatch indices (each epoch a new permutation)."""
    while True:
        perm = torch.randperm(n, generator=generator).to(device)
        for i in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
            yield perm[i:i + batch_size]


@torch.no_grad()
def mean_nll(flow, data, chunk=10_000):
    """Mean negative log-likelihood of ``data`` in eval mode (nats per event)."""
    was_training = flow.training
    flow.eval()
    total = 0.0
    for part in data.split(chunk):
        total += -flow.log_prob(part).sum().item()
    flow.train(was_training)
    return total / len(data)


def _snapshot(flow):
    return {k: v.detach().clone() for k, v in flow.state_dict().items()}


def fit_density(flow, data, num_steps=2000, batch_size=512, optim=None, val_fraction=0.1,
                val_data=None, eval_every=100, patience=None, checkpoint=None, resume=False,
                progress=True, seed=0, clip_norm=None):
    r"""Fits ``flow`` to ``data`` by minibatch maximum likelihood, :math:`\min -\frac1B
    \sum_b \log p(x_b)`, with a Pyro optimizer.

    A validation split is scored every ``eval_every`` steps; the best parameters are restored
    at the end (and training stops early after ``patience`` evaluations without progress).
    A non-finite loss stops training with a :class:`TrainingDiverged` warning and restores
    the last good (best validated) parameters; the checkpoint is never overwritten with them.
    The flow is left in eval mode.

    Args:
        flow: a :class:`~pyro_flows_ext.Flow` (any module-distribution with ``log_prob``).
        data: ``(N, *event_shape)`` tensor or array.
        num_steps: optimisation steps.
        batch_size: minibatch size.
        optim: a ``pyro.optim`` optimizer; default ``pyro.optim.Adam({"lr": 1e-3})``.
        val_fraction: share of ``data`` held out for validation (ignored with ``val_data``).
        val_data: explicit validation set.
        eval_every: steps between validations (and checkpoints).
        patience: stop after this many validations without improvement (None: never).
        checkpoint: path of a checkpoint file written at every validation.
        resume: continue from ``checkpoint`` if it exists.
        progress: show a tqdm progress bar.
        seed: seed of the split and minibatch order.
        clip_norm: clip the gradient norm to this value.
    Returns:
        history dict: ``loss`` per step, ``val_step``/``val_nll``, ``best_step``,
        ``best_val_nll``, ``stopped`` (None or the reason).
    """
    data = as_data(data, flow)
    generator = torch.Generator().manual_seed(seed)
    if val_data is None:
        n_val = int(round(len(data) * val_fraction))
        perm = torch.randperm(len(data), generator=generator).to(data.device)
        data, val = data[perm[n_val:]], data[perm[:n_val]]
    else:
        val = as_data(val_data, flow, "val_data")
    if len(data) < MIN_ROWS:
        raise ValueError(f"need at least {MIN_ROWS} training rows, got {len(data)}")
    if len(val) == 0:
        val = data
    if checkpoint is not None and getattr(flow, "spec", None) is None:
        to_record(flow)  # raises the clear "not made by a builder" error now, not at step 100
    params = [p for p in flow.parameters() if p.requires_grad]
    zero_grad, opt_step, torch_opt = _make_optimizer(optim or pyro.optim.Adam({"lr": 1e-3}),
                                                     params, flow)

    history = {"loss": [], "val_step": [], "val_nll": [], "best_step": 0,
               "best_val_nll": math.inf, "stopped": None}
    start, best_state = 0, None
    if resume and checkpoint is not None and os.path.exists(checkpoint):
        record = read(checkpoint)
        if record.get("format") != FORMAT or "current_state" not in record:
            raise ValueError(f"{checkpoint} is not a fit_density checkpoint; cannot resume")
        flow.load_state_dict(record["current_state"])
        if torch_opt is not None and record.get("optimizer") is not None:
            torch_opt.load_state_dict(record["optimizer"])
        start, history, best_state = record["step"], record["history"], record["state_dict"]
    flow.train()
    if best_state is None:
        best_state = _snapshot(flow)

    def save_checkpoint(step):
        if checkpoint is None:
            return
        record = to_record(flow)
        record.update(state_dict=best_state, current_state=_snapshot(flow), step=step,
                      history=history, optimizer=torch_opt.state_dict() if torch_opt else None)
        atomic_save(record, checkpoint)

    def stop_diverged(step, what):
        history["stopped"] = f"{what} at step {step}"
        flow.load_state_dict(best_state)
        warnings.warn(f"training stopped: {what} at step {step}; restored the last good "
                      f"parameters (step {history['best_step']})"
                      + (f" and kept checkpoint {checkpoint}" if checkpoint else "")
                      + ". Try a smaller learning rate or clip_norm=...", TrainingDiverged,
                      stacklevel=2)

    batches = _batches(len(data), min(batch_size, len(data)), generator, data.device)
    bar = tqdm(range(start, num_steps), disable=not progress, desc="fit", dynamic_ncols=True)
    bad_evals = 0
    for step in bar:
        loss = -flow.log_prob(data[next(batches)]).mean()
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            stop_diverged(step, f"non-finite loss ({loss_value})")
            break
        zero_grad()
        loss.backward()
        if clip_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, clip_norm)
            if not torch.isfinite(norm):
                stop_diverged(step, "non-finite gradient")
                break
        opt_step()
        history["loss"].append(loss_value)
        if (step + 1) % eval_every == 0 or step + 1 == num_steps:
            val_nll = mean_nll(flow, val)
            history["val_step"].append(step + 1)
            history["val_nll"].append(val_nll)
            if val_nll < history["best_val_nll"]:
                history["best_val_nll"], history["best_step"] = val_nll, step + 1
                best_state, bad_evals = _snapshot(flow), 0
            else:
                bad_evals += 1
            save_checkpoint(step + 1)
            bar.set_postfix(loss=f"{loss_value:.3f}", val=f"{val_nll:.3f}")
            if patience is not None and bad_evals >= patience:
                history["stopped"] = f"early stopping at step {step + 1}"
                break
    bar.close()
    if history["stopped"] is None or history["stopped"].startswith("early"):
        flow.load_state_dict(best_state)
    flow.eval()
    return history
