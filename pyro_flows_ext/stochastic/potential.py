r"""Energies from Pyro models, and interpolated energies for a ladder of MCMC layers."""

import contextlib
import math
import warnings

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer.autoguide.initialization import InitMessenger, init_to_uniform
from pyro.infer.mcmc.util import initialize_model
from pyro.poutine.runtime import _DIM_ALLOCATOR
from pyro.poutine.util import site_is_subsample
from torch.distributions import biject_to
from torch.distributions.utils import _sum_rightmost

__all__ = ["ModelPotential", "potential_from_model", "InterpolatedEnergy", "ladder",
           "standard_normal_energy"]


@contextlib.contextmanager
def _own_plate_dims():
    """Plate dimensions allocated afresh for a model run inside another program (a guide under
    SVI's particle plate): the outer plates are blocked, so their dims must not count. Swaps
    Pyro's global dim allocator stack for the block and restores it."""
    saved = _DIM_ALLOCATOR._stack
    _DIM_ALLOCATOR._stack = []
    try:
        yield
    finally:
        _DIM_ALLOCATOR._stack = saved


def _batch_dims(site):
    return site["value"].dim() - site["fn"].event_dim


class ModelPotential:
    r"""The potential energy of a Pyro model over its unconstrained latent vector, batched.

    :math:`U(\theta) = -\log p(\mathrm{data}, T(\theta)) - \log|\det \partial T/\partial\theta|`
    with :math:`T` Pyro's ``biject_to`` map of each latent site (the potential of
    :func:`pyro.infer.mcmc.util.initialize_model`). The vector packs the latent sites in model
    order, each flattened in its unconstrained shape (the layout of Pyro's ``AutoContinuous``
    guides, so a guide's latent vector can be fed in directly).

    Calling it on ``(*batch, D)`` returns ``(*batch,)``. Vectorised: the model runs once under
    an outer ``pyro.plate`` of size ``prod(batch)`` to the left of the model's own plates, with
    every latent site conditioned on its batched value (as ``Predictive(parallel=True)`` does),
    so the model must broadcast over that leading dimension (use ``x[..., 0]`` rather than
    ``x[0]``). ``vectorize="auto"`` checks this at construction on a few points against the
    one-point-at-a-time evaluation and falls back to that loop, with a warning, if the model
    does not broadcast; ``vectorize=False`` always loops.

    Attributes:
        dim: size ``D`` of the latent vector.
        sites: ``{name: (constrained_shape, unconstrained_shape)}`` in model order.
        init: an initial point ``(D,)`` (``initialize_model``'s, a valid point of the model).
        vectorized: whether the batched path is used.
    """

    def __init__(self, model, model_args=(), model_kwargs=None, vectorize="auto",
                 init_strategy=None):
        self.model, self.model_args = model, tuple(model_args)
        self.model_kwargs = dict(model_kwargs or {})
        kw = {} if init_strategy is None else {"init_strategy": init_strategy}
        with poutine.block(), _own_plate_dims():  # invisible to any program around us
            # a first trace with initial values (improper sites cannot be sampled), for the
            # plate nesting that initialize_model would otherwise guess by sampling the model
            proto = poutine.trace(InitMessenger(init_strategy or init_to_uniform)(model))
            proto = proto.get_trace(*self.model_args, **self.model_kwargs)
            init, self._pyro_potential, self._transforms, trace = initialize_model(
                model, model_args=self.model_args, model_kwargs=self.model_kwargs,
                max_plate_nesting=self._nesting(proto), **kw)
        self._latents = [(name, site) for name, site in trace.iter_stochastic_nodes()
                         if not site_is_subsample(site)]
        if not self._latents:
            raise ValueError("the model has no latent sample sites")
        self.sites, self._layout = {}, []
        pos = 0
        for name, site in self._latents:
            constrained = site["value"].shape
            unconstrained = biject_to(site["fn"].support).inv(site["value"]).shape
            size = math.prod(unconstrained)
            self.sites[name] = (constrained, unconstrained)
            self._layout.append((name, pos, size, unconstrained, _batch_dims(site),
                                 site["fn"].support))
            pos += size
        self.dim = pos
        self.init = torch.cat([init[name].detach().reshape(-1) for name, _ in self._latents])
        self.max_plate_nesting = self._nesting(trace)
        if vectorize not in ("auto", True, False):
            raise ValueError(f"vectorize must be 'auto', True or False, got {vectorize!r}")
        self.vectorized = bool(vectorize)
        if vectorize == "auto":
            self.vectorized = self._check_vectorized()

    @staticmethod
    def _nesting(trace):
        samples = [s for s in trace.nodes.values()
                   if s["type"] == "sample" and not site_is_subsample(s)]
        nesting = [-f.dim for s in samples for f in s["cond_indep_stack"]
                   if f.vectorized and f.dim is not None]
        nesting += [_batch_dims(s) for s in samples]
        return max(nesting + [0])

    # -- packing ---------------------------------------------------------------------------
    def unpack(self, x):
        """``{name: unconstrained value}`` with shapes ``batch + unconstrained_shape``."""
        batch = x.shape[:-1]
        return {name: x[..., pos:pos + size].reshape(batch + shape)
                for name, pos, size, shape, _, _ in self._layout}

    def constrain(self, x):
        """The map back: ``{name: constrained value}`` with shapes ``batch + site_shape``."""
        return {name: biject_to(support)(x[..., pos:pos + size].reshape(x.shape[:-1] + shape))
                for name, pos, size, shape, _, support in self._layout}

    def pack(self, values):
        """Inverse of :meth:`constrain`: ``(*batch, D)`` from constrained site values."""
        parts = []
        for name, _, _, shape, _, support in self._layout:
            u = biject_to(support).inv(values[name])
            parts.append(u.reshape(u.shape[:u.dim() - len(shape)] + (-1,)))
        return torch.cat(parts, -1)

    # -- the energy ------------------------------------------------------------------------
    def __call__(self, x):
        if x.shape[-1] != self.dim:
            raise ValueError(f"the model's latent vector has size {self.dim}, got a tensor of "
                             f"shape {tuple(x.shape)}")
        batch = x.shape[:-1]
        flat = x.reshape(-1, self.dim)
        if self.vectorized:
            u = self._energy_plate(flat)
        else:  # documented fallback: one model run per point
            u = (torch.stack([self._energy_single(row) for row in flat]) if len(flat)
                 else flat.new_zeros(0))
        return u.reshape(batch)

    def _constrained(self, flat, pad):
        """Constrained site values for the rows of ``flat`` and the summed log-Jacobian;
        ``pad``: reshape each to ``(n, 1, ..., 1, *site_shape)`` for the outer plate."""
        n, nest = flat.shape[0], self.max_plate_nesting
        values, log_det = {}, flat.new_zeros(n)
        for name, pos, size, shape, batch_dims, support in self._layout:
            u = flat[:, pos:pos + size].reshape((n,) + shape)
            t = biject_to(support)
            c = t(u)
            log_det = log_det + t.log_abs_det_jacobian(u, c).reshape(n, -1).sum(-1)
            values[name] = (c.reshape((n,) + (1,) * (nest - batch_dims) + c.shape[1:]) if pad
                            else c[0])
        return values, log_det

    def _log_joint(self, values, plate_size=None):
        # block: invisible to the handlers around the caller (a guide's trace, SVI's particle
        # plate); the trace inside records this run only
        model = poutine.condition(self.model, values)
        with pyro.validation_enabled(False), poutine.block(), _own_plate_dims():
            with poutine.trace() as tracer:
                if plate_size is None:
                    model(*self.model_args, **self.model_kwargs)
                else:
                    with pyro.plate("_snf_batch", plate_size,
                                    dim=-(self.max_plate_nesting + 1)):
                        model(*self.model_args, **self.model_kwargs)
        trace = tracer.trace
        trace.compute_log_prob()
        total = 0.0
        for site in trace.nodes.values():
            if site["type"] != "sample" or "log_prob" not in site or site_is_subsample(site):
                continue
            lp = site["log_prob"]
            if plate_size is None:
                total = total + lp.sum()
                continue
            lp = _sum_rightmost(lp, self.max_plate_nesting)
            if lp.dim() > 1 or (lp.dim() == 1 and lp.shape[0] not in (1, plate_size)):
                raise ValueError(f"site {site['name']!r} has log_prob of shape "
                                 f"{tuple(site['log_prob'].shape)} under a batch plate of "
                                 f"size {plate_size}")
            total = total + lp.expand(plate_size)
        return total

    def _energy_plate(self, flat):
        values, log_det = self._constrained(flat, pad=True)
        return -(self._log_joint(values, flat.shape[0]) + log_det)

    def _energy_single(self, row):
        values, log_det = self._constrained(row[None], pad=False)
        return -(self._log_joint(values) + log_det[0])

    def _check_vectorized(self):
        points = self.init + 0.3 * torch.randn(3, self.dim, generator=torch.Generator()
                                               .manual_seed(0)).to(self.init)
        try:
            batched = self._energy_plate(points)
            single = torch.stack([self._energy_single(p) for p in points])
            ok = batched.shape == (3,) and torch.allclose(batched, single, rtol=1e-4,
                                                          atol=1e-4, equal_nan=True)
            reason = "" if ok else "batched energies differ from one-point energies"
        except Exception as e:  # noqa: BLE001 - any failure means: not vectorisable
            ok, reason = False, f"{type(e).__name__}: {e}"
        if not ok:
            warnings.warn("potential_from_model: the model does not broadcast over a leading "
                          f"batch dimension ({reason}); evaluating one point at a time "
                          "(slow). Write the model so it broadcasts (x[..., 0], not x[0]) to "
                          "vectorise it", stacklevel=4)
        return ok

    def pyro_potential(self, x):
        """Pyro's own potential (``initialize_model``'s ``potential_fn``) at one point
        ``(D,)``: a reference for tests."""
        with poutine.block(), _own_plate_dims():
            return self._pyro_potential(self.unpack(x))

    def __repr__(self):
        sites = ", ".join(f"{k}: {tuple(v[0])}" for k, v in self.sites.items())
        return f"ModelPotential(dim={self.dim}, sites={{{sites}}}, vectorized={self.vectorized})"


