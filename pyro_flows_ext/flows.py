"""Ready-made flows. Every builder takes the event size ``dim`` first and returns a
:class:`~pyro_flows_ext.Flow`; ``FLOWS`` maps the names the CLI and ``pfe.load`` use."""

import inspect

import torch

from .distributions import Flow
from .transforms import (
    ActNorm,
    AffineCoupling,
    CholeskyAffine,
    InvertibleBatchNorm,
    InvertibleConv1x1,
    MaskedAutoregressive,
    Permute,
    RationalQuadraticSpline,
    ResidualBlock,
    Reverse,
    SplineCoupling,
    Standardize,
)

FLOWS = {}

#: Values that arguments added to a builder later had before they existed: a saved spec
#: without the argument was written by a version that built the flow this way.
LEGACY_DEFAULTS = {"realnvp": {"norm": "actnorm", "conv": True, "invert": False,
                               "zero_init": True, "permute": False, "mask": "halves",
                               "squash": "tanh", "whiten": "data"},
                   "nsf": {"whiten": "data"},
                   "ot_flow": {"num_steps": 8, "transport_weight": 1.0, "hjb_weight": 1.0}}


def register(fn):
    """Adds a builder to :data:`FLOWS` and records its name and full arguments (defaults
    included, so a saved flow reloads identically whatever later defaults become) on the flow
    it returns (``flow.spec``), which is what :func:`pyro_flows_ext.save` stores.

    Every builder also takes two data-side options, applied after its own layers:

    * ``gaussian_start=True``: a :class:`~pyro_flows_ext.transforms.CholeskyAffine` at the
      data end, which ``fit_density`` initialises to the full-covariance Gaussian fit of the
      training data (so step 0 is that fit; ``False`` leaves it out). A builder may ask for
      it at the base end instead (``flow.gaussian_start_side = "base"``, realnvp's default):
      then a :class:`~pyro_flows_ext.transforms.Standardize` sits at the data end (so
      ``standardize`` adds nothing) and the CholeskyAffine is set from the standardised
      data, again the full-covariance Gaussian fit at step 0;
    * ``standardize=False``: ``True`` adds a fixed
      :class:`~pyro_flows_ext.transforms.Standardize` after it (the identity until set from
      data, e.g. by ``fit_density``), so the flow is a density in the data's own units.

    Image builders take a shape ``(C, H, W)`` as ``dim``; both options are vector layers, so
    for them ``gaussian_start`` is off (asking for either is an error) and ``flow.spec``
    also records ``shape``.
    """
    signature = inspect.signature(fn)

    def builder(dim, gaussian_start=None, standardize=False, **kwargs):
        image = isinstance(dim, (tuple, list, torch.Size))
        if image:
            if gaussian_start or standardize:
                raise ValueError(f"{fn.__name__}({tuple(dim)}, ...) builds an image flow: "
                                 "gaussian_start and standardize are vector layers and are not "
                                 "available; leave them out (preprocess images with a logit "
                                 "or dequantization layer instead)")
            dim, gaussian_start = tuple(int(d) for d in dim), False
        elif gaussian_start is None:
            gaussian_start = True
        bound = signature.bind(dim, **kwargs)
        bound.apply_defaults()
        full = {}
        for name, value in list(bound.arguments.items())[1:]:
            if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                full.update(value)
            else:
                full[name] = value
        flow = fn(dim, **kwargs)
        if gaussian_start and getattr(flow, "gaussian_start_side", "data") == "base":
            # the full-covariance map at the base end, the data only standardised per axis
            # on the data side (the builder asked for it: realnvp's whiten="base")
            flow = Flow(None, [CholeskyAffine(dim)] + list(flow.transforms) + [Standardize(dim)])
        elif gaussian_start or standardize:
            data_side = (([CholeskyAffine(dim)] if gaussian_start else [])
                         + ([Standardize(dim)] if standardize else []))
            flow = Flow(None, list(flow.transforms) + data_side)
        full.update(gaussian_start=bool(gaussian_start), standardize=bool(standardize))
        flow.spec = {"flow": fn.__name__, "dim": dim, "kwargs": full}
        if image:
            flow.spec["shape"] = dim
        return flow

    builder.__name__, builder.__doc__, builder.__wrapped__ = fn.__name__, fn.__doc__, fn
    FLOWS[fn.__name__] = builder
    return builder


