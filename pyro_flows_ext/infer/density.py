"""Maximum-likelihood fitting of a flow to data with a Pyro (or torch) optimizer.

The parts: data checks and the split (:func:`as_data`, :func:`split_data`), the optimizer
(:class:`FlowOptimizer`), checkpoints (:func:`save_checkpoint`, :func:`load_checkpoint`), the
data-dependent start (:func:`~pyro_flows_ext.transforms.preprocess.initialize_from_data`) and
the loop (:func:`fit_density`).
"""

import contextlib
import hashlib
import math
import os
import warnings

import pyro.optim
import torch
from tqdm.auto import tqdm

from .._compile import compiled_nll
from ..distributed import (
    all_reduce_gradients,
    all_reduce_sum,
    broadcast_module,
    broadcast_object,
    gather_objects,
    get_rank,
    get_world_size,
    is_main_process,
    rank_seed,
    resolve,
    shard,
    synchronized_statistics,
)
from ..io import FORMAT, atomic_save, read, to_record
from ..transforms.preprocess import initialize_from_data

__all__ = ["DegenerateData", "SplineBoundWarning", "TrainingDiverged", "as_data",
           "fit_density", "mean_nll"]

MIN_ROWS = 10
CHECKPOINT_VERSION = 2


class TrainingDiverged(UserWarning):
    """Training stopped on a non-finite loss; the last good parameters were restored."""


class DegenerateData(UserWarning):
    """Constant, duplicate or linearly dependent columns: the data have no density."""


class SplineBoundWarning(UserWarning):
    """Many training values fall outside a spline's interval (its identity tails)."""


# -- data ------------------------------------------------------------------------------------

def flow_dtype_device(flow):
    """The dtype and device of the flow's parameters (or buffers; else torch's defaults)."""
    for t in (*flow.parameters(), *flow.buffers()):
        if t.is_floating_point():
            return t.dtype, t.device
    return torch.get_default_dtype(), torch.device("cpu")


def as_data(data, flow, name="data"):
    """``data`` as a tensor in the flow's dtype and on its device, checked for shape and
    values. Array-likes (numpy arrays, lists) are converted; float64 data are cast to a
    float32 flow's dtype."""
    dtype, device = flow_dtype_device(flow)
    if not torch.is_tensor(data):
        try:
            data = torch.as_tensor(data)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"{name} must be a tensor or a numeric array of shape (N, D), got "
                            f"{type(data).__name__} ({e})") from e
    if data.is_complex() or data.dtype == torch.bool:
        raise TypeError(f"{name} must hold real numbers, got dtype {data.dtype}")
    data = data.to(device=device, dtype=dtype)
    event = tuple(flow.event_shape)
    if data.dim() != 1 + len(event) or tuple(data.shape[1:]) != event:
        raise ValueError(f"{name} must have shape (N, {', '.join(map(str, event))}): "
                         f"expected events of shape {event}, got an array of shape "
                         f"{tuple(data.shape)}")
    bad = ~torch.isfinite(data.reshape(len(data), -1)).all(-1)
    if bad.any():
        rows = bad.nonzero().flatten().tolist()
        shown = ", ".join(map(str, rows[:5])) + (", ..." if len(rows) > 5 else "")
        raise ValueError(f"{name} has {len(rows)} row(s) with NaN or infinite values (first: "
                         f"row {rows[0]}; rows {shown}); expected finite numbers: drop or "
                         "impute them")
    return data


