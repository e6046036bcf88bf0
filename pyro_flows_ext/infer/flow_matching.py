r"""Simulation-free training of a CNF by (conditional / optimal-transport) flow matching.

Conditional flow matching (Lipman et al. 2023; Tong et al. 2023): with :math:`x_0` from the
base, :math:`x_1` from the data and :math:`t \sim U(0, T)`, the straight path
:math:`x_t = (1 - t/T) x_0 + (t/T) x_1` (plus :math:`\sigma` noise) has velocity
:math:`u = (x_1 - x_0)/T`, and regressing the CNF's field on it,
:math:`\min E\|f(t, x_t) - u\|^2`, learns a field whose flow carries the base to the data. No
ODE is solved during training: one network evaluation per point. Pairing :math:`x_0` with
:math:`x_1` by an exact optimal-transport assignment within each minibatch (OT-CFM) gives
straighter paths (fewer solver steps at test time) and lower-variance targets.

The trained CNF is an ordinary flow: ``log_prob`` by the ODE with the exact trace (eval
mode), sampling by the ODE.
"""

import math

import pyro.optim
import torch
from tqdm.auto import tqdm

from ..distributions import Flow
from ..io import to_record
from .density import (
    MIN_ROWS,
    FlowOptimizer,
    _batches,
    _check_settings,
    _diverged,
    _end_of_step,
    _finish,
    _start_or_resume,
    _update,
    as_data,
    check_columns,
    default_patience,
    fingerprint,
    split_data,
    torch_threads,
)

__all__ = ["fit_flow_matching", "ot_pairing"]

_COUPLINGS = ("ot", "independent")


def ot_pairing(x0, x1):
    r"""A permutation ``perm`` such that pairing ``x0[perm]`` with ``x1`` minimises
    :math:`\sum_i \|x_{0,\pi(i)} - x_{1,i}\|^2` over the minibatch (exact, by scipy's
    ``linear_sum_assignment``; without scipy, the rows' maxima of an entropic plan from a few
    Sinkhorn iterations, which may repeat rows)."""
    cost = torch.cdist(x1.detach().double(), x0.detach().double()).square()
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:  # pragma: no cover - scipy is installed with scikit-learn
        log_k = -cost / (0.05 * cost.mean())
        log_u = torch.zeros(len(x1), dtype=cost.dtype)
        log_v = torch.zeros(len(x0), dtype=cost.dtype)
        for _ in range(50):
            log_u = -torch.logsumexp(log_k + log_v, 1)
            log_v = -torch.logsumexp(log_k + log_u[:, None], 0)
        return (log_k + log_u[:, None] + log_v).argmax(1).to(x0.device)
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    perm = torch.empty(len(x1), dtype=torch.long)
    perm[torch.as_tensor(rows)] = torch.as_tensor(cols)
    return perm.to(x0.device)


def _split_at_cnf(flow):
    from ..continuous.cnf import CNF  # torchdiffeq is imported only when it is used

    cnfs = [i for i, t in enumerate(flow.transforms) if isinstance(t, CNF)]
    if len(cnfs) != 1:
        raise TypeError(f"fit_flow_matching trains a flow with exactly one CNF layer "
                        f"(e.g. pfe.flows.ffjord(dim)); this flow has {len(cnfs)} "
                        "(OT-Flow's potential field trains with fit_density)")
    k = cnfs[0]
    return list(flow.transforms[:k]), flow.transforms[k], list(flow.transforms[k + 1:])


@torch.no_grad()
def _pull(post, x, chunk=65_536):
    """Data pushed through the (fixed) layers on the CNF's data side, to its output side."""
    out = []
    for part in x.split(chunk):
        for t in reversed(post):
            part = t.inv(part)
        out.append(part)
    return torch.cat(out) if out else x