def get_builder(name):
    """The builder called ``name``, or a clear error listing the known ones."""
    if name not in FLOWS:
        raise ValueError(f"unknown flow {name!r}; expected one of: {', '.join(sorted(FLOWS))}")
    return FLOWS[name]


_NORMS = {"actnorm": ActNorm, "batchnorm": InvertibleBatchNorm, None: None, "none": None}


@register
def realnvp(dim, num_layers=8, hidden_dims=(64, 64), norm=None, conv=False, lu=False,
            clamp=5.0, readout_scale=1.0, invert=True, zero_init=True, permute=True,
            mask="halves", squash="tanh", whiten="base"):
    r"""RealNVP/Glow stack, the tutorial's "putting it all together": ``num_layers`` times
    affine coupling, a normalisation and a mixing layer (a fixed reversal; with ``conv=True``
    the tutorial's invertible 1x1 convolution, a learned rotation of the event).

    Defaults (measured on ``make_moons(noise=0.05)``, 2000 ``fit_density`` steps, 3 seeds):
    affine maps in zuko's data-to-base form (``invert=True``: test NLL median 0.343 vs 0.373
    for the generative form) and reversals instead of 1x1 convolutions (the convolution made
    the result seed-dependent and cost a third of the training speed). No ActNorm by default:
    the Gaussian start already standardises the data side (toy moons / checkerboard, 3
    seeds: 1.713 / 3.687 without it, 1.714 / 3.691 with it, at 0.73x the time per step).
    The Gaussian start's full-covariance map sits at the base end (``whiten="base"``), the
    couplings seeing the data standardised per axis, not rotated: under one training loop
    against zuko's RealNVP (``benchmarks/realnvp_parity.md``, 3 seeds) this took the 32-D
    banana mixture from 33.83 to 33.52 nats (zuko 33.63) and cut the validation-loss spikes
    on checkerboard from 0.16-0.65 to 0.03 nats; zuko's checkered masks (``mask="alternate"``)
    and its rational log-scale bound (``squash="rational"``) did not help there.

    Args:
        dim: event size ``D >= 2``.
        num_layers: number of (coupling, norm, mixing) blocks.
        hidden_dims: hidden sizes of each coupling network.
        norm: ``"actnorm"``, ``"batchnorm"`` or ``None``.
        conv: learned 1x1 convolution between couplings (else ``Reverse``).
        lu: LU-parametrised 1x1 convolution.
        clamp: bound on the coupling log-scales.
        readout_scale: multiplies each conditioner's last layer (``1 / H`` in guides).
        invert: affine maps run data to base (``z_b = x_b e^s + t``, zuko's form); ``False``:
            base to data (``x_b = z_b e^s + t``, the earlier default).
        zero_init: couplings start at the identity.
        permute: without ``conv``, mix with fixed random permutations for ``D > 2`` (a
            reversal keeps the same halves together, so coordinates in one half would never
            condition each other: an augmented 4-D realnvp on checkerboard stalled at 4.50
            nats with reversals, 4.01 with permutations, 3.93 with 1x1 convolutions, 1000
            steps); ``False``: reversals.
        mask: ``"halves"``: each coupling transforms the second half of its input given the
            first, with a mixing layer (reversal, permutation or convolution) in between;
            ``"alternate"``: zuko's checkered masks (coupling ``i`` passes the coordinates
            of parity ``i mod 2`` through) and no mixing layer unless ``conv``.
        squash: how the raw log-scale is bounded by ``clamp``: ``"tanh"``
            (:math:`b \tanh(r/b)`) or ``"rational"`` (:math:`r / (1 + |r|/b)`, zuko's).
        whiten: where the Gaussian start's full-covariance map sits (with
            ``gaussian_start=True``): ``"base"``: at the base end, the couplings seeing the
            data standardised per axis (a fixed data-side ``Standardize``); ``"data"``: at the
            data end, the couplings seeing whitened (rotated) data, the earlier layout. Both
            start at the full-covariance Gaussian fit.
    """
    if norm not in _NORMS:
        raise ValueError(f"unknown norm {norm!r}; expected 'actnorm', 'batchnorm' or None")
    if mask not in ("halves", "alternate"):
        raise ValueError(f"unknown mask {mask!r}; expected 'halves' or 'alternate'")
    _check_whiten(whiten)
    layers = []
    for i in range(num_layers):
        layers.append(AffineCoupling(dim, hidden_dims=tuple(hidden_dims), clamp=clamp,
                                     readout_scale=readout_scale, invert=invert,
                                     zero_init=zero_init, squash=squash,
                                     mask=None if mask == "halves"
                                     else torch.arange(dim) % 2 == i % 2))
        if _NORMS[norm] is not None:
            layers.append(_NORMS[norm](dim))
        if conv:
            layers.append(InvertibleConv1x1(dim, lu=lu))
        elif mask == "alternate":
            continue
        elif permute and dim > 2:  # a fixed random permutation (a buffer, saved)
            layers.append(Permute(dim))
        else:
            layers.append(Reverse(dim))
    flow = Flow(None, layers)
    flow.gaussian_start_side = whiten
    return flow


