"""``AutoFlowGuide``: a Pyro autoguide whose posterior is a :class:`~pyro_flows_ext.Flow`."""

import contextlib
import inspect
import math
import warnings

import pyro
import torch
import torch.nn.functional as F
from pyro.distributions import TorchDistribution
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.autoguide.initialization import init_to_median
from torch import nn
from torch.distributions import biject_to, constraints
from torch.distributions.transforms import ComposeTransform

from ..core import FlowLayer
from ..distributions import Flow
from ..transforms import (
    AffineCoupling,
)

__all__ = ["AutoFlowGuide", "LocScale", "default_flow"]

_MIN_SCALE = 1e-6

# Guide-specific builder settings, used unless the caller passes the same keyword: few layers
# with bounded log-scales, because Adam's first steps compound across stacked scales, and
# splines applied in the sampling direction (the guide's hot path). The measurements behind
# them: benchmarks/README.md, "Guide defaults: why".
GUIDE_DEFAULTS = {"realnvp": {"num_layers": 4, "norm": None, "conv": False, "clamp": 1.0,
                              "invert": False, "permute": False},
                  "nsf": {"num_layers": 2, "inverse": True},
                  "iaf": {"clamp": 2.0},
                  "maf": {"clamp": 2.0}}

# The couplings that follow the model's site order (``structured=True``): small conditioners
# (they see one scale per earlier site), log-scales up to ``site_clamp`` (10 by default, a
# factor e^10 either way; guides saved before it existed used 5), and at most this many
# boundaries (sites are grouped beyond it).
SITE_COUPLING = {"hidden_dims": (16, 16), "clamp": 10.0}
MAX_SITE_COUPLINGS = 8


#: Constructor arguments added after guides could be saved, with the value a file written
#: before them was built with (``pfe.load`` fills them in, so an old file rebuilds the same
#: guide).
GUIDE_LEGACY_ARGS = {"full_rank": False, "clip": False, "site_clamp": 5.0}

#: The elementwise gradient bound of a sticking-the-landing guide (``clip=None``): as
#: ``pyro.optim.ClippedAdam``'s ``clip_norm``, applied by the guide to its own parameters.
STL_CLIP = 1.0


def default_flow():
    """The default of ``pyro-flows infer --flow``: ``'none'``, the same guide as
    ``AutoFlowGuide(model)`` (``flow=()``: the site couplings and the full-rank ``LocScale``,
    trained with sticking the landing and clipped gradients), at or ahead of Pyro's
    autoguides on every example model under plain Adam (``benchmarks/inference.md``)."""
    return "none"