def default_fm_eval_every(num_steps):
    """About 10 validations per run (each is an ODE solve with the exact trace), every 50 to
    1000 steps."""
    return int(min(1000, max(50, num_steps // 10)))


def fit_flow_matching(flow, data, num_steps=2000, batch_size=512, optim=None, coupling="ot",
                      sigma=0.0, ot_block=256, val_fraction=0.1, val_data=None, val_size=256,
                      eval_every=None, patience="auto", checkpoint=None, resume=False,
                      progress=True, seed=0, clip_norm=None, weight_decay=0.0,
                      num_threads=None, initialize=True):
    r"""Trains the :class:`~pyro_flows_ext.continuous.CNF` of ``flow`` by flow matching,
    :math:`\min_\theta E_{t, x_0, x_1} \|f_\theta(t, x_t) - (x_1 - x_0)/T\|^2` (no ODE solve
    per step). Layers on the CNF's data side (a builder's ``gaussian_start``/``standardize``
    layers) are initialised from the training data and kept fixed; the data are pulled
    through them once, and base draws pushed through any layers on the base side. With
    ``augment_dim = A`` the targets are padded with draws of the augmented model's
    :math:`q(e \mid x)` (its ``Augment`` layer, not trained by this loss).

    Protocol as :func:`~pyro_flows_ext.infer.fit_density`: the same data checks and errors,
    validation split, progress bar, checkpoints (``resume`` restores parameters, optimizer,
    RNG and data order), best-state restore, early stopping and divergence handling. The
    validation score is the NLL with the exact trace (eval mode) on ``val_size`` validation
    rows, at step 0 and every ``eval_every`` steps. The flow is left in eval mode.

    Args:
        flow: a :class:`~pyro_flows_ext.Flow` with exactly one CNF layer (or a bare CNF).
        data: ``(N, D)`` tensor or array.
        num_steps, batch_size, optim, val_fraction, val_data, patience, checkpoint, resume,
            progress, seed, clip_norm, weight_decay, num_threads, initialize: as in
            ``fit_density``.
        coupling: ``'ot'`` (exact minibatch optimal-transport pairing, OT-CFM) or
            ``'independent'`` (I-CFM).
        sigma: standard deviation of the Gaussian around the path (0: straight lines).
        ot_block: the exact assignment is solved within consecutive blocks of this many rows
            of the minibatch (its cost grows as the cube of the block size: 256 rows take a
            few milliseconds, 512 rows about 30).
        val_size: validation rows scored at each validation (a fixed random subset).
        eval_every: steps between validations; default about 10 per run (50 to 1000).
    Returns:
        history dict as ``fit_density``'s (``loss`` is the flow-matching loss per step).
    References: Lipman et al. 2023, https://arxiv.org/abs/2210.02747; Tong et al. 2023,
    https://arxiv.org/abs/2302.00482
    """
    from ..continuous.cnf import CNF

    if isinstance(flow, CNF):
        flow = Flow(None, [flow])
    _check_settings(num_steps, batch_size, eval_every, val_fraction, patience, weight_decay,
                    clip_norm, num_threads)
    if coupling not in _COUPLINGS:
        raise ValueError(f"coupling must be 'ot' or 'independent', got {coupling!r}")
    if not (isinstance(sigma, (int, float)) and 0 <= sigma < math.inf):
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma!r}")
    if not (isinstance(ot_block, int) and ot_block >= 2):
        raise ValueError(f"ot_block must be an integer >= 2, got {ot_block!r}")
    if not (isinstance(val_size, int) and val_size >= 1):
        raise ValueError(f"val_size must be a positive integer, got {val_size!r}")
    with torch_threads(num_threads):
        return _fit(flow, data, num_steps, batch_size, optim, coupling, float(sigma), ot_block,
                    val_fraction, val_data, val_size, eval_every, patience, checkpoint, resume,
                    progress, seed, clip_norm, weight_decay, initialize)


def _fit(flow, data, num_steps, batch_size, optim, coupling, sigma, ot_block, val_fraction,
         val_data, val_size, eval_every, patience, checkpoint, resume, progress, seed,
         clip_norm, weight_decay, initialize):
    pre, cnf, post = _split_at_cnf(flow)
    data = as_data(data, flow)
    if val_data is None:
        train, val = split_data(data, val_fraction, seed)
    else:
        train, val = data, as_data(val_data, flow, "val_data")
    if len(train) < MIN_ROWS:
        raise ValueError(f"need at least {MIN_ROWS} training rows, got {len(train)}")
    if len(val) == 0:
        val = train
    if len(val) > val_size:
        g = torch.Generator().manual_seed(seed + 1)
        val = val[torch.randperm(len(val), generator=g)[:val_size].to(val.device)]
    check_columns(train, "the training data")
    if checkpoint is not None and getattr(flow, "spec", None) is None:
        to_record(flow)  # the clear "not made by a builder" error now, not at the first save
    eval_every = eval_every or default_fm_eval_every(num_steps)
    if patience == "auto":
        patience = default_patience(num_steps, eval_every)
    device = train.device
    opt = FlowOptimizer(optim or pyro.optim.Adam({"lr": 1e-3}), flow)
    trained = [p for p in cnf.parameters() if p.requires_grad]
    state = {"step": 0, "history": None, "best_state": None, "bad_evals": 0, "optimizer": opt,
             "device": device, "fingerprint": fingerprint(train)}

    _start_or_resume(flow, train, val, state, opt, checkpoint, resume, initialize, num_steps)

    was = flow.training
    flow.eval()
    targets = _pull(post, train)  # the data-side layers are fixed: pull the data once
    flow.train(was)
    base = flow.base_dist
    T, extra = cnf.T, cnf.augment_dim
    flow.train()

    def stop_diverged(step, what):
        _diverged(flow, train, state, checkpoint, step, what)

    start = state["step"]
    batches = _batches(len(train), batch_size, seed, start)
    bar = tqdm(range(start, num_steps), disable=not progress, desc="fit (flow matching)",
               dynamic_ncols=True)
    for step in bar:
        x1 = targets[next(batches).to(device)]
        n = len(x1)
        if extra:  # targets padded with e ~ q(e | x), the augmented model's own draw
            with torch.no_grad():
                x1 = cnf.augment.inverse_and_ladj(x1)[0]
        with torch.no_grad():
            x0 = base.sample((n,))
            for t in pre:
                x0 = t(x0)
        if coupling == "ot":
            x0 = torch.cat([a[ot_pairing(a, b)] for a, b in zip(x0.split(ot_block),
                                                                x1.split(ot_block))])
        t = torch.rand(n, dtype=x1.dtype, device=device) * T
        s = (t / T)[:, None]
        xt = (1 - s) * x0 + s * x1
        if sigma:
            xt = xt + sigma * torch.randn_like(xt)
        loss = (cnf.velocity(t, xt) - (x1 - x0) / T).square().sum(-1).mean()
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            stop_diverged(step, f"non-finite loss ({loss_value})")
            break
        opt.zero_grad()
        loss.backward()
        if not _update(opt, trained, trained if weight_decay else [], weight_decay, clip_norm):
            stop_diverged(step, "non-finite gradient")
            break
        if _end_of_step(flow, val, state, opt, step, loss_value, num_steps, eval_every,
                        checkpoint, patience, bar):
            break
    return _finish(flow, state, bar)