def _check_whiten(whiten):
    if whiten not in ("base", "data"):
        raise ValueError(f"unknown whiten {whiten!r}; expected 'base' or 'data'")


# -- expressive flows: splines, autoregressive, residual (issue 3) ---------------------------

def _alternating_mask(dim, i):
    mask = torch.arange(dim) < dim // 2
    return mask if i % 2 == 0 else ~mask


@register
def nsf(dim, num_layers=4, hidden_dims=(64, 64), count_bins=8, bound=5.0, context_dim=0,
        inverse=False, readout_scale=1.0, whiten="base"):
    r"""Neural Spline Flow (NSF-C, Durkan et al. 2019): ``num_layers`` rational-quadratic
    spline couplings with alternating masks (``dim == 1``: element-wise splines). Starts at
    the identity; one network pass per layer in either direction.

    Args:
        dim: event size ``D``.
        num_layers: number of couplings.
        hidden_dims: hidden sizes of each conditioner.
        count_bins: bins per spline.
        bound: spline interval ``[-bound, bound]`` (identity tails outside).
        context_dim: context size for a conditional flow (``flow.condition(c)``).
        inverse: ``False`` (default) applies each spline data to base, so ``log_prob`` (training)
            uses the closed-form direction and sampling solves a quadratic; ``True`` the reverse
            (cheaper sampling, e.g. for guides). See :class:`SplineCoupling`.
        readout_scale: multiplies each conditioner's last layer (``1 / H`` in guides).
        whiten: where the Gaussian start's full-covariance map sits (as in :func:`realnvp`):
            ``"base"`` (default) at the base end, the splines seeing the data standardised per
            axis; ``"data"``: at the data end (the earlier layout). On small real data
            (``benchmarks/small_data.md``, 500 steps) the base end took digits-64 from 6.0 to
            27.8 nats better than the Gaussian, diabetes from 1.3 to 3.1.

    The defaults reach test NLL within 0.02 nats of the true entropy on checkerboard and
    8gaussians in 15,000 steps (batch 512, Adam 2e-3 with cosine decay; about 2.5 CPU
    minutes on one thread; ``benchmarks/entropy_budget.py``).
    """
    _check_whiten(whiten)
    if dim == 1:
        if context_dim:
            flow = _autoregressive(1, num_layers, hidden_dims, "spline", False, context_dim,
                                   count_bins, bound, 5.0, readout_scale)
        else:
            flow = Flow(None, [RationalQuadraticSpline(1, count_bins, bound)
                               for _ in range(num_layers)])
    else:
        flow = Flow(None, [SplineCoupling(dim, tuple(hidden_dims), count_bins, bound,
                                          mask=_alternating_mask(dim, i),
                                          context_dim=context_dim, inverse=inverse,
                                          readout_scale=readout_scale)
                           for i in range(num_layers)])
    flow.gaussian_start_side = whiten
    return flow


def _autoregressive(dim, num_layers, hidden_dims, kind, inverse, context_dim, count_bins, bound,
                    clamp, readout_scale):
    layers = []
    for i in range(num_layers):
        order = torch.arange(dim) if i % 2 == 0 else torch.arange(dim).flip(0)
        layers.append(MaskedAutoregressive(dim, kind, inverse, tuple(hidden_dims), context_dim,
                                           count_bins, bound, order, clamp, readout_scale))
    return Flow(None, layers)


