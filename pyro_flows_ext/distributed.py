r"""Data-parallel training on ``torch.distributed`` (``torchrun``), gloo on CPUs, nccl on GPUs.

Every rank holds the same flow and reads its shard of each global minibatch; gradients are
all-reduced, so :math:`W` processes on a global batch :math:`B` take the steps one process
takes on the same batch (to float rounding). The helpers here are what
:func:`~pyro_flows_ext.infer.fit_density` (``distributed=``) and :class:`DistributedSVI` use:

- the group: :func:`is_distributed`, :func:`get_rank`, :func:`get_world_size`,
  :func:`is_main_process`, :func:`init_from_env` (``torchrun``'s environment variables),
  :func:`launch` (``N`` local gloo processes: ``pyro-flows fit --nproc N``);
- data: :func:`shard_bounds`, :func:`shard` (rank ``r`` takes the ``r``-th of ``W`` contiguous
  slices, sizes differing by at most one);
- collectives: :func:`all_reduce_sum`, :func:`all_reduce_mean`, :func:`all_reduce_gradients`,
  :func:`broadcast_module`, :func:`broadcast_object`, :func:`gather_objects`;
- statistics: :func:`moments` (counts, means and centred second moments over all ranks) and
  :func:`synchronized_statistics`, inside which data-dependent layers (Standardize,
  CholeskyAffine, ActNorm) initialise from all ranks' rows, not from their replica's;
- noise: :func:`rank_seed` (a different stream per rank for dequantization, Hutchinson
  probes and MCMC proposals).

Every helper works without a process group (one process: the identity), so code written for
``torchrun`` runs unchanged as a plain script.
"""

import contextlib
import datetime
import io
import math
import os
import socket
import time
import zlib

import pyro
import pyro.poutine as poutine
import torch
import torch.distributed as dist

__all__ = ["DistributedSVI", "all_reduce_gradients", "all_reduce_mean", "all_reduce_sum",
           "broadcast_module", "broadcast_object", "gather_objects", "get_rank",
           "get_world_size", "global_subsample", "init_from_env", "is_distributed",
           "is_main_process", "launch", "moments", "rank_seed", "resolve", "shard",
           "shard_bounds", "synchronized_statistics"]

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


# -- the process group -----------------------------------------------------------------------

