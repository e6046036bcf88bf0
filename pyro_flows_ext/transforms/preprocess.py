r"""Data-side preprocessing layers: a fixed standardisation and a data-initialised full-rank
affine map, so that a fitted flow is a density in the data's own units and starts at the
maximum-likelihood Gaussian.

Both sit at the data end of a flow (last in generative order): ``[..., CholeskyAffine,
Standardize]``. :func:`initialize_from_data` sets every data-dependent layer of a flow from a
whole training set (what :func:`~pyro_flows_ext.infer.fit_density` does before step 0).
"""

import warnings

import torch
from torch import nn

from ..core import FlowLayer, batch_shape_of
from ..distributed import all_reduce_sum, moments, resolve, synchronized_statistics

__all__ = ["CholeskyAffine", "Standardize", "initialize_from_data"]


class _DataInitialized(FlowLayer):
    """A vector layer whose state is set from data once; ``initialized`` is a buffer (saved in
    the ``state_dict``) mirrored by ``_ready`` so calls need no device sync."""

    def _setup_flag(self, value=False):
        self.register_buffer("initialized", torch.tensor(bool(value)))
        self._ready = bool(value)

    def _mark_initialized(self):
        self.initialized.fill_(True)
        self._ready = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        flag = state_dict.get(prefix + "initialized")
        if flag is not None and not flag.is_meta:
            self._ready = bool(flag)

    @property
    def is_initialized(self):
        return self._ready

    def _rows(self, x, name):
        """``x`` as ``(N, D)`` float64 rows on the CPU (statistics are computed in float64, so
        data near float32's range do not overflow their squares, also on devices without
        float64)."""
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"{name} expects rows of size {self.dim} in the last dimension, "
                             f"got a tensor of shape {tuple(x.shape)}")
        return x.detach().reshape(-1, self.dim).to("cpu", torch.float64)  # float64 on any device


class Standardize(_DataInitialized):
    r"""Fixed element-wise affine map at the data end of a flow: :math:`x = \mu + s \odot z`,
    :math:`\log|\det \partial x/\partial z| = \sum_i \log s_i`. Not trainable (``loc`` and
    ``scale`` are buffers, saved in the ``state_dict``); the identity until set.

    With it the flow is a density in the data's units: ``flow.log_prob(raw_rows)`` and
    ``flow.sample()`` need no un-standardising, while the inner layers see data of unit
    scale (what spline bounds and default learning rates assume).

    Args:
        dim: event size ``D``.
        loc: ``(D,)`` shift :math:`\mu` (default zeros).
        scale: ``(D,)`` positive scale :math:`s` (default ones).
    Shapes: ``z``, ``x``: ``(*batch, D)``. Exact.

    Set it from training data with :meth:`set_from_data` (or let ``fit_density`` do it).
    """

    def __init__(self, dim, loc=None, scale=None):
        super().__init__()
        self.dim = int(dim)
        self.register_buffer("loc", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))
        self._setup_flag(False)
        if loc is not None or scale is not None:
            self.set(torch.zeros(dim) if loc is None else loc,
                     torch.ones(dim) if scale is None else scale)

    def set(self, loc, scale, mark=True):
        """Sets ``loc`` and ``scale`` (``(D,)`` each; scales must be positive and finite)."""
        loc = torch.as_tensor(loc).detach().reshape(-1)
        scale = torch.as_tensor(scale).detach().reshape(-1)
        if loc.shape != (self.dim,) or scale.shape != (self.dim,):
            raise ValueError(f"Standardize({self.dim}) needs loc and scale of shape "
                             f"({self.dim},), got {tuple(loc.shape)} and {tuple(scale.shape)}")
        if not (torch.isfinite(loc).all() and torch.isfinite(scale).all() and (scale > 0).all()):
            raise ValueError("Standardize needs finite loc and finite positive scale, got "
                             f"loc={loc.tolist()}, scale={scale.tolist()}")
        with torch.no_grad():
            self.loc.copy_(loc)
            self.scale.copy_(scale)
        if mark:
            self._mark_initialized()
        return self

    @torch.no_grad()
    def set_from_data(self, x):
        """Sets ``loc``/``scale`` to the column means and standard deviations of ``x``
        (``(*batch, D)``). A constant column keeps scale 1 (and only its mean is removed).
        Inside :func:`~pyro_flows_ext.distributed.synchronized_statistics` the statistics are
        those of every rank's rows together."""
        rows = self._rows(x, "Standardize.set_from_data")
        n, loc, m2 = moments(rows, [0])
        if n < 1:
            raise ValueError("Standardize.set_from_data needs at least one row")
        std = (m2 / n).sqrt() if n > 1 else torch.ones_like(loc)
        tiny = 1e-12 * loc.abs().clamp_min(1.0)
        std = torch.where(std > tiny, std, torch.ones_like(std))
        return self.set(loc.to(self.loc), std.to(self.scale))

    initialize_from_data = set_from_data

    def call_and_ladj(self, z):
        ladj = self.scale.log().sum().expand(batch_shape_of(z, 1))
        return self.loc + self.scale * z, ladj

    def inverse_and_ladj(self, x):
        ladj = self.scale.log().sum().expand(batch_shape_of(x, 1))
        return (x - self.loc) / self.scale, -ladj

    def extra_repr(self):
        return f"dim={self.dim}, initialized={self._ready}"