@register
def maf(dim, num_layers=5, hidden_dims=(64, 64), kind="affine", context_dim=0, count_bins=8,
        bound=5.0, clamp=5.0, readout_scale=1.0, whiten="data"):
    r"""Masked Autoregressive Flow (Papamakarios et al. 2017): ``num_layers``
    :class:`~pyro_flows_ext.transforms.MaskedAutoregressive` layers (``inverse=False``) with
    alternating orders. ``log_prob`` costs one MADE pass per layer; sampling costs ``D``.

    Args:
        dim: event size ``D``.
        num_layers: number of autoregressive layers.
        hidden_dims: MADE hidden sizes.
        kind: ``'affine'`` or ``'spline'`` element maps.
        context_dim: context size for a conditional flow.
        count_bins, bound: spline settings.
        clamp: bound on the affine log-scales.
        readout_scale: multiplies each MADE's output layer (``1 / H`` in guides).
        whiten: where the Gaussian start's full-covariance map sits (as in :func:`realnvp`):
            ``"data"`` (default) or ``"base"``. The base end helped on diabetes (1.7 nats
            worse than the Gaussian -> 1.0 better, ``benchmarks/small_data.md``) and
            checkerboard (3.76 -> 3.71) but lost on moons (1.74 -> 1.75-1.87, 3 seeds), so
            maf keeps the data end.
    """
    _check_whiten(whiten)
    flow = _autoregressive(dim, num_layers, hidden_dims, kind, False, context_dim, count_bins,
                           bound, clamp, readout_scale)
    flow.gaussian_start_side = whiten
    return flow


@register
def iaf(dim, num_layers=5, hidden_dims=(64, 64), kind="affine", context_dim=0, count_bins=8,
        bound=5.0, clamp=5.0, readout_scale=1.0):
    r"""Inverse Autoregressive Flow (Kingma et al. 2016), for guides: sampling (with its
    log-density) costs one MADE pass per layer; scoring an arbitrary ``x`` costs ``D``.
    Arguments as in :func:`maf`."""
    return _autoregressive(dim, num_layers, hidden_dims, kind, True, context_dim, count_bins,
                           bound, clamp, readout_scale)


@register
def residual_flow(dim, num_blocks=6, hidden_dims=(64, 64), lipschitz=0.97, logdet="exact",
                  actnorm=True, **block_kwargs):
    r"""Residual Flow (Chen et al. 2019): ``num_blocks`` invertible residual blocks
    :math:`z = x + g(x)` (data -> base), each preceded on the data side by an ActNorm.
    ``log_prob`` is one pass per block (no fixed-point iteration); sampling solves each
    block by fixed-point iteration. Eval mode uses the exact log-det.

    Args:
        dim: event size ``D``.
        num_blocks: number of residual blocks.
        hidden_dims: hidden sizes of each block's ``g``.
        lipschitz: bound on :math:`\mathrm{Lip}(g)` per block.
        logdet: training log-det estimator, ``'exact'`` (small ``D``), ``'power'`` or
            ``'roulette'``.
        actnorm: an ActNorm on the data side of every block.
        block_kwargs: further :class:`~pyro_flows_ext.transforms.ResidualBlock` arguments.
    """
    layers = []
    for _ in range(num_blocks):
        layers.append(ResidualBlock(dim, tuple(hidden_dims), lipschitz, logdet, **block_kwargs))
        if actnorm:
            layers.append(ActNorm(dim))
    return Flow(None, layers)


# -- continuous flows (issue 13) -------------------------------------------------------------

@register
def ffjord(dim, hidden_dims=(64, 64, 64), trace="hutchinson", noise="rademacher", T=1.0,
           solver="dopri5", rtol=1e-5, atol=1e-5, adjoint=False, augment_dim=0, context_dim=0,
           eval_trace="exact", kinetic_weight=0.0, jacobian_weight=0.0, layer="concatsquash",
           activation="tanh"):
    r"""FFJORD (Grathwohl et al. 2019): one :class:`~pyro_flows_ext.continuous.CNF` with a
    concat-squash dynamics network (zero-initialised: starts at the identity). Training uses
    Hutchinson's trace (one probe per solve), eval mode the exact trace; sampling and scoring
    each cost one adaptive ODE solve. ``augment_dim > 0`` makes it an augmented neural ODE
    (``log_prob`` a lower bound); ``kinetic_weight``/``jacobian_weight`` switch on RNODE's
    regularisers (:func:`pyro_flows_ext.continuous.regularization`). Trains by maximum
    likelihood (``fit_density``) or simulation-free (``fit_flow_matching``). Arguments as in
    :class:`~pyro_flows_ext.continuous.CNF`."""
    from .continuous import CNF

    return Flow(None, [CNF(dim, tuple(hidden_dims), trace, noise, T, solver, rtol, atol,
                           adjoint, augment_dim, context_dim, eval_trace, kinetic_weight,
                           jacobian_weight, layer, activation)])