class LocScale(FlowLayer):
    r"""Affine layer :math:`x = \mu + \sigma \odot (L z)`,
    :math:`\sigma = \mathrm{softplus}(\rho) + 10^{-6}`, :math:`L` unit lower triangular
    (``full_rank=True``; the identity otherwise), :math:`\log|\det J| = \sum_i \log\sigma_i`.

    With ``full_rank`` it is AutoMultivariateNormal's parameterisation
    (:math:`\Sigma = \mathrm{diag}(\sigma) L L^\top \mathrm{diag}(\sigma)`), so a guide ending
    in it contains every full-covariance Gaussian; :math:`L` starts at the identity. The
    softplus keeps the scale positive with gradients that neither vanish nor explode (an
    ``exp`` parameterisation overflows on heavy-tailed posteriors such as the funnel).

    Args:
        dim: event size ``D``.
        loc: initial :math:`\mu`, shape ``(D,)`` (default zeros).
        scale: initial :math:`\sigma` (a float or ``(D,)``).
        full_rank: learn the strictly lower part of :math:`L` (``D(D-1)/2`` parameters).
    Shapes: ``z``, ``x``: ``(*batch, D)``; ``ladj``: ``batch``. The full-rank map and its
    inverse (a unit-triangular solve) cost :math:`O(D^2)` per event.
    """

    def __init__(self, dim, loc=None, scale=1.0, full_rank=False):
        super().__init__()
        self.dim = dim
        loc = torch.zeros(dim) if loc is None else torch.as_tensor(loc).detach().clone()
        scale = torch.as_tensor(scale, dtype=loc.dtype, device=loc.device).expand(dim)
        if loc.shape != (dim,):
            raise ValueError(f"LocScale loc must have shape ({dim},), got {tuple(loc.shape)}")
        if not (scale > _MIN_SCALE).all() or not torch.isfinite(scale).all():
            raise ValueError(f"LocScale scale must be finite and > {_MIN_SCALE}, got {scale}")
        self.loc = nn.Parameter(loc.clone())
        # inverse softplus; for large scales softplus(r) ~ r
        s = scale - _MIN_SCALE
        self.raw_scale = nn.Parameter(torch.where(s > 20, s, torch.expm1(s).log()).clone())
        self.full_rank = bool(full_rank) and dim > 1
        if self.full_rank:  # only the strictly lower part is used
            self.lower = nn.Parameter(loc.new_zeros(dim, dim))

    @property
    def scale(self):
        return F.softplus(self.raw_scale) + _MIN_SCALE

    def scale_tril(self):
        r"""The Cholesky factor :math:`\mathrm{diag}(\sigma) L` of the layer's covariance."""
        scale = self.scale
        if not self.full_rank:
            return torch.diag_embed(scale)
        return scale.unsqueeze(-1) * (self.lower.tril(-1) + torch.eye(
            self.dim, dtype=scale.dtype, device=scale.device))

    def call_and_ladj(self, z):
        scale = self.scale
        if self.full_rank:
            z = z + z @ self.lower.tril(-1).mT
        return self.loc + scale * z, scale.log().sum().expand(z.shape[:-1])

    def inverse_and_ladj(self, x):
        scale = self.scale
        z = (x - self.loc) / scale
        if self.full_rank:
            unit = self.lower.tril(-1) + torch.eye(self.dim, dtype=z.dtype, device=z.device)
            flat = torch.linalg.solve_triangular(unit.mT, z.reshape(-1, self.dim), upper=True,
                                                 left=False, unitriangular=True)
            z = flat.reshape(z.shape)
        return z, -scale.log().sum().expand(x.shape[:-1])

    def extra_repr(self):
        return f"dim={self.dim}, full_rank={self.full_rank}"


class SticksTheLanding(TorchDistribution):
    r"""A flow whose ``log_prob`` of its own reparameterised sample has the
    sticking-the-landing gradient (Roeder, Wu, Duvenaud 2017): the value of
    :math:`\log q_\theta(z)`, the path derivative through :math:`z`, and no score term
    :math:`\partial_\theta \log q_\theta(z)|_z` (zero mean, and all the gradient noise left
    when :math:`q` equals the posterior). Costs one extra inverse pass per step.

    Shapes: as the wrapped flow (event ``(D,)``).
    """

    arg_constraints = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, flow):
        self.flow = flow
        super().__init__(flow.batch_shape, flow.event_shape, validate_args=False)

    def expand(self, batch_shape, _instance=None):
        return SticksTheLanding(self.flow.expand(batch_shape))

    def rsample(self, sample_shape=()):
        return self.flow.rsample(torch.Size(sample_shape))

    def log_prob(self, value):
        log_q = self.flow.log_prob(value)  # the sample's cached pairs: value, total derivative
        if not (torch.is_grad_enabled() and value.requires_grad):
            return log_q
        score = self.flow.log_prob(value.detach())  # inverse pass: gradients to parameters
        return log_q - (score - score.detach())


def site_couplings(sizes, clamp=SITE_COUPLING["clamp"], hidden_dims=SITE_COUPLING["hidden_dims"],
                   max_layers=MAX_SITE_COUPLINGS):
    r"""Affine couplings that follow a model's site order: for each boundary between
    consecutive sites (sizes ``sizes``, packed in model order), the coordinates before it
    pass through and scale and shift those after it,
    :math:`\theta_{>k} = \theta_{>k} e^{s(\theta_{\le k})} + t(\theta_{\le k})`. Earlier sites
    condition later ones as in the model, so a scale hyperparameter can set the spread of
    what it governs (Neal's funnel :math:`x \mid v \sim N(0, e^{v})` is one such layer).

    A funnel's child needs log-scales linear in the parent over its whole range (the 10-D
    funnel's :math:`v/2` spans about :math:`\pm 4.5` at three sd): the bound is 10, where the
    tanh squash is still nearly linear there (at 5 it bent the neck's scale and the guide
    narrowed :math:`v`: ``benchmarks/inference.py``, 3 seeds, W1(v) 0.31 (0.23 to 0.39) ->
    0.26 (0.19 to 0.27)).

    Boundaries beyond ``max_layers`` are dropped evenly (sites are grouped).
    Returns a list of :class:`~pyro_flows_ext.transforms.AffineCoupling` (empty for one site).
    """
    dim = sum(sizes)
    bounds = [sum(sizes[:k]) for k in range(1, len(sizes))]
    if len(bounds) > max_layers:
        step = len(bounds) / max_layers
        bounds = [bounds[math.floor(i * step)] for i in range(max_layers)]
    return [AffineCoupling(dim, hidden_dims=tuple(hidden_dims), mask=torch.arange(dim) < b,
                           clamp=clamp, readout_scale=_readout_scale(hidden_dims))
            for b in bounds]