def potential_from_model(model, *args, vectorize="auto", init_strategy=None, **kwargs):
    r"""The batched potential energy of ``model(*args, **kwargs)`` over its unconstrained latent
    vector: a :class:`ModelPotential`, a callable ``(*batch, D) -> (*batch,)`` with the map
    back to constrained sites (``.constrain(x)``), ``.dim`` and ``.init``.

    ``vectorize`` and ``init_strategy`` are keyword-only options of this function and are not
    passed to the model.

    Example:
        >>> import pyro, pyro.distributions as dist, torch
        >>> def model():
        ...     pyro.sample("s", dist.LogNormal(0.0, 1.0))
        >>> U = potential_from_model(model)
        >>> U(torch.zeros(4, 1)).shape
        torch.Size([4])
    """
    return ModelPotential(model, args, kwargs, vectorize=vectorize, init_strategy=init_strategy)


def standard_normal_energy(x):
    r""":math:`U(x) = |x|^2 / 2 + \frac D2\log 2\pi` (the normalised N(0, I))."""
    return 0.5 * x.square().sum(-1) + 0.5 * x.shape[-1] * math.log(2 * math.pi)


class InterpolatedEnergy(torch.nn.Module):
    r""":math:`U_\lambda = (1 - \lambda)\,U_\text{base} + \lambda\,U_\text{target}` (the paper's
    annealing ladder); an ``nn.Module`` so energies that are modules follow ``.to()``.

    Args:
        base: base energy (default :func:`standard_normal_energy`).
        target: target energy.
        lam: :math:`\lambda \in [0, 1]`.
    """

    def __init__(self, target, lam, base=None):
        super().__init__()
        if not 0 <= float(lam) <= 1:
            raise ValueError(f"lam must be in [0, 1], got {lam}")
        self.target, self.lam = target, float(lam)
        self.base = standard_normal_energy if base is None else base
        self.dim = getattr(target, "dim", None)

    def forward(self, x):
        if self.lam == 1.0:
            return self.target(x)
        if self.lam == 0.0:
            return self.base(x)
        return (1 - self.lam) * self.base(x) + self.lam * self.target(x)

    def extra_repr(self):
        return f"lam={self.lam:g}"


def ladder(target, num, base=None):
    r"""``num`` energies :math:`U_{\lambda_k}`, :math:`\lambda_k = k / num`, ``k = 1..num``
    (the last is the target), for ``num`` MCMC layers placed between bijections."""
    return [InterpolatedEnergy(target, (k + 1) / num, base) for k in range(num)]