@register
def ot_flow(dim, width=32, depth=2, rank=None, T=1.0, num_steps=4, eval_steps=None,
            context_dim=0, transport_weight=0.01, hjb_weight=0.05):
    r"""OT-Flow (Onken et al. 2021): one :class:`~pyro_flows_ext.continuous.OTFlow`, a
    potential-gradient CNF with the exact trace in closed form and fixed-step RK4
    (``num_steps`` training, ``eval_steps`` in eval mode). Its transport and HJB penalties are
    added to the loss with :func:`pyro_flows_ext.continuous.regularization`. Defaults: 4 RK4
    steps in training, in eval mode as many as the log-density needs (``eval_steps=None``:
    doubled until it moves by under 1e-3 nats; before, a fixed 12, which scored a stiff
    model 0.4 nats too well), penalty weights 0.01 / 0.05 relative to the NLL
    (Onken et al.'s alpha = [1, 100, 5] up to the common factor 100); before, 8 steps and
    weights 1 / 1 (``LEGACY_DEFAULTS``). Arguments as in
    :class:`~pyro_flows_ext.continuous.OTFlow`."""
    from .continuous import OTFlow

    return Flow(None, [OTFlow(dim, width, depth, rank, T, num_steps, eval_steps,
                              context_dim, transport_weight, hjb_weight)])


# -- surjective flows (issue 11) --------------------------------------------------------------

def _inner_layers(dim, inner, num_layers, hidden_dims, count_bins, bound):
    """The bijective layers under a surjection: ``nsf`` (any ``dim``) or ``realnvp``."""
    if inner == "nsf":
        return list(nsf.__wrapped__(dim, num_layers, tuple(hidden_dims), count_bins,
                                    bound).transforms)
    if inner == "realnvp":
        return list(realnvp.__wrapped__(dim, num_layers, tuple(hidden_dims)).transforms)
    raise ValueError(f"unknown inner flow {inner!r}; expected 'nsf' or 'realnvp'")


@register
def abs_flow(dim, inner="nsf", num_layers=4, hidden_dims=(64, 64), count_bins=8, bound=5.0,
             learn_signs=True, sign_hidden_dims=(32, 32)):
    r"""A flow for data symmetric under sign flips (SurVAE's absolute-value surjection): an
    inner bijective flow on :math:`\mathbb{R}^D`, a
    :class:`~pyro_flows_ext.surjections.HalfNormalMap` onto the positive orthant and
    :class:`~pyro_flows_ext.surjections.Abs`, whose learned sign model
    :math:`p(s \mid |x|)` (uniform at the start) places each folded point in its orthants.
    Exact ``log_prob``; starts at :math:`N(0, I)` (the builder's Gaussian start holds).
    The fold is at the origin of the Gaussian start's whitened coordinates.

    Args:
        dim: event size ``D``.
        inner: ``'nsf'`` (spline couplings; element-wise splines at ``D = 1``) or
            ``'realnvp'``.
        num_layers, hidden_dims, count_bins, bound: the inner flow's settings.
        learn_signs: learn the sign model (else uniform signs).
        sign_hidden_dims: hidden sizes of the sign network.
    """
    from .surjections import Abs, HalfNormalMap

    layers = _inner_layers(dim, inner, num_layers, hidden_dims, count_bins, bound)
    return Flow(None, layers + [HalfNormalMap(dim),
                                Abs(dim, learn_signs, tuple(sign_hidden_dims))])