def is_distributed():
    """``True`` when a process group is initialised with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank():
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size():
    """The number of processes (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process():
    """``True`` on rank 0 (and without a process group): the rank that writes files."""
    return get_rank() == 0


def resolve(distributed):
    """The ``distributed=`` option as a bool: ``None`` is on exactly when a process group with
    more than one process is initialised; ``True`` requires one (a clear error otherwise)."""
    if distributed is None:
        return is_distributed()
    if distributed not in (True, False):
        raise ValueError(f"distributed must be None (automatic), True or False, got "
                         f"{distributed!r}")
    if distributed and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("distributed=True needs an initialised torch.distributed process "
                           "group: launch with torchrun (e.g. torchrun --nproc-per-node 2 "
                           "script.py) and call pyro_flows_ext.distributed.init_from_env() or "
                           "torch.distributed.init_process_group() first, or use "
                           "pyro_flows_ext.distributed.launch(fn, nproc)")
    return bool(distributed)


def default_backend(device=None):
    """``"nccl"`` for CUDA devices (when torch has it), ``"gloo"`` otherwise."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda" and dist.is_nccl_available():
        return "nccl"
    return "gloo"


def init_from_env(device=None, backend=None, timeout=None):
    """Initialises the process group from ``torchrun``'s environment variables (``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``). Returns ``True`` when it initialised
    one, ``False`` when one already existed or the variables are absent (a plain run).

    Args:
        device: the training device; ``cuda`` selects nccl and ``cuda:LOCAL_RANK``.
        backend: ``"gloo"`` or ``"nccl"`` (default from ``device``).
        timeout: seconds a collective may wait (torch's default: 30 minutes).
    """
    if not dist.is_available() or dist.is_initialized():
        return False
    if not all(v in os.environ for v in TORCHRUN_VARS):
        return False
    backend = backend or default_backend(device)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    kwargs = {} if timeout is None else {"timeout": datetime.timedelta(seconds=timeout)}
    dist.init_process_group(backend, **kwargs)
    return True


def local_device(device):
    """``device`` with the local rank's index for an index-less CUDA device under a group."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and is_distributed():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", get_rank())))
    return device


# -- sharding ---------------------------------------------------------------------------------

def shard_bounds(n, rank=None, world_size=None):
    """``(start, stop)`` of rank ``rank``'s contiguous slice of ``n`` items: the first
    ``n % W`` ranks take one more (``numpy.array_split``'s rule)."""
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    size, extra = divmod(n, world_size)
    start = rank * size + min(rank, extra)
    return start, start + size + (rank < extra)


def shard(x, rank=None, world_size=None):
    """This rank's contiguous slice of ``x`` (a tensor, along dim 0, or a sequence)."""
    start, stop = shard_bounds(len(x), rank, world_size)
    return x[start:stop]


# -- collectives --------------------------------------------------------------------------------

def _comm_device():
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor):
    """The elementwise sum of ``tensor`` over all ranks (a new tensor on its device and in
    its dtype; a copy without a group)."""
    tensor = torch.as_tensor(tensor)
    if not is_distributed():
        return tensor.clone()
    buf = tensor.detach().to(_comm_device(), copy=True)
    dist.all_reduce(buf)
    return buf.to(tensor.device)


def all_reduce_mean(tensor):
    """The elementwise mean of ``tensor`` over all ranks."""
    return all_reduce_sum(tensor) / get_world_size()


def all_reduce_gradients(params, weight=None, values=()):
    r"""Replaces each ``p.grad`` by :math:`\sum_r w_r\, g_r` over ranks ``r`` and returns
    :math:`\sum_r w_r v_r` for each number in ``values`` (e.g. this rank's loss), all in one
    all-reduce per dtype plus one for the values.

    ``weight`` is this rank's :math:`w_r` (default :math:`1/W`: the mean of the ranks'
    gradients; pass ``n_r / n`` when ranks score unequal shards of a mean). A parameter whose
    gradient is ``None`` on every rank stays ``None`` (so optimizers skip it as in one
    process); on some ranks only, it counts as zero there. ``params`` must be in the same
    order on every rank. Without a group it only scales by ``weight`` (default 1).
    """
    params = list(params)
    values = [float(v) for v in values]
    distributed = is_distributed()
    w = float(weight) if weight is not None else 1.0 / get_world_size()
    if not distributed:
        for p in params:
            if p.grad is not None and w != 1.0:
                p.grad.mul_(w)
        return [w * v for v in values]
    device = _comm_device()
    meta = torch.tensor([w * v for v in values] + [float(p.grad is not None) for p in params],
                        dtype=torch.float64, device=device)
    dist.all_reduce(meta)
    groups = {}
    for p in params:
        groups.setdefault(p.dtype, []).append(p)
    for group in groups.values():
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                          for p in group]).to(device) * w
        dist.all_reduce(flat)
        offset = 0
        for p in group:
            part = flat[offset:offset + p.numel()].view_as(p).to(p.device)
            offset += p.numel()
            if p.grad is None:
                p.grad = part.clone()
            else:
                p.grad.copy_(part)
    for p, seen in zip(params, meta[len(values):].tolist()):
        if seen == 0:
            p.grad = None
    return meta[:len(values)].tolist()


def broadcast_module(module, src=0):
    """Copies every parameter and buffer of ``module`` from rank ``src`` to all ranks (the
    start DDP makes), then refreshes the layers' Python mirrors of their ``initialized``
    buffers. A no-op without a group."""
    if not is_distributed():
        return module
    device = _comm_device()
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            buf = t.detach().to(device, torch.uint8 if t.dtype == torch.bool else t.dtype,
                                copy=True)
            dist.broadcast(buf, src)
            t.copy_(buf.to(t.device, t.dtype))
    for m in module.modules():
        flag = getattr(m, "initialized", None)
        if torch.is_tensor(flag) and hasattr(m, "_ready") and not flag.is_meta:
            m._ready = bool(flag)
    return module