class CholeskyAffine(_DataInitialized):
    r"""Full-rank affine map with data-dependent initialisation: :math:`x = \mu + L z` with
    :math:`L` lower triangular with positive diagonal (its log is the parameter),
    :math:`\log|\det \partial x/\partial z| = \sum_i \log L_{ii}`.

    On its first data-to-base call while training (or from :meth:`initialize_from_data`,
    which ``fit_density`` calls with the whole training set), :math:`\mu` and :math:`L` are
    set to the mean and the Cholesky factor of the (maximum-likelihood) covariance of the
    data, so a flow whose other layers start at the identity starts as the full-covariance
    Gaussian fit. Both stay trainable. A first generative call while training with gradients
    (a guide) starts it at the identity instead. The flag is a buffer, saved in the
    ``state_dict``.

    Args:
        dim: event size ``D``.
        jitter: relative jitter added to the covariance diagonal when its Cholesky fails.
    Shapes: ``z``, ``x``: ``(*batch, D)``. Exact. Both directions cost :math:`O(D^2)` per
    event (the inverse is a triangular solve).
    """

    def __init__(self, dim, jitter=1e-6):
        super().__init__()
        self.dim, self.jitter = int(dim), float(jitter)
        self.loc = nn.Parameter(torch.zeros(dim))
        self.log_diag = nn.Parameter(torch.zeros(dim))
        self.lower = nn.Parameter(torch.zeros(dim, dim))  # only the strictly lower part is used
        self.register_buffer("_strict", torch.ones(dim, dim).tril(-1), persistent=False)
        self._setup_flag(False)

    def scale_tril(self):
        """The lower-triangular factor :math:`L`."""
        return self.lower * self._strict + torch.diag_embed(self.log_diag.exp())

    @torch.no_grad()
    def initialize_from_data(self, x):
        """Sets :math:`\\mu` and :math:`L` from the rows of ``x`` (``(*batch, D)``): the mean
        and the Cholesky factor of the maximum-likelihood covariance. With fewer than two rows
        the layer stays at the identity; with at most ``D`` rows (a singular covariance) it
        uses the diagonal of the covariance only. Inside
        :func:`~pyro_flows_ext.distributed.synchronized_statistics` the rows are every rank's
        together (all-reduced sums and counts)."""
        rows = self._rows(x, "CholeskyAffine.initialize_from_data")
        n, mean, m2 = moments(rows, [0], full=True)
        if n < 2:
            return self
        cov = m2 / n
        if n <= self.dim:
            cov = torch.diag(cov.diagonal())
        tril = _robust_cholesky(cov, self.jitter)
        self.loc.copy_(mean.to(self.loc))
        self.log_diag.copy_(tril.diagonal().log().to(self.log_diag))
        self.lower.copy_(tril.tril(-1).to(self.lower))
        self._mark_initialized()
        return self

    def call_and_ladj(self, z):
        if not self._ready and self.training and torch.is_grad_enabled():
            self._mark_initialized()  # generative training first (a guide): start at identity
        tril = self.scale_tril()
        x = self.loc + z @ tril.mT
        return x, self.log_diag.sum().expand(batch_shape_of(z, 1))

    def inverse_and_ladj(self, x):
        if not self._ready and self.training:
            self.initialize_from_data(x)
        tril = self.scale_tril()
        flat = (x - self.loc).reshape(-1, self.dim)
        # z L^T = x - mu, solved from the right against the upper-triangular L^T
        z = torch.linalg.solve_triangular(tril.mT, flat, upper=True, left=False)
        return z.reshape(x.shape), -self.log_diag.sum().expand(batch_shape_of(x, 1))

    def extra_repr(self):
        return f"dim={self.dim}, initialized={self._ready}"