def _readout_scale(hidden_dims):
    """``1 / H`` for a conditioner whose last hidden width is ``H``. A guide trains at Adam's
    lr ~1e-2 from the first step, when every readout weight moves by ~lr at once: unscaled,
    each layer's log-scale moved by ~0.25 per step and a realnvp guide with site couplings
    overflowed eight schools within 12 steps."""
    return 1.0 / max(tuple(hidden_dims)[-1] if hidden_dims else 1, 1)


def _stl_unsuited(layers):
    """Layers for which sticking the landing is a poor choice: slow inverses (IAF costs ``D``
    passes), element maps known to be unstable with it (splines: the inverse's parameter
    gradients blow up while the knots move), and layers that are not bijections or whose
    log-determinant is estimated (surjections, stochastic layers, residual blocks: the
    guide's log-density is then itself an estimate)."""
    return [type(t).__name__ for t in layers
            if not getattr(t, "stl_stable", True) or not getattr(t, "fast_inverse", True)
            or not getattr(t, "bijective", True) or not getattr(t, "exact", True)]


def _warn_if_renyi(frame, depth=30):
    """Warns (and returns True) when a caller up the stack (within ``depth`` frames) is Pyro's
    ``RenyiELBO``: sticking the landing drops the score term, whose self-normalised
    importance-weighted average is not zero, so that gradient is biased (measured: 8.8
    standard errors off)."""
    from pyro.infer import RenyiELBO

    for _ in range(depth):
        if frame is None:
            return False
        if isinstance(frame.f_locals.get("self"), RenyiELBO):
            warnings.warn("AutoFlowGuide with sticking the landing (stl, on by default for "
                          "affine guides) gives RenyiELBO a biased gradient: build the guide "
                          "with stl=False, or use pyro_flows_ext.infer.iw_dreg_loss, which "
                          "is unbiased with stl=True", UserWarning, stacklevel=2)
            return True
        frame = frame.f_back
    return False