@register
def rad_flow(dim, inner="nsf", num_layers=4, hidden_dims=(64, 64), count_bins=8, bound=5.0,
             num_pieces=3, gate_hidden_dims=(32, 32)):
    r"""An inner bijective flow followed by a :class:`~pyro_flows_ext.surjections.RAD` layer
    (Dinh et al. 2019): a learned piecewise-linear fold of each coordinate into
    ``num_pieces`` pieces with a gating network :math:`p(k \mid z)`; a mixture-like model
    with exact ``log_prob``.

    Args:
        dim: event size ``D``.
        inner: ``'nsf'`` or ``'realnvp'``.
        num_layers, hidden_dims, count_bins, bound: the inner flow's settings.
        num_pieces: pieces per coordinate (odd, >= 3).
        gate_hidden_dims: hidden sizes of the gating network.
    """
    from .surjections import RAD

    layers = _inner_layers(dim, inner, num_layers, hidden_dims, count_bins, bound)
    return Flow(None, layers + [RAD(dim, num_pieces, tuple(gate_hidden_dims))])


# -- image flows (issue 14) --------------------------------------------------------------------

_IMAGE_CONVS = ("1x1", "lu", "emerging")


def _image_conv(kind, channels):
    from .transforms import EmergingConv

    if kind == "emerging":
        return EmergingConv(channels)
    return InvertibleConv1x1(channels, lu=kind == "lu", event_dim=3)


def _check_image_args(shape, levels, steps_per_level, factor_out, coupling_mask, conv,
                      slice_fraction):
    if not isinstance(shape, tuple) or len(shape) != 3 or any(s < 1 for s in shape):
        raise ValueError(f"glow expects an image shape (C, H, W) of positive sizes, got "
                         f"{shape!r} (for vectors use realnvp, nsf, maf, ...)")
    if int(levels) < 1 or int(steps_per_level) < 1:
        raise ValueError(f"glow needs levels >= 1 and steps_per_level >= 1, got {levels}, "
                         f"{steps_per_level}")
    step = 2 ** int(levels)
    if shape[1] % step or shape[2] % step:
        raise ValueError(f"glow with levels={levels} halves height and width {levels} times, so "
                         f"both must be divisible by {step}; got shape {tuple(shape)}")
    for name, value, allowed in (("factor_out", factor_out, ("slice", "maxpool")),
                                 ("coupling_mask", coupling_mask, ("checkerboard", "channel")),
                                 ("conv", conv, _IMAGE_CONVS)):
        if value not in allowed:
            raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(allowed)}")
    if not 0 < slice_fraction < 1:
        raise ValueError(f"slice_fraction must be in (0, 1), got {slice_fraction}")


