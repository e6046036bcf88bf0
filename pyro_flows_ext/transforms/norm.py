"""Normalisation layers: ActNorm (Glow) and an exactly invertible batch norm (RealNVP)."""

import torch
from torch import nn

from ..core import FlowLayer, batch_shape_of
from ..distributed import moments


def _channel_view(t, event_dim):
    """Reshape a per-channel ``(C,)`` tensor to broadcast over ``(C, H, W)`` events."""
    return t if event_dim == 1 else t.view(-1, 1, 1)


def _reduce_dims(x, event_dim):
    """Every dimension of ``x`` except the channel one."""
    channel = x.dim() - event_dim
    return [d for d in range(x.dim()) if d != channel]


def _pixels(x, event_dim):
    return 1 if event_dim == 1 else x.shape[-1] * x.shape[-2]


def _scaled_sum(t, factor):
    """``factor * t.sum()`` with the fewest operations (each one costs on small tensors)."""
    if factor == 1:
        return t.sum()
    if factor == -1:
        return -t.sum()
    return t.sum() * factor


class _PerChannel(FlowLayer):
    """Shared helpers of the per-channel affine layers below."""

    def _view(self, t):
        return _channel_view(t, self.event_dim)

    def _ladj(self, y, log_scale, sign=1):
        """``sign * pixels * sum(log_scale)``, expanded to the batch shape of ``y``."""
        ladj = _scaled_sum(log_scale, sign * _pixels(y, self.event_dim))
        return ladj.expand(batch_shape_of(y, self.event_dim))


class ActNorm(_PerChannel):
    r"""Per-channel affine map with data-dependent initialisation (Glow):
    :math:`x = z\, e^{\log s} + b`, :math:`\log|\det J| = H W \sum_c \log s_c`.

    On the first call in the data-to-base direction while training, ``b`` and ``s`` are set
    to the batch mean and standard deviation, so the base side starts standardised. If the
    first call is generative (a guide), the layer starts at the identity. The flag is a
    buffer, saved in the ``state_dict``. Data-parallel: initialise it before training from
    all ranks' statistics (``initialize_from_data(flow, shard, distributed=True)``, what
    ``fit_density`` does), or let the first call run inside
    :func:`~pyro_flows_ext.distributed.synchronized_statistics` on every rank; a lazy start
    on each replica's own batch would give the replicas different parameters.

    Args:
        dim: channels ``C`` (the event size for vectors).
        event_dim: 1 for ``(*batch, C)``, 3 for ``(*batch, C, H, W)``.
    """

    def __init__(self, dim, event_dim=1):
        super().__init__()
        self.dim, self.event_dim = dim, event_dim
        self.loc = nn.Parameter(torch.zeros(dim))
        self.log_scale = nn.Parameter(torch.zeros(dim))
        self.register_buffer("initialized", torch.tensor(False))
        self._ready = False  # mirrors the buffer without a device sync on every call

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        flag = state_dict.get(prefix + "initialized")
        self._ready = bool(flag) if flag is not None and not flag.is_meta else self._ready

    @torch.no_grad()
    def _initialize(self, x):
        # inside synchronized_statistics (fit_density's data-parallel start and steps) the
        # statistics are all ranks' together: replicas never initialise from their own shard
        n, mean, m2 = moments(x, _reduce_dims(x, self.event_dim))
        if n < 2:
            return  # one point says nothing about the spread; stay at the identity
        self.loc.copy_(mean)
        self.log_scale.copy_((m2 / (n - 1)).sqrt().clamp_min(1e-6).log())
        self.initialized.fill_(True)
        self._ready = True

    def call_and_ladj(self, z):
        if not self._ready:  # generative use first (a guide): start at the identity
            self.initialized.fill_(True)
            self._ready = True
        return (z * self._view(self.log_scale).exp() + self._view(self.loc),
                self._ladj(z, self.log_scale))

    def inverse_and_ladj(self, x):
        if not self._ready and self.training:
            self._initialize(x)
        z = (x - self._view(self.loc)) * torch.exp(-self._view(self.log_scale))
        return z, self._ladj(x, self.log_scale, -1)


class InvertibleBatchNorm(_PerChannel):
    r"""Batch normalisation as a bijection (RealNVP):
    :math:`z = (x - \mu) / \sqrt{\sigma^2 + \epsilon}\; e^{\gamma} + \beta`,
    :math:`\log|\det \partial z/\partial x|
    = \sum_c \gamma_c - \tfrac12 \log(\sigma_c^2 + \epsilon)`.

    Training mode: the data-to-base direction uses the statistics of its input pooled over
    every non-event dimension (sample and batch alike, as torch's BatchNorm pools ``N, H,
    W``: a flow's batch entries share its parameters, so they share one normalisation) and
    updates the running averages; the density of one entry then depends on the others in
    that call, so score with ``flow.eval()``; the generative direction reuses the
    statistics of that last batch, so the two directions are exact inverses of each other
    (Pyro's ``BatchNorm`` uses batch statistics one way and running ones the other). Eval
    mode: both directions use the running averages.

    Args:
        dim: channels ``C``.
        momentum: weight of the newest batch in the running averages.
        eps: added to the variance.
        event_dim: 1 for ``(*batch, C)``, 3 for ``(*batch, C, H, W)``.
    """

    def __init__(self, dim, momentum=0.1, eps=1e-5, event_dim=1):
        super().__init__()
        if not (0 <= momentum <= 1 and eps > 0):
            raise ValueError(f"InvertibleBatchNorm needs 0 <= momentum <= 1 and eps > 0, got "
                             f"momentum={momentum!r}, eps={eps!r}")
        self.dim, self.momentum, self.eps, self.event_dim = dim, momentum, eps, event_dim
        self.log_gamma = nn.Parameter(torch.zeros(dim))
        self.beta = nn.Parameter(torch.zeros(dim))
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))
        self._batch_stats = None

    def _apply(self, fn, *args, **kwargs):
        # the last batch's statistics (used by the generative direction) follow .to() too
        super()._apply(fn, *args, **kwargs)
        if self._batch_stats is not None:
            self._batch_stats = tuple(fn(t) for t in self._batch_stats)
        return self

    def _stats(self, x=None):
        if self.training and x is not None and x.numel() // self.dim > 1:
            dims = _reduce_dims(x, self.event_dim)
            mean, var = x.mean(dims), x.var(dims, unbiased=False)
            with torch.no_grad():
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(var, self.momentum)
            self._batch_stats = (mean.detach(), var.detach())
            return mean, var
        if self.training and self._batch_stats is not None:
            return self._batch_stats
        return self.running_mean, self.running_var

    def _log_scale(self, var):
        return self.log_gamma - 0.5 * torch.log(var + self.eps)

    def call_and_ladj(self, z):
        mean, var = self._stats()
        log_scale = self._log_scale(var)
        view = self._view
        x = (z - view(self.beta)) * view(torch.exp(-log_scale)) + view(mean)
        return x, self._ladj(z, log_scale, -1)

    def inverse_and_ladj(self, x):
        mean, var = self._stats(x)
        log_scale = self._log_scale(var)
        view = self._view
        z = (x - view(mean)) * view(log_scale.exp()) + view(self.beta)
        return z, self._ladj(x, log_scale)