class AutoFlowGuide(AutoContinuous):
    r"""A flow autoguide over all latent sites, unconstrained and packed into one vector of
    size ``D``: :math:`q(\theta) = \mathrm{Flow}(N(0, I), [f_1, \dots, f_K, c_1, \dots, c_S,
    \mathrm{LocScale}])` with the builder's layers :math:`f`, one site-order coupling
    :math:`c` per boundary between latent sites (:func:`site_couplings`) and a final
    location-scale layer.

    A drop-in replacement for :class:`~pyro.infer.autoguide.AutoNormal`; being an
    :class:`~pyro.infer.autoguide.AutoContinuous` it works with ``NeuTraReparam``,
    ``Predictive``, ``median``, ``quantiles`` and ``get_posterior``. The flow layers start at
    the identity and ``LocScale`` at ``init_loc_fn``'s values with scale ``init_scale``, so
    training starts from :math:`N(\theta_0, \sigma_0^2 I)`. Sampling then scoring the same
    tensor (what ``Trace_ELBO`` does) reuses each layer's cached pair, so IAF and spline
    guides never invert.

    Gradients: with sticking the landing (``stl``) the guide's own log-density is
    differentiated along the sample path only (:class:`SticksTheLanding`): unbiased, and
    noise-free at the exact posterior, so a guide that can represent the posterior settles
    instead of jittering. ``stl=None`` (default) turns it on when every layer is affine or
    otherwise suited to it (not splines, whose inverse gradients are unstable while the knots
    move, nor IAF, whose inverse costs ``D`` passes), and then ``clip=None`` bounds every
    gradient element of the guide's parameters by :data:`STL_CLIP` (what
    ``pyro.optim.ClippedAdam``'s ``clip_norm`` does, here inside the guide, so a plain
    ``pyro.optim.Adam`` loop gets it): STL's path gradient has rare huge single-sample values
    (the funnel's neck), and unclipped it left the funnel at W1(v) 1.1 instead of 0.3.

    The default, ``flow=()`` with ``full_rank=True``, is therefore
    :math:`\theta = \mu + \sigma \odot L\, c_S(\dots c_1(z))`: it contains
    AutoMultivariateNormal's family (couplings at the identity) and each later site's
    location and scale depend on the earlier ones (the funnel's and eight schools'
    hierarchies, the banana's quadratic mean).

    Args:
        model: a Pyro model with static structure and continuous latent sites. Data plates may
            be subsampled; local latent variables inside a subsampled plate are not supported
            (as for every ``AutoContinuous``).
        flow: a builder name in :data:`pyro_flows_ext.flows.FLOWS`, a list of transforms
            (default ``()``: only the site couplings and ``LocScale``),
            or a callable ``dim -> transforms`` returning a
            list of transforms, a single transform or a :class:`~pyro_flows_ext.Flow`.
        init_loc_fn: per-site initialisation (Pyro's ``init_to_*``).
        init_scale: initial posterior scale in unconstrained space.
        structured: add the site-order couplings (:func:`site_couplings`).
        site_clamp: the bound on those couplings' log-scales (guides saved before it
            existed are rebuilt with 5).
        stl: sticking-the-landing gradients: ``None`` chooses them from the layers (see
            above), ``True``/``False`` force them on or off.
        full_rank: the final ``LocScale`` learns a unit lower-triangular factor (full
            covariance); ``False``: diagonal.
        clip: elementwise bound on the guide's parameter gradients: ``None`` is
            :data:`STL_CLIP` with sticking the landing and none without, ``False`` none.
        **flow_kwargs: passed to the builder (over the guide defaults in
            :data:`GUIDE_DEFAULTS`).
    Shapes: the posterior's event shape is ``(D,)``.

    Saving: ``pfe.save(guide, path)`` stores the guide's constructor arguments, its latent
    sites' shapes, the model arguments it was traced with (when they are tensors, numbers,
    strings or containers of them) and its ``state_dict``; ``pfe.load(path, model=model)``
    rebuilds it for the same model (see :func:`pyro_flows_ext.io.load`).
    """

    def __init__(self, model, flow=None, init_loc_fn=init_to_median, init_scale=0.1,
                 structured=True, stl=None, full_rank=True, clip=None,
                 site_clamp=SITE_COUPLING["clamp"], **flow_kwargs):
        if not (isinstance(init_scale, (int, float)) and init_scale > 0):
            raise ValueError(f"init_scale must be a positive number, got {init_scale!r}")
        flow = () if flow is None else flow
        if isinstance(flow, str):
            from ..flows import FLOWS

            if flow not in FLOWS:  # checked now, resolved at setup: later builders work too
                raise ValueError(f"unknown flow {flow!r}; expected one of: "
                                 f"{', '.join(sorted(FLOWS))} or a callable dim -> transforms")
        elif isinstance(flow, (list, tuple)):
            flow = tuple(flow)
            bad = [t for t in flow if not isinstance(t, torch.distributions.Transform)]
            if bad:
                raise TypeError(f"a flow list must hold transforms, got {type(bad[0]).__name__}")
        elif not callable(flow):
            raise TypeError(f"flow must be a builder name or a callable dim -> transforms, "
                            f"got {type(flow).__name__}")
        if flow_kwargs and not isinstance(flow, str):
            raise TypeError(f"flow_kwargs {sorted(flow_kwargs)} are only used with a builder "
                            "name; bind them into your callable instead")
        self._flow_spec, self._flow_kwargs, self._init_scale = flow, flow_kwargs, init_scale
        if stl is not None and not isinstance(stl, bool):
            raise TypeError(f"stl must be True, False or None (chosen from the layers), got "
                            f"{stl!r}")
        if not (clip is None or clip is False
                or (isinstance(clip, (int, float)) and not isinstance(clip, bool) and clip > 0)):
            raise ValueError(f"clip must be None (chosen with stl), False or a positive "
                             f"number, got {clip!r}")
        self._structured, self._stl_arg = bool(structured), stl
        if not (isinstance(site_clamp, (int, float)) and 0 < site_clamp < float("inf")):
            raise ValueError(f"site_clamp must be a positive number, got {site_clamp!r}")
        self._site_clamp = float(site_clamp)
        self.stl = bool(stl)  # resolved when the guide is set up (stl=None)
        self._full_rank, self._clip_arg, self._clip = bool(full_rank), clip, False
        self._clipped = {}
        super().__init__(model, init_loc_fn=init_loc_fn)

    # -- construction --------------------------------------------------------------------------
    def _build_layers(self, dim):
        spec = self._flow_spec
        if isinstance(spec, str):
            from ..flows import get_builder

            if dim < 2:
                warnings.warn(f"{type(self).__name__}: the model has one latent dimension; "
                              "coupling flows need two, so the guide is a Normal",
                              stacklevel=3)
                return []
            builder = get_builder(spec)
            kwargs = {**GUIDE_DEFAULTS.get(spec, {}), **self._flow_kwargs}
            params = inspect.signature(builder.__wrapped__).parameters
            kwargs.setdefault("gaussian_start", False)  # LocScale is the guide's affine start
            if "readout_scale" in params and "readout_scale" not in kwargs:
                hidden = kwargs.get("hidden_dims", params["hidden_dims"].default)
                kwargs["readout_scale"] = _readout_scale(hidden)
            return list(builder(dim, **kwargs).transforms)
        if isinstance(spec, tuple):
            return list(spec)
        made = spec(dim)
        if isinstance(made, torch.distributions.TransformedDistribution):
            made = made.transforms
        elif isinstance(made, torch.distributions.Transform):
            made = [made]
        made = list(made)
        bad = [t for t in made if not isinstance(t, torch.distributions.Transform)]
        if bad:
            raise TypeError(f"flow callable must return transforms, got {type(bad[0]).__name__}")
        return made

    def _setup_prototype(self, *args, **kwargs):
        super()._setup_prototype(*args, **kwargs)
        self._model_args = (args, kwargs)  # what pfe.save stores, when it can be stored
        init = self._init_loc()
        if not torch.isfinite(init).all():
            raise ValueError("init_loc_fn gave non-finite initial values; try init_to_sample "
                             "or init_to_feasible")
        layers = self._build_layers(self.latent_dim)
        if self._structured:
            sizes = [math.prod(shape) for shape in self._unconstrained_shapes.values()]
            layers += site_couplings(sizes, clamp=self._site_clamp)
        loc_scale = LocScale(self.latent_dim, init, self._init_scale, full_rank=self._full_rank)
        base_shape = torch.Size([self.latent_dim])  # walked back: layers may change the size
        for t in reversed(layers):
            base_shape = t.inverse_shape(base_shape)
        flow = Flow(None, layers + [loc_scale], event_shape=base_shape)
        self.flow = flow.to(device=init.device, dtype=init.dtype)
        unsuited = _stl_unsuited(layers)
        if self._stl_arg is None:
            self.stl = not unsuited
        self._clip = self._clip_arg
        if self._clip is None:  # chosen with stl
            self._clip = STL_CLIP if self.stl else False
        if self.stl and unsuited:
            warnings.warn(f"stl=True with {unsuited[0]} layers: sticking the landing inverts "
                          "every layer each step, and spline inverses give unstable gradients "
                          "and IAF inverses cost D passes; prefer flow='realnvp' or flow=()",
                          stacklevel=2)

    @property
    def loc_scale(self):
        """The final :class:`LocScale` layer (posterior location and scale)."""
        return self.flow.transforms[-1]

    # -- AutoContinuous API ------------------------------------------------------------------
    def get_base_dist(self):
        """The standard normal base :math:`N(0, I_D)`."""
        return self.flow.base_dist

    def get_transform(self, *args, **kwargs):
        """All layers as one cached transform (for ``NeuTraReparam``)."""
        return ComposeTransform(list(self.flow.transforms), cache_size=1)

    def get_posterior(self, *args, **kwargs):
        """The flow posterior over the unconstrained latent vector, event shape ``(D,)``."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        return self.flow

    def sample_latent(self, *args, **kwargs):
        """Samples the packed latent vector (the guide's one auxiliary site); with ``stl``
        its log-density carries the sticking-the-landing gradient."""
        posterior = self.get_posterior(*args, **kwargs)
        if self._clip and torch.is_grad_enabled():
            self._clip_gradients()
        if self.stl:
            if torch.is_grad_enabled():  # the loss is checked on steps 0, 500, 1000, ...
                steps = getattr(self, "_training_draws", 0)
                self._training_draws = steps + 1
                if steps % 500 == 0 and not getattr(self, "_renyi_warned", False):
                    self._renyi_warned = _warn_if_renyi(inspect.currentframe())
            posterior = SticksTheLanding(posterior)
        return pyro.sample(f"_{self._pyro_name}_latent", posterior, infer={"is_auxiliary": True})

    def _clip_gradients(self):
        # a hook per parameter tensor, added once (a copy of the guide has new tensors and
        # hooks them on its first step: deepcopy and pickling drop tensor hooks)
        c = float(self._clip)
        for p in self.parameters():
            if id(p) not in self._clipped and p.requires_grad:
                p.register_hook(lambda g: g if getattr(self, "_clip_deferred", False)
                                else g.clamp(-c, c))
                self._clipped[id(p)] = True

    @contextlib.contextmanager
    def clipping_deferred(self):
        """Suspends the in-guide gradient clip for the backward passes inside the block, for a
        caller that sums gradients first (data-parallel SVI) and then clips the sum with
        :meth:`clip_gradients_`."""
        self._clip_deferred = True
        try:
            yield self
        finally:
            self._clip_deferred = False

    @torch.no_grad()
    def clip_gradients_(self):
        """Applies the guide's elementwise clip, :math:`g \\leftarrow \\max(-c, \\min(c, g))`, to
        the current ``.grad`` of its parameters (nothing without a clip)."""
        if self._clip:
            for p in self.parameters():
                if p.grad is not None:
                    p.grad.clamp_(-float(self._clip), float(self._clip))

    @torch.no_grad()
    def sample_unconstrained(self, *args, num_samples=1000, **kwargs):
        """Draws ``(num_samples, D)`` unconstrained latent vectors (no gradient); ``args`` and
        ``kwargs`` are the model's own."""
        return self.get_posterior(*args, **kwargs).sample((num_samples,))

    @torch.no_grad()
    def _loc_scale(self, *args, **kwargs):
        # a flow posterior has no closed-form loc/scale: Monte Carlo median and spread
        x = self.sample_unconstrained(*args, num_samples=2000, **kwargs)
        return x.median(0).values, x.std(0)

    @torch.no_grad()
    def quantiles(self, quantiles, *args, num_samples=4000, **kwargs):
        """Monte Carlo posterior quantiles of each latent site (a dict of
        ``(len(quantiles), *site_shape)`` tensors)."""
        x = self.sample_unconstrained(*args, num_samples=num_samples, **kwargs)
        q = torch.as_tensor(quantiles, dtype=x.dtype, device=x.device)
        if q.dim() != 1 or ((q < 0) | (q > 1)).any():
            raise ValueError(f"quantiles must be a list of numbers in [0, 1], got {quantiles}")
        latents = torch.quantile(x, q, dim=0)
        result = {}
        for latent in latents:
            for site, value in self._unpack_latent(latent):
                result.setdefault(site["name"], []).append(biject_to(site["fn"].support)(value))
        return {k: torch.stack(v) for k, v in result.items()}

    @torch.no_grad()
    def median(self, *args, **kwargs):
        r"""The flow's image of the base's median, :math:`f(0)` (each layer applied to the
        zero vector, the median of the standard-normal base), unpacked into sites and mapped
        to each site's support. Deterministic: the same value on every call, and no random
        numbers are drawn (the global RNG is untouched).

        What it is: the point of :math:`q` that the flow transports the base's centre to.
        For element-wise monotone layers (``LocScale``, ``flow=()`` on one site) it is the
        median of every coordinate (monotone maps commute with medians); couplings and
        splines mix coordinates, and then :math:`f(0)` is only the image of the base's centre,
        in general neither :math:`q`'s coordinatewise median nor its mode. For the
        coordinatewise Monte Carlo median use ``guide.quantiles([0.5])``. A stochastic layer
        in the flow (not made by the builders) draws from a fixed seed, so even then the value
        is the same on every call.
        """
        posterior = self.get_posterior(*args, **kwargs)
        base = posterior.base_dist
        x = base.mean.new_zeros(base.batch_shape + base.event_shape)
        # a stochastic layer (if any) draws from a fixed seed, in a forked RNG
        with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
            torch.manual_seed(0)
            for t in posterior.transforms:
                x = t(x)
        return {site["name"]: biject_to(site["fn"].support)(value)
                for site, value in self._unpack_latent(x)}