def _robust_cholesky(cov, jitter):
    """Cholesky of ``cov``, adding growing jitter (relative to the mean variance) to the
    diagonal until it succeeds; zero-variance directions get a small positive variance."""
    d = cov.shape[-1]
    scale = cov.diagonal().mean().clamp_min(1e-300)
    eye = torch.eye(d, dtype=cov.dtype, device=cov.device)
    tril, info = torch.linalg.cholesky_ex(cov)
    eps = jitter
    while info.item() != 0 or not torch.isfinite(tril).all() or (tril.diagonal() <= 0).any():
        if eps > 1.0:
            return torch.diag(cov.diagonal().clamp_min(scale * 1e-6).sqrt())
        tril, info = torch.linalg.cholesky_ex(cov + eps * scale * eye)
        eps *= 10
    return tril


def _is_data_dependent(t):
    """``True`` for a layer that still waits for its data-dependent initialisation."""
    if isinstance(t, _DataInitialized):
        return not t.is_initialized
    return hasattr(t, "_initialize") and getattr(t, "_ready", True) is False  # ActNorm


def _initialize(t, x):
    if isinstance(t, _DataInitialized):
        t.initialize_from_data(x)
    else:
        t._initialize(x)


def _invert(t, x, chunk):
    parts = []
    for part in x.split(chunk):
        if isinstance(t, FlowLayer):
            parts.append(t.inverse_and_ladj(part)[0])
        else:
            parts.append(t.inv(part))
    return torch.cat(parts) if parts else x


@torch.no_grad()
def initialize_from_data(flow, data, chunk=65_536, visit=None, distributed=False):
    """Initialises every data-dependent layer of ``flow`` that is not initialised yet
    (:class:`Standardize`, :class:`CholeskyAffine`, ActNorm) from the whole of ``data``,
    walking from the data side: each layer is set from ``data`` pushed through the layers on
    its data side. Returns the names (``type(layer).__name__``) of the layers it set.

    ``visit(index, layer, x)``, when given, is called for every layer the walk reaches with
    that layer's data-side input, and may return ``True`` to keep walking past the last layer
    that needed initialisation (``fit_density`` uses it to measure spline bounds).

    ``distributed=True`` (or ``None``: when a multi-process group is initialised) makes it a
    collective: each rank passes its own shard of the rows, every statistic (means,
    (co)variances) is reduced over all ranks, and every replica is set identically from the
    global data. Every rank must then call it.
    """
    distributed = resolve(distributed)
    transforms = list(flow.transforms)
    pending = [i for i, t in enumerate(transforms) if _is_data_dependent(t)]
    if not pending and visit is None:
        return []
    was_training = flow.training
    flow.eval()  # batch norms use (and do not update) running statistics during the walk
    done, x = [], data
    try:
        with synchronized_statistics(distributed):
            for i in reversed(range(len(transforms))):
                t = transforms[i]
                if getattr(t, "context_dim", 0):
                    break  # a conditional layer needs its context: the walk cannot continue
                wants_more = visit(i, t, x) if visit is not None else False
                if _is_data_dependent(t):
                    _initialize(t, x)
                    done.append(type(t).__name__)
                remaining = any(j < i for j in pending)
                if not remaining and not wants_more:
                    break
                x = _invert(t, x, chunk)
                # every rank stops where any rank's rows became non-finite (a collective)
                bad = torch.tensor(float(not torch.isfinite(x).all()))
                if (all_reduce_sum(bad) if distributed else bad).item() > 0:
                    warnings.warn(f"initialize_from_data: layer {i} ({type(t).__name__}) "
                                  "produced non-finite values; the layers below it were not "
                                  "initialised", stacklevel=4)
                    break
    finally:
        flow.train(was_training)
        if hasattr(flow, "clear_cache"):
            flow.clear_cache()
    return done