@register
def glow(shape, levels=2, steps_per_level=4, hidden_channels=64, num_blocks=1,
         factor_out="slice", coupling_mask="channel", conv="lu", slice_fraction=0.5,
         clamp=5.0, context_dim=0, dequantize=None, k=256, alpha=0.05):
    r"""Multi-scale Glow (Kingma & Dhariwal 2018) over continuous ``(C, H, W)`` images, with
    RealNVP's or SurVAE's factor-out. From data to base: a :class:`~.transforms.Squeeze`,
    then ``levels`` scales of ``steps_per_level`` steps (:class:`~.transforms.ActNorm`, an
    invertible convolution, an :class:`~.transforms.ImageCoupling`); between scales a
    factor-out halves height and width:

    * ``"slice"``: a squeeze, then a :class:`~.surjections.ChannelSlice` keeping
      ``slice_fraction`` of the channels (0.5: Glow's split; 0.25 keeps as many values as
      max-pooling, SurVAE's matched baseline); the dropped channels get a Gaussian whose
      mean and scale a ResNet computes from the kept ones (Glow's learned prior).
    * ``"maxpool"``: a :class:`~.surjections.MaxPool2d` (SurVAE Flows, Nielsen et al. 2020),
      keeping the window maxima (a quarter of the values); position and gaps are modelled
      given the maxima.

    The base is a standard normal over the last scale's shape. Both factor-outs are inference
    surjections, so ``log_prob`` is exact. The flow models continuous values (e.g. logits
    of dequantized pixels); add the data-side preprocessing after its layers
    (``Flow(None, list(flow.transforms) + [...])``: the base shape is known to the first
    layer). Every coupling starts at the identity and every ActNorm is set from data by
    ``fit_density``.

    Args:
        shape: ``(C, H, W)``, ``H`` and ``W`` divisible by ``2 ** levels``.
        levels: number of scales.
        steps_per_level: Glow steps per scale.
        hidden_channels: width of every conditioner ResNet.
        num_blocks: residual blocks per ResNet.
        factor_out: ``"slice"`` or ``"maxpool"``.
        coupling_mask: ``"channel"`` (Glow: halves of the channels, alternating) or
            ``"checkerboard"`` (RealNVP: alternating pixel parities).
        conv: ``"lu"`` (LU-parametrised 1x1 convolution), ``"1x1"`` (plain 1x1) or
            ``"emerging"`` (3x3 :class:`~.transforms.EmergingConv`; sampling solves a
            triangular system per scale).
        slice_fraction: share of the squeezed channels a slice keeps.
        clamp: soft bound on the coupling and slice log-scales.
        context_dim: size of a context vector (e.g. a one-hot class) seen by every coupling
            and slice: a conditional flow, ``flow.condition(c)``.
        dequantize: ``None`` (a flow over continuous images), ``"uniform"`` or
            ``"variational"``: a model of ``k``-level integer images, with a
            :class:`~.transforms.Logit` (margin ``alpha``, scale ``k``) and a
            :class:`~.surjections.UniformDequantization` or
            :class:`~.surjections.VariationalDequantization` at the data end; ``log_prob``
            is then a lower bound on the discrete log-probability (``is_exact`` False) and
            :func:`~.infer.bits_per_dim` reports bits/dim.
        k: number of levels of the data (256 for 8-bit images, 17 for digits).
        alpha: the logit's margin.
    Shapes: ``flow.event_shape == shape``; ``sample((n,))``: ``(n, C, H, W)``;
    ``log_prob(x)`` for ``x`` of shape ``(*batch, C, H, W)``: ``batch``.

    Example:
        >>> flow = glow((1, 8, 8), levels=2, steps_per_level=1, hidden_channels=8)
        >>> tuple(flow.event_shape), tuple(flow.base_dist.event_shape)
        ((1, 8, 8), (8, 2, 2))
        >>> tuple(flow.log_prob(torch.randn(5, 1, 8, 8)).shape)
        (5,)
    """
    from .surjections import ChannelSlice, MaxPool2d
    from .transforms import ImageCoupling, Squeeze

    _check_image_args(shape, levels, steps_per_level, factor_out, coupling_mask, conv,
                      slice_fraction)
    c, h, w = shape
    layers = [Squeeze(c)]  # data to base; reversed at the end
    c, h, w = 4 * c, h // 2, w // 2
    for level in range(int(levels)):
        if coupling_mask == "checkerboard" and h * w < 2:
            raise ValueError(f"a checkerboard coupling needs at least 2 pixels, but scale "
                             f"{level} of glow{tuple(shape)} is {h}x{w}; use "
                             "coupling_mask='channel' or fewer levels")
        for step in range(int(steps_per_level)):
            layers += [ActNorm(c, event_dim=3), _image_conv(conv, c),
                       ImageCoupling(c, coupling_mask, step % 2, hidden_channels, num_blocks,
                                     clamp, context_dim)]
        if level == levels - 1:
            break
        if factor_out == "slice":
            c, h, w = 4 * c, h // 2, w // 2
            keep = round(c * slice_fraction)
            if not 0 < keep < c:
                raise ValueError(f"slice_fraction={slice_fraction} keeps {keep} of {c} "
                                 "channels; expected at least one kept and one dropped")
            layers += [Squeeze(c // 4), ChannelSlice(c, keep, hidden_channels, num_blocks,
                                                     clamp, context_dim)]
            c = keep
        else:
            layers.append(MaxPool2d(c))
            h, w = h // 2, w // 2
    layers = layers[::-1]
    layers[0].base_shape = (c, h, w)
    return Flow(None, layers + _dequantization(shape, dequantize, k, alpha))


def _dequantization(shape, dequantize, k, alpha):
    """The data-side layers of a model of ``k``-level images: a logit, then a dequantization."""
    from .surjections import UniformDequantization, VariationalDequantization
    from .transforms import Logit

    if dequantize is None:
        return []
    kinds = {"uniform": lambda: UniformDequantization(k, event_dim=3),
             "variational": lambda: VariationalDequantization(shape, k)}
    if dequantize not in kinds:
        raise ValueError(f"unknown dequantize {dequantize!r}; expected None, 'uniform' or "
                         "'variational'")
    return [Logit(shape[0], alpha, k, event_dim=3), kinds[dequantize]()]


glow.image = True  # takes a (C, H, W) shape, not a vector size (tests over FLOWS skip it)