def broadcast_object(obj, src=0):
    """Rank ``src``'s ``obj`` on every rank (picklable objects; itself without a group)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def gather_objects(obj):
    """The list of every rank's ``obj``, by rank, on all ranks (``[obj]`` without a group)."""
    if not is_distributed():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


# -- statistics of data spread over ranks -------------------------------------------------------

_SYNC = {"on": False}


@contextlib.contextmanager
def synchronized_statistics(enabled=True):
    """Inside, :func:`moments` (and so the data-dependent initialisation of Standardize,
    CholeskyAffine and ActNorm) reduces over all ranks: each rank passes its own rows and
    every replica is set from the statistics of all of them. Every rank must then run the
    same initialisations in the same order (as in a data-parallel training step)."""
    old = _SYNC["on"]
    _SYNC["on"] = bool(enabled) and is_distributed()
    try:
        yield
    finally:
        _SYNC["on"] = old


def statistics_synchronized():
    """``True`` inside :func:`synchronized_statistics` with a multi-process group."""
    return _SYNC["on"] and is_distributed()


def moments(x, dims, full=False):
    r"""``(n, mean, m2)`` of ``x`` over ``dims``: the count :math:`n`, the mean and the
    centred second moment :math:`\sum (x - \bar x)^2` (``full=True``: :math:`\sum (x - \bar
    x)(x - \bar x)^\top` of ``(N, D)`` rows), summed over all ranks inside
    :func:`synchronized_statistics` (two passes: the global mean first, so large offsets do
    not cancel), else over ``x`` alone. Computed in ``x``'s dtype; ``n`` is a float."""
    dims = sorted(d % x.dim() for d in dims)
    keep = [d for d in range(x.dim()) if d not in dims]
    total = x.sum(dims)
    head = torch.full((1,), float(math.prod(x.shape[d] for d in dims)), dtype=x.dtype,
                      device=x.device)
    sums = torch.cat([head, total.reshape(-1)])
    sync = statistics_synchronized()
    if sync:
        sums = all_reduce_sum(sums)
    n = sums[0].item()
    mean = (sums[1:] / max(n, 1.0)).reshape(total.shape)
    centred = x - mean.reshape([x.shape[d] if d in keep else 1 for d in range(x.dim())])
    m2 = centred.mT @ centred if full else centred.square().sum(dims)
    if sync:
        m2 = all_reduce_sum(m2)
    return n, mean, m2


# -- noise ------------------------------------------------------------------------------------

def rank_seed(seed, rank=None):
    """A seed for rank ``rank``'s own noise stream (distinct per rank and per ``seed``)."""
    rank = get_rank() if rank is None else rank
    return (int(seed) * 1_000_003 + 7_919 * (rank + 1)) % (2 ** 63)


# -- launching local processes ------------------------------------------------------------------