def default_val_rows(n, val_fraction):
    """Validation rows for ``n`` rows: ``val_fraction`` of them, but at least the smaller of
    300 rows and 20%, and never fewer than 50 while half the rows stay for training."""
    if val_fraction == 0:
        return 0
    return max(round(n * val_fraction), min(300, round(0.2 * n)), min(50, n // 2))


def split_data(data, val_fraction, seed):
    """``(train, val)``: a seeded random split (see :func:`default_val_rows`)."""
    n_val = default_val_rows(len(data), val_fraction)
    if n_val == 0:
        return data, data[:0]
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    perm = perm.to(data.device)
    return data[perm[n_val:]], data[perm[:n_val]]


def check_columns(data, name="data"):
    """Warns (:class:`DegenerateData`) about constant, duplicate or linearly dependent
    columns, for which the density is degenerate (the NLL falls without bound)."""
    x = data.detach().reshape(len(data), -1).to("cpu", torch.float64)
    if len(x) < 2:
        return
    std = x.std(0)
    scale = x.abs().amax(0).clamp_min(1e-300)
    constant = (std <= 1e-12 * scale).nonzero().flatten().tolist()
    problems = []
    if constant:
        problems.append(f"constant column(s) {constant}")
    live = [j for j in range(x.shape[1]) if j not in constant]
    dup = []
    if len(live) > 1:  # exact duplicates (near ones show up as linear dependence below)
        _, inverse = torch.unique(x[:, live], dim=1, return_inverse=True)
        first = {}
        for j, group in zip(live, inverse.tolist()):
            if group in first:
                dup.append((first[group], j))
            else:
                first[group] = j
    if dup:
        problems.append("duplicate columns " + ", ".join(f"{i} and {j}" for i, j in dup[:5]))
    if len(x) >= 50:
        few = [(j, len(torch.unique(x[:, j]))) for j in live]
        few = [(j, k) for j, k in few if k <= 10]
        if few:
            problems.append("discrete column(s) " + ", ".join(
                f"{j} ({k} distinct values)" for j, k in few[:5]) + " (dequantise them: add "
                "uniform noise of one spacing)")
    if not problems and len(live) > 1 and len(x) > len(live):
        z = (x[:, live] - x[:, live].mean(0)) / std[live]
        eig = torch.linalg.eigvalsh(z.T @ z / len(z))
        if eig[0] < 1e-10 * eig[-1]:
            problems.append("linearly dependent columns (the correlation matrix is singular)")
    if problems:
        warnings.warn(f"{name} has {'; '.join(problems)}: the density is degenerate (all the "
                      "mass lies on a lower-dimensional set), so the NLL falls without bound as "
                      "training sharpens it; drop or combine those columns", DegenerateData,
                      stacklevel=3)


def fingerprint(data):
    """Shape and a hash of the values (as float64), stored with checkpoints."""
    values = data.detach().to("cpu", torch.float64).contiguous().numpy()
    return {"shape": list(data.shape), "sha256": hashlib.sha256(values.tobytes()).hexdigest()}


@torch.no_grad()
def mean_nll(flow, data, chunk=10_000, distributed=False):
    """Mean negative log-likelihood of ``data`` in eval mode (nats per event).
    ``distributed=True``: a collective; each rank scores its shard of ``data`` (every rank
    holds all of it) and the sums and counts are all-reduced, so every rank gets the same
    mean of all rows."""
    data = as_data(data, flow)
    rows = shard(data) if distributed else data
    was_training = flow.training
    flow.eval()
    total = 0.0
    try:
        for part in rows.split(chunk):
            total += -flow.log_prob(part).sum().item()
    finally:
        flow.train(was_training)
    if distributed:
        total, n = all_reduce_sum(torch.tensor([total, len(rows)], dtype=torch.float64))
        return (total / n).item()
    return total / len(data)


# -- the optimizer ---------------------------------------------------------------------------

def _args_key(args):
    return repr(sorted(args.items(), key=lambda kv: kv[0]))


class FlowOptimizer:
    """Steps a flow's own named parameters with a Pyro optimizer without touching Pyro's
    global param store: one torch optimizer per group of parameters that share their
    arguments (one for all of them with a dict of arguments), built from the Pyro
    optimizer's ``pt_optim_constructor`` and ``pt_optim_args``. Per-parameter arguments are
    looked up with the names Pyro would use for ``pyro.module("flow", flow)``; ``clip_args``
    (``clip_norm``/``clip_value``) are applied per parameter as Pyro does; a
    :class:`pyro.optim.PyroLRScheduler` is stepped once per optimisation step (a
    ``ReduceLROnPlateau`` with each validation NLL). A torch optimizer is used as it is.
    """

    def __init__(self, optim, flow, module_name="flow"):
        named = [(n, p) for n, p in flow.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        self.optimizers, self.schedulers, self.clips = [], [], []
        if isinstance(optim, torch.optim.Optimizer):
            self.optimizers = [optim]
            return
        if not isinstance(optim, pyro.optim.PyroOptim):
            raise TypeError(f"optim must be a pyro.optim optimizer (e.g. pyro.optim.Adam"
                            f"({{'lr': 1e-3}})) or a torch optimizer, got {type(optim).__name__}")
        groups = {}
        for name, p in named:
            args = self._optim_args(optim, module_name, name)
            groups.setdefault(_args_key(args), (args, []))[1].append(p)
        for args, params in groups.values():
            opt = optim.pt_optim_constructor(params, **args)
            self.optimizers.append(opt)
            if isinstance(optim, pyro.optim.PyroLRScheduler):
                self.schedulers.append(optim.pt_scheduler_constructor(opt, **optim.kwargs))
        for name, p in named:
            clip = self._clip_args(optim, module_name, name)
            if clip.get("clip_norm") is not None or clip.get("clip_value") is not None:
                self.clips.append((p, clip.get("clip_norm"), clip.get("clip_value")))

    @staticmethod
    def _optim_args(optim, module_name, name):
        args = optim.pt_optim_args
        if callable(args):
            args = (args(f"{module_name}.{name}") if optim.pt_optim_args_argc == 1
                    else args(module_name, name))
        if not isinstance(args, dict):
            raise TypeError(f"the optimizer's per-parameter arguments must be dicts, got "
                            f"{type(args).__name__} for {name}")
        return dict(args)

    @staticmethod
    def _clip_args(optim, module_name, name):
        clip = optim.pt_clip_args
        clip = clip(module_name, name) if callable(clip) else clip
        return dict(clip or {})

    def zero_grad(self):
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def step(self):
        for p, clip_norm, clip_value in self.clips:
            if p.grad is None:
                continue
            if clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(p, clip_norm)
            if clip_value is not None:
                torch.nn.utils.clip_grad_value_(p, clip_value)
        for opt in self.optimizers:
            opt.step()
        for sched in self.schedulers:
            if not isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
                sched.step()

    def validated(self, val_nll):
        for sched in self.schedulers:
            if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
                sched.step(val_nll)

    def state_dict(self):
        return {"optimizers": [o.state_dict() for o in self.optimizers],
                "schedulers": [s.state_dict() for s in self.schedulers]}

    def load_state_dict(self, state):
        if len(state["optimizers"]) != len(self.optimizers):
            raise ValueError("the checkpoint's optimizer has a different layout (other "
                             "per-parameter arguments); resume with the same optimizer")
        for opt, s in zip(self.optimizers, state["optimizers"]):
            opt.load_state_dict(s)
        for sched, s in zip(self.schedulers, state["schedulers"]):
            sched.load_state_dict(s)


def _batches(n, batch_size, seed, start=0):
    """Minibatch indices for steps ``start, start + 1, ...``: epoch ``e`` is a permutation
    drawn from a generator seeded by ``(seed, e)``, so the order is a function of the step and
    a resumed run sees exactly the batches an uninterrupted one would."""
    batch_size = min(batch_size, n)
    per_epoch = n // batch_size
    epoch, pos = divmod(start, per_epoch)
    while True:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(n, generator=g)
        for i in range(pos, per_epoch):
            yield perm[i * batch_size:(i + 1) * batch_size]
        epoch, pos = epoch + 1, 0


# -- checkpoints -----------------------------------------------------------------------------

def _snapshot(flow):
    return {k: v.detach().clone() for k, v in flow.state_dict().items()}


def _rng_state(device):
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(path, flow, state, rng_ranks=None):
    """Writes the resumable record: the best parameters (what :func:`pyro_flows_ext.load`
    returns), the current ones, optimizer and RNG state, history, data fingerprint.
    ``rng_ranks``: every rank's RNG state, by rank (a data-parallel run)."""
    record = to_record(flow)
    if rng_ranks is not None:
        record.update(rng_ranks=rng_ranks, world_size=len(rng_ranks))
    record.update(state_dict=state["best_state"], current_state=_snapshot(flow),
                  step=state["step"], history=state["history"], bad_evals=state["bad_evals"],
                  optimizer=state["optimizer"].state_dict(), rng=_rng_state(state["device"]),
                  data=state["fingerprint"], checkpoint_version=CHECKPOINT_VERSION)
    atomic_save(record, path)


def load_checkpoint(path, flow, data_fingerprint):
    """The record at ``path``, checked against this flow and these data (one-line errors)."""
    record = read(path)
    if record.get("format") != FORMAT or "current_state" not in record:
        raise ValueError(f"{path} is not a fit_density checkpoint; cannot resume from it")
    spec, theirs = getattr(flow, "spec", None), record.get("spec")
    if spec is not None and theirs is not None and _spec_key(spec) != _spec_key(theirs):
        raise ValueError(f"cannot resume: checkpoint {path} holds a different flow "
                         f"({_describe(theirs)}) than the one given ({_describe(spec)}); use "
                         "another checkpoint path or resume=False")
    old = record.get("data")
    if old is not None:
        if list(old["shape"]) != list(data_fingerprint["shape"]):
            raise ValueError(f"cannot resume: checkpoint {path} was trained on data of shape "
                             f"{tuple(old['shape'])}, these training data have shape "
                             f"{tuple(data_fingerprint['shape'])}; use another checkpoint path "
                             "or resume=False")
        if old["sha256"] != data_fingerprint["sha256"]:
            raise ValueError(f"cannot resume: checkpoint {path} was trained on other data of "
                             "the same shape (their fingerprints differ); use another "
                             "checkpoint path or resume=False")
    return record


def _spec_key(spec):
    return repr((spec.get("flow"), spec.get("dim"), sorted(spec.get("kwargs", {}).items())))


def _describe(spec):
    kwargs = ", ".join(f"{k}={v!r}" for k, v in spec.get("kwargs", {}).items())
    return f"{spec.get('flow')}({spec.get('dim')}{', ' + kwargs if kwargs else ''})"


# -- data-dependent start and spline bounds --------------------------------------------------

def _spline_bound(t):
    """The interval half-width of a spline layer (``None`` for other layers)."""
    element = getattr(t, "element_map", None)
    if element is not None:
        return getattr(element, "bound", None)  # None for maps on all of R (affine)
    if getattr(t, "kind", "spline") != "spline":
        return None  # MaskedAutoregressive with affine element maps
    return getattr(t, "bound", None)


def prepare(flow, train, warn_fraction=0.01, distributed=False):
    """Initialises the flow's data-dependent layers from ``train`` and warns
    (:class:`SplineBoundWarning`) when more than ``warn_fraction`` of the values that reach
    the data-side first spline lie outside its ``[-bound, bound]``. Returns the names of the
    layers initialised. ``distributed=True``: a collective; ``train`` is this rank's shard
    and the statistics are those of all ranks' rows."""
    found = {}

    def visit(i, t, x):
        if found:
            return False
        bound = _spline_bound(t)
        if bound is None:
            return True  # keep walking until the first spline
        found.update(index=i, layer=t, bound=float(bound),
                     outside=torch.tensor([(x.abs() > bound).sum().item(), x.numel()],
                                          dtype=torch.float64))
        return False

    has_spline = any(_spline_bound(t) is not None for t in flow.transforms)
    done = initialize_from_data(flow, train, visit=visit if has_spline else None,
                                distributed=distributed)
    if found:  # the share of all ranks' values outside the bound
        outside = all_reduce_sum(found["outside"]) if distributed else found["outside"]
        found["outside"] = (outside[0] / outside[1].clamp_min(1)).item()
    if found and found["outside"] > warn_fraction:
        fixed = "after the layers on its data side (as initialised), " if found["index"] < len(
            flow.transforms) - 1 else ""
        warnings.warn(f"{100 * found['outside']:.1f}% of the training values {fixed}fall "
                      f"outside the interval [-{found['bound']:g}, {found['bound']:g}] of "
                      f"{type(found['layer']).__name__} (layer {found['index']}), where the "
                      "spline is the identity, so the flow underfits them: standardise the data "
                      "(a Standardize layer, e.g. a builder's standardize=True) or raise bound",
                      SplineBoundWarning, stacklevel=3)
    return done


# -- settings --------------------------------------------------------------------------------

def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _check_settings(num_steps, batch_size, eval_every, val_fraction, patience, weight_decay,
                    clip_norm, num_threads):
    if not _is_int(num_steps) or num_steps < 0:
        raise ValueError(f"num_steps must be a non-negative integer (0 only initialises and "
                         f"validates), got {num_steps!r}")
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if eval_every is not None and (not _is_int(eval_every) or eval_every < 1):
        raise ValueError(f"eval_every must be a positive integer (steps between validations) "
                         f"or None (automatic), got {eval_every!r}")
    if not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be a number in [0, 1) (0: validate on the "
                         f"training rows), got {val_fraction!r}")
    if patience not in (None, "auto") and (not _is_int(patience) or patience < 1):
        raise ValueError(f"patience must be a positive integer, 'auto' or None (no early "
                         f"stopping), got {patience!r}")
    if not isinstance(weight_decay, (int, float)) or not 0 <= weight_decay < math.inf:
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    if clip_norm is not None and not (isinstance(clip_norm, (int, float)) and clip_norm > 0):
        raise ValueError(f"clip_norm must be a positive number or None, got {clip_norm!r}")
    if num_threads is not None and (not _is_int(num_threads) or num_threads < 1):
        raise ValueError(f"num_threads must be a positive integer or None, got {num_threads!r}")


def default_eval_every(num_steps):
    """About 40 validations per run, every 10 to 100 steps."""
    return int(min(100, max(10, num_steps // 40)))


def default_patience(num_steps, eval_every):
    """Stop after a third of the run's validations without progress (at least 10)."""
    return max(10, math.ceil(math.ceil(num_steps / eval_every) / 3))


@contextlib.contextmanager
def torch_threads(num_threads):
    """Sets torch's intra-op threads for the block and restores them after (None: unchanged)."""
    if num_threads is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _divergence_advice(data, flow):
    """What to try after a non-finite loss: the data's scale first, then the optimiser."""
    big = data.abs().max().item()
    spread = data.std(0).cpu().double()
    standardized = any(type(t).__name__ == "Standardize" and getattr(t, "is_initialized", False)
                       for t in flow.transforms)
    if not standardized and (big > 1e4 or spread.min().item() < 1e-4):
        return (f"The data reach |x| = {big:.3g} with column standard deviations from "
                f"{spread.min().item():.3g} to {spread.max().item():.3g}: standardise them "
                "first (a Standardize layer, e.g. a builder's standardize=True, or "
                "(x - mean) / std)")
    return "Try a smaller learning rate or clip_norm=..."


# -- the loop --------------------------------------------------------------------------------

def fit_density(flow, data, num_steps=2000, batch_size=512, optim=None, val_fraction=0.1,
                val_data=None, eval_every=None, patience="auto", checkpoint=None, resume=False,
                progress=True, seed=0, clip_norm=None, weight_decay=0.0, num_threads=None,
                initialize=True, compile=False, distributed=None):
    r"""Fits ``flow`` to ``data`` by minibatch maximum likelihood, :math:`\min -\frac1B
    \sum_b \log p(x_b)`, with a Pyro optimizer, never touching Pyro's global param store.

    Before step 0 the flow's data-dependent layers (:class:`~pyro_flows_ext.transforms.
    Standardize`, :class:`~pyro_flows_ext.transforms.CholeskyAffine`, ActNorm) that are not
    initialised yet are set from the whole training set, so a flow with a ``CholeskyAffine``
    whose other layers start at the identity is the maximum-likelihood Gaussian at step 0.
    The validation split is scored at step 0 and every ``eval_every`` steps; the best
    parameters (possibly step 0's) are restored at the end, so the result is never worse on
    validation data than the start. Training stops early after ``patience`` validations
    without improvement. A non-finite loss stops training with a :class:`TrainingDiverged`
    warning and restores the best parameters; the checkpoint keeps the last good state.
    The flow is left in eval mode. Layers with training penalties (a ``regularization()``
    method: CNF's RNODE terms, OT-Flow's transport and HJB costs, weighted by the layers' own
    ``*_weight`` arguments) add them to each step's loss; the recorded loss is the NLL.

    Args:
        flow: a :class:`~pyro_flows_ext.Flow` (any module-distribution with ``log_prob``).
        data: ``(N, *event_shape)`` tensor or array; converted to the flow's dtype/device.
        num_steps: total optimisation steps (a resumed run continues up to this total).
        batch_size: minibatch size.
        optim: a ``pyro.optim`` optimizer (dict or per-parameter arguments, ``clip_args``,
            schedulers) or a torch optimizer; default ``pyro.optim.Adam({"lr": 1e-3})``.
        val_fraction: share of ``data`` held out (at least min(300 rows, 20%), and 50 rows
            while half the data stay for training); 0 validates on the training rows.
            Ignored with ``val_data``.
        val_data: explicit validation set.
        eval_every: steps between validations and checkpoints; default about 40 per run
            (every 10 to 100 steps).
        patience: validations without improvement before stopping; ``"auto"`` (a third of
            the run's validations, at least 10) or None (never stop early).
        checkpoint: path of a checkpoint written at every validation.
        resume: continue from ``checkpoint`` if it exists: parameters, optimizer, torch's RNG
            and the data order are restored, so an interrupted run resumed with the same
            arguments ends with the parameters of an uninterrupted one. The checkpoint must
            hold the same flow and the same training data.
        progress: show a tqdm progress bar.
        seed: seed of the split and of the minibatch order.
        clip_norm: clip the total gradient norm to this value.
        weight_decay: L2 penalty ``weight_decay / 2 * |theta|^2`` on the parameters of every
            layer except the data-initialised ones (their parameters are statistics).
        num_threads: torch threads while fitting (restored afterwards); 1 is usually fastest
            for small flows, because on a shared machine OpenMP threads spin-wait on each
            other (with 2 threads one other busy process turned a 9 ms step into 900 ms).
        initialize: set data-dependent layers from the whole training set before step 0.
        compile: compute each step's minibatch NLL (forward and backward) with
            ``torch.compile`` (``dynamic=False``; compiled on the first step, which then takes
            seconds to minutes). Same numbers as eager to float tolerance; if compilation
            fails a warning says why and training continues eagerly. Ignored, with a
            warning, for flows with training penalties. A dict is passed to
            ``torch.compile`` as keyword arguments (e.g. ``{"backend": "aot_eager"}``).
        distributed: data-parallel training on the initialised ``torch.distributed`` process
            group (``None``: when one with more than one process exists, e.g. under
            ``torchrun``; ``True`` requires one). See below.
    Returns:
        history dict: ``loss`` per step, ``val_step``/``val_nll`` (from step 0),
        ``best_step``, ``best_val_nll``, ``stopped`` (None or the reason), ``start_step``
        (where this call began: > 0 when resumed), ``n_train``, ``n_val``, ``initialized``.

    Data-parallel (``distributed``): every rank calls ``fit_density`` with the same flow
    builder, the same ``data`` and the same arguments. All ranks draw the same global
    minibatch from ``seed`` and rank ``r`` scores its ``r``-th contiguous share; the loss is
    :math:`\frac1B\sum_{b \in \text{shard}} -\log p(x_b)` and the gradients are summed
    over ranks, so the step is one process's step on the same global batch (to float
    rounding), also for unequal shards. Rank 0's parameters are broadcast at the start; the
    data-dependent layers are set from statistics of all ranks' shards (all-reduced sums and
    counts, also for a lazily initialised ActNorm at step 0); validation NLL is the
    all-reduced sum over each rank's share of the validation rows, so best step and early
    stopping agree on all ranks; only rank 0 writes the checkpoint (with every rank's RNG
    state: ``resume`` on the same number of ranks continues each rank's noise; on another
    number they are reseeded from ``seed`` and the step) and shows the progress bar; torch's
    RNG is seeded per rank (:func:`~pyro_flows_ext.distributed.rank_seed`) for the noise of
    dequantization, Hutchinson probes and MCMC layers. Gradients are reduced by hand
    (:func:`~pyro_flows_ext.distributed.all_reduce_gradients`: one flat all-reduce per dtype
    after ``backward``), not by ``DistributedDataParallel``: the loss is ``log_prob``, not
    the module's ``forward()`` that DDP hooks, some layers' parameters get no gradient in a
    step (DDP then needs ``find_unused_parameters``), and the rank weights of unequal shards
    and the loss value ride in the same reduction. Batch statistics of
    ``InvertibleBatchNorm`` stay per replica (as DDP without ``SyncBatchNorm``).
    """
    _check_settings(num_steps, batch_size, eval_every, val_fraction, patience, weight_decay,
                    clip_norm, num_threads)
    with torch_threads(num_threads):
        return _fit(flow, data, num_steps, batch_size, optim, val_fraction, val_data,
                    eval_every, patience, checkpoint, resume, progress, seed, clip_norm,
                    weight_decay, initialize, compile, distributed)


def _update(opt, params, decayed, weight_decay, clip_norm):
    """One update from the current gradients: decoupled-from-the-loss weight decay
    :math:`g \\leftarrow g + \\lambda p` on ``decayed``, the optional norm clip of ``params``,
    then ``opt.step()``. Returns False (no step taken) when the gradient norm is not finite."""
    live = [p for p in decayed if p.grad is not None]
    if live:
        torch._foreach_add_([p.grad for p in live], live, alpha=weight_decay)
    if clip_norm is not None:
        if not torch.isfinite(torch.nn.utils.clip_grad_norm_(params, clip_norm)):
            return False
    opt.step()
    return True


def _decayed_params(flow):
    skip = {id(p) for m in flow.modules() if hasattr(m, "initialized")
            for p in m.parameters(recurse=False)}
    return [p for p in flow.parameters() if p.requires_grad and id(p) not in skip]


def _fit(flow, data, num_steps, batch_size, optim, val_fraction, val_data, eval_every,
         patience, checkpoint, resume, progress, seed, clip_norm, weight_decay, initialize,
         compile=False, distributed=None):
    distributed = resolve(distributed)
    data = as_data(data, flow)
    if val_data is None:
        train, val = split_data(data, val_fraction, seed)
    else:
        train, val = data, as_data(val_data, flow, "val_data")
    if len(train) < MIN_ROWS:
        raise ValueError(f"need at least {MIN_ROWS} training rows, got {len(train)}")
    if len(val) == 0:
        val = train
    if distributed and min(batch_size, len(train)) < get_world_size():
        raise ValueError(f"batch_size ({min(batch_size, len(train))}) must be at least the "
                         f"number of processes ({get_world_size()}): every rank scores a "
                         "share of each minibatch")
    transforms = getattr(flow, "transforms", None)
    if not (transforms and getattr(transforms[-1], "discrete", False)):
        check_columns(train, "the training data")  # a dequantizing flow models discrete data
    if checkpoint is not None and getattr(flow, "spec", None) is None:
        to_record(flow)  # raises the clear "not made by a builder" error now, not at step 100
    eval_every = eval_every or default_eval_every(num_steps)
    if patience == "auto":
        patience = default_patience(num_steps, eval_every)
    _, device = flow_dtype_device(flow)
    opt = FlowOptimizer(optim or pyro.optim.Adam({"lr": 1e-3}), flow)
    params = opt.params
    decayed = _decayed_params(flow) if weight_decay else []
    state = {"step": 0, "history": None, "best_state": None, "bad_evals": 0, "optimizer": opt,
             "device": device, "fingerprint": fingerprint(train), "dist": distributed,
             "seed": seed}

    _start_or_resume(flow, train, val, state, opt, checkpoint, resume, initialize, num_steps)
    flow.train()

    def stop_diverged(step, what):
        _diverged(flow, train, state, checkpoint, step, what)

    # layers with training penalties (CNF's RNODE terms, OT-Flow's transport and HJB costs,
    # weighted by their own *_weight arguments) add them to the loss of each step
    regularized = [getattr(t, "layer", t) for t in getattr(flow, "transforms", ())
                   if hasattr(getattr(t, "layer", t), "regularization")]
    if compile and regularized:
        warnings.warn("fit_density(compile=True) is ignored for flows with training penalties "
                      "(CNF, OT-Flow): they train eagerly", stacklevel=3)
    nll = compiled_nll(flow, enabled=bool(compile) and not regularized,
                       **(compile if isinstance(compile, dict) else {}))
    start = state["step"]
    batches = _batches(len(train), batch_size, seed, start)
    bar = tqdm(range(start, num_steps), disable=not progress or not is_main_process(),
               desc="fit", dynamic_ncols=True)
    for step in bar:
        if distributed:  # a lazy ActNorm start inside sees all ranks' rows
            with synchronized_statistics():
                loss, loss_value, bad = _shard_loss(flow, train, next(batches), device, nll,
                                                    regularized)
                opt.zero_grad()
                loss.backward()
            loss_value, bad = all_reduce_gradients(params, 1.0, [loss_value, bad])
            if not math.isfinite(loss_value) or bad:
                stop_diverged(step, f"non-finite loss ({loss_value})")
                break
        else:
            loss = nll(train[next(batches).to(device)])
            loss_value = loss.item()  # the NLL; the regularisers below are not part of it
            for t in regularized:
                loss = loss + t.regularization()
            if not math.isfinite(loss_value) or (regularized and not torch.isfinite(loss)):
                stop_diverged(step, f"non-finite loss ({loss_value})")
                break
            opt.zero_grad()
            loss.backward()
        if not _update(opt, params, decayed, weight_decay, clip_norm):
            stop_diverged(step, "non-finite gradient")
            break
        if _end_of_step(flow, val, state, opt, step, loss_value, num_steps, eval_every,
                        checkpoint, patience, bar):
            break
    return _finish(flow, state, bar)


def _shard_loss(flow, train, idx, device, nll, regularized):
    """This rank's part of a data-parallel step's loss on the global minibatch ``idx``:
    :math:`\frac{n_r}{B}` times its shard's mean NLL (and its penalties), so the ranks' losses
    sum to the global mean. Returns ``(loss, nll part, 1.0 if non-finite else 0.0)``."""
    local = shard(idx)
    share = len(local) / len(idx)
    loss = nll(train[local.to(device)]) * share
    value = loss.item()
    for t in regularized:
        loss = loss + share * t.regularization()
    return loss, value, float(not torch.isfinite(loss))


def _load_on_main(checkpoint, flow, fingerprint_):
    """Rank 0 reads and checks the checkpoint and sends it (or its error) to every rank."""
    record = error = None
    if is_main_process():
        try:
            record = load_checkpoint(checkpoint, flow, fingerprint_)
        except Exception as e:  # noqa: BLE001  (re-raised on every rank below)
            error = e
    record, error = broadcast_object((record, error))
    if error is not None:
        raise error
    return record


def _checkpoint(path, flow, state):
    """Writes the checkpoint; data-parallel: only rank 0, with every rank's RNG state."""
    if not state.get("dist"):
        save_checkpoint(path, flow, state)
        return
    rngs = gather_objects(_rng_state(state["device"]))
    if is_main_process():
        save_checkpoint(path, flow, state, rng_ranks=rngs)


def _start_or_resume(flow, train, val, state, opt, checkpoint, resume, initialize, num_steps):
    """Restores a checkpointed run (parameters, optimizer, RNG, history, patience) or starts
    one (data-dependent layers set from ``train``, validation at step 0). Returns the
    history."""
    distributed = state.get("dist", False)
    exists = resume and checkpoint is not None and os.path.exists(checkpoint)
    if distributed:
        exists = broadcast_object(exists)  # rank 0's file decides (no shared disk needed)
    if exists:
        record = (_load_on_main if distributed else load_checkpoint)(
            checkpoint, flow, state["fingerprint"])
        flow.load_state_dict(record["current_state"])
        if record.get("optimizer") is not None:
            try:
                opt.load_state_dict(record["optimizer"])
            except (KeyError, TypeError):
                warnings.warn(f"{checkpoint}: optimizer state of an older format; starting "
                              "the optimizer afresh", stacklevel=4)
        ranks = record.get("rng_ranks")
        if distributed and ranks is not None and len(ranks) == get_world_size():
            _set_rng_state(ranks[get_rank()], state["device"])
        elif distributed:  # another number of ranks: fresh per-rank streams for this step
            torch.manual_seed(rank_seed(state["seed"] * 1_000_003 + record["step"]))
        elif record.get("rng") is not None:
            _set_rng_state(record["rng"], state["device"])
        state.update(step=record["step"], history=record["history"],
                     best_state=record["state_dict"], bad_evals=record.get("bad_evals", 0))
        state["history"].update(start_step=record["step"], loss=list(record["history"]["loss"]))
    elif distributed:
        broadcast_module(flow)  # rank 0's start, before any statistics pass through it
        torch.manual_seed(rank_seed(state["seed"]))
        done = prepare(flow, shard(train), distributed=True) if initialize else []
    else:
        done = prepare(flow, train) if initialize else []
    if not exists:
        state["history"] = {"loss": [], "val_step": [], "val_nll": [], "best_step": 0,
                            "best_val_nll": math.inf, "stopped": None, "start_step": 0,
                            "n_train": len(train), "n_val": len(val), "initialized": done}
        state["best_state"] = _snapshot(flow)
        if math.isfinite(_validate(flow, val, state, opt, 0)) and checkpoint is not None:
            _checkpoint(checkpoint, flow, state)
    history = state["history"]
    history["stopped"] = None if state["step"] < num_steps else history["stopped"]
    return history


def _diverged(flow, train, state, checkpoint, step, what):
    """Stops on a non-finite loss or gradient: restores the best parameters and warns (the
    checkpoint keeps the last good state)."""
    history = state["history"]
    history["stopped"] = f"{what} at step {step}"
    flow.load_state_dict(state["best_state"])
    warnings.warn(f"training stopped: {what} at step {step}; restored the last good "
                  f"parameters (step {history['best_step']})"
                  + (f" and kept checkpoint {checkpoint}" if checkpoint else "")
                  + ". " + _divergence_advice(train, flow), TrainingDiverged, stacklevel=4)


def _end_of_step(flow, val, state, opt, step, loss_value, num_steps, eval_every, checkpoint,
                 patience, bar):
    """Records a finished step; validates and checkpoints on schedule. True: stop early."""
    history = state["history"]
    history["loss"].append(loss_value)
    state["step"] = step + 1
    if (step + 1) % eval_every and step + 1 != num_steps:
        return False
    val_nll = _validate(flow, val, state, opt, step + 1)
    flow.train()
    if checkpoint is not None and math.isfinite(val_nll):
        _checkpoint(checkpoint, flow, state)
    bar.set_postfix(loss=f"{loss_value:.3f}", val=f"{val_nll:.3f}")
    if patience is not None and state["bad_evals"] >= patience:
        history["stopped"] = f"early stopping at step {step + 1}"
        return True
    return False


def _finish(flow, state, bar):
    """Closes the bar, restores the best parameters (unless training diverged: they already
    are) and leaves the flow in eval mode."""
    bar.close()
    history = state["history"]
    if history["stopped"] is None or history["stopped"].startswith("early"):
        flow.load_state_dict(state["best_state"])
    flow.eval()
    return history


def _validate(flow, val, state, opt, step):
    """Scores the validation rows (a non-finite score counts as +inf), updates the best state
    and the patience counter."""
    history = state["history"]
    val_nll = mean_nll(flow, val, distributed=state.get("dist", False))
    if not math.isfinite(val_nll):
        val_nll = math.inf
    history["val_step"].append(step)
    history["val_nll"].append(val_nll)
    if val_nll < history["best_val_nll"]:
        history["best_val_nll"], history["best_step"] = val_nll, step
        state["best_state"], state["bad_evals"] = _snapshot(flow), 0
    else:
        state["bad_evals"] += 1
    opt.validated(val_nll)
    return val_nll