def free_port():
    """A TCP port that was free a moment ago (for a local rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, fn, args, world_size, port, backend, threads, queue, timeout):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    if threads is not None:
        torch.set_num_threads(threads)
    dist.init_process_group(backend, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout))
    try:
        result = fn(*args)
        buf = io.BytesIO()
        torch.save(result, buf)
        queue.put((rank, buf.getvalue()))
    finally:
        dist.destroy_process_group()


def launch(fn, nproc, *args, backend="gloo", threads=1, timeout=600):
    """Runs ``fn(*args)`` in ``nproc`` new local processes (spawned) joined in a process
    group, and returns their return values by rank (each passed back with ``torch.save``).
    What ``torchrun --standalone --nproc-per-node N`` does, from inside Python.

    Args:
        fn: a module-level (picklable) function.
        nproc: number of processes.
        backend: ``"gloo"`` (CPU) or ``"nccl"``.
        threads: torch threads per process (1: the processes share the cores).
        timeout: seconds for the whole run and for any collective; on expiry the processes
            are killed and ``TimeoutError`` is raised.
    Raises:
        torch.multiprocessing.ProcessRaisedException / ProcessExitedException: a process
        failed (the others are stopped).
    """
    import torch.multiprocessing as mp

    if not isinstance(nproc, int) or isinstance(nproc, bool) or nproc < 1:
        raise ValueError(f"nproc must be a positive integer, got {nproc!r}")
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    old = os.environ.get("OMP_NUM_THREADS")
    if threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(threads)  # the children read it at import
    try:
        procs = mp.start_processes(_worker, args=(fn, args, nproc, port, backend, threads,
                                                  queue, timeout),
                                   nprocs=nproc, join=False, start_method="spawn")
    finally:
        if threads is not None:
            if old is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = old
    results, deadline = {}, time.monotonic() + timeout

    def drain():
        while not queue.empty():
            rank, payload = queue.get()
            results[rank] = torch.load(io.BytesIO(payload), weights_only=False)

    try:
        while True:
            drain()
            if procs.join(timeout=0.2):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"launch: {nproc} processes did not finish within "
                                   f"{timeout} s")
    finally:
        for p in procs.processes:
            if p.is_alive():
                p.kill()
    drain()
    return [results.get(r) for r in range(nproc)]


# -- data-parallel SVI -------------------------------------------------------------------------

def global_subsample(size, subsample_size, step, seed=0, name="data"):
    """The global subsample of step ``step`` for a plate ``name`` of ``size`` rows: the first
    ``subsample_size`` entries of a permutation drawn from a generator seeded by ``(seed,
    step, name)``, the same on every rank. Give each rank ``shard(...)`` of it."""
    g = torch.Generator().manual_seed(
        (int(seed) * 1_000_003 + int(step)) * 65_537 + zlib.crc32(name.encode()))
    return torch.randperm(int(size), generator=g)[:int(subsample_size)]


class _RecordSubsamples(poutine.messenger.Messenger):
    """Records ``(size, len(subsample))`` of every subsampled plate the model enters, and
    the names of plates that draw their own subsample (``subsample_size=`` only)."""

    def __init__(self):
        super().__init__()
        self.plates, self.self_drawn = {}, set()

    def _pyro_sample(self, msg):
        fn = msg["fn"]
        if type(fn).__name__ != "_Subsample":
            return
        if msg["value"] is not None:
            self.plates[msg["name"]] = (int(fn.size), len(msg["value"]))
        elif fn.subsample_size is not None and fn.subsample_size < fn.size:
            self.self_drawn.add(msg["name"])


class DistributedSVI(pyro.infer.SVI):
    r"""Pyro SVI whose ELBO gradient is all-reduced over the ranks (data-parallel SVI).

    Each rank runs the model on its own share of each step's global subsample: pass it to
    the model's plate as ``pyro.plate("data", N, subsample=idx)`` (Pyro then scales that
    rank's likelihood by :math:`N / B_r`), with ``idx = shard(global_subsample(N, B, step))``
    (:meth:`subsample` gives it) or from a ``DistributedSampler``. With rank weights
    :math:`w_r = B_r / B` the weighted sum of the ranks' ELBOs is the one-process ELBO on the
    global subsample, :math:`\log p(\theta) - \log q(\theta) + \frac{N}{B}\sum_{b \le B}
    \log p(y_b \mid \theta)`, so its gradient (and every Adam step) equals one process's on
    the same subsample, to float rounding.

    The guide's draws are shared: the constructor gives every rank rank 0's torch RNG state,
    and newly created parameters are copied from rank 0, so all replicas draw the same
    :math:`\theta`. Pyro's param-store parameters are reduced by site name (the same order on
    every rank) in one flat all-reduce per dtype; a manual all-reduce, not
    DistributedDataParallel, because the parameters live in Pyro's param store and are
    created lazily by the guide, not in one ``nn.Module`` called through ``forward()``.

    Several subsampled plates must split their subsamples in the same proportions (e.g.
    subsample sizes divisible by the world size). Gradient clips see the reduced gradient:
    ``pyro.optim.ClippedAdam`` clips in the optimizer, and :class:`~.infer.AutoFlowGuide`'s own
    elementwise clip (on with sticking the landing) is suspended in the backward pass and
    applied after the sum. Tensor hooks of your own that clip would act on each rank's part
    before the sum. Without a group it is plain SVI.

    Args: as :class:`pyro.infer.SVI`; ``seed`` seeds :meth:`subsample`.
    """

    def __init__(self, model, guide, optim, loss, seed=0, **kwargs):
        super().__init__(model, guide, optim, loss, **kwargs)
        self.seed, self.num_steps = int(seed), 0
        self._broadcast = set()
        if is_distributed():
            torch.set_rng_state(broadcast_object(torch.get_rng_state()))

    def subsample(self, size, subsample_size, name="data"):
        """This rank's share of the current step's global subsample (see
        :func:`global_subsample`)."""
        return shard(global_subsample(size, subsample_size, self.num_steps, self.seed, name))

    def step(self, *args, **kwargs):
        """One SVI step on this rank's share; returns the global loss (the one-process ELBO
        loss of the global subsample)."""
        record = _RecordSubsamples()
        # a guide's own gradient clip (AutoFlowGuide's, with sticking the landing) must act on
        # the reduced gradient, as in one process: suspended in backward, applied after the sum
        deferred = getattr(self.guide, "clipping_deferred", None)
        with (deferred() if deferred else contextlib.nullcontext()), record, \
                poutine.trace(param_only=True) as capture:
            loss = self.loss_and_grads(self.model, self.guide, *args, **kwargs)
        named = sorted((name, site["value"].unconstrained())
                       for name, site in capture.trace.nodes.items())
        params = [p for _, p in named]
        weight = None
        if is_distributed():
            if record.self_drawn:
                names = ", ".join(sorted(record.self_drawn))
                raise ValueError(f"DistributedSVI: plate(s) {names} draw their own subsample "
                                 "(subsample_size=), the same one on every rank (the ranks "
                                 "share the guide's RNG): pass each rank its share instead, "
                                 "pyro.plate(name, N, subsample=svi.subsample(N, B))")
            new = [p for name, p in named if name not in self._broadcast]
            if new:  # lazily created parameters start from rank 0's values
                with torch.no_grad():
                    for p in new:
                        p.copy_(broadcast_object(p.detach().cpu()).to(p))
                self._broadcast.update(name for name, _ in named)
            weight = self._weight(record.plates)
        if isinstance(loss, tuple):
            raise TypeError("DistributedSVI supports losses that return one number (Trace_ELBO "
                            "and its relatives), not a tuple (e.g. ReweightedWakeSleep)")
        loss = all_reduce_gradients(params, weight, values=[loss])[0]
        if deferred:
            self.guide.clip_gradients_()
        self.optim(params)
        pyro.infer.util.zero_grads(set(params))
        self.num_steps += 1
        return loss

    def _weight(self, plates):
        """``B_r / B`` of the subsampled plates (``1 / W`` without any)."""
        names = sorted(plates)
        local = torch.tensor([float(plates[n][1]) for n in names], dtype=torch.float64)
        counts = gather_objects(names) if self.num_steps == 0 else [names]
        if any(c != names for c in counts):
            raise RuntimeError(f"DistributedSVI: the ranks' models entered different "
                               f"subsampled plates ({counts})")
        if not names:
            return None
        total = all_reduce_sum(local)
        ratios = (local / total).tolist()
        if max(ratios) - min(ratios) > 1e-12:
            raise ValueError(f"DistributedSVI: subsampled plates {names} split their "
                             f"subsamples in different proportions on this rank "
                             f"({[int(v) for v in local.tolist()]} of "
                             f"{[int(v) for v in total.tolist()]}); use subsample sizes "
                             f"divisible by the world size ({get_world_size()})")
        return ratios[0]

