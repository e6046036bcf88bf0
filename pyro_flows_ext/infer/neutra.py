"""NeuTra HMC: NUTS in the space of a trained flow guide's base distribution."""

import time
import warnings
from typing import NamedTuple

import pyro
import torch
from pyro.infer import MCMC, NUTS
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.mcmc.util import initialize_model
from torch.distributions import biject_to
from torch.distributions.transforms import ComposeTransform

__all__ = ["NeuTraResult", "neutra_mcmc", "check_deterministic", "guide_advice",
           "warped_potential"]


class NeuTraResult(NamedTuple):
    """What :func:`neutra_mcmc` returns.

    Attributes:
        samples: dict of site name -> ``(num_chains * num_samples, *site_shape)`` draws in the
            model's own (constrained) space.
        idata: ``arviz.InferenceData`` with ``posterior`` ``(chain, draw, *site)`` and
            ``sample_stats.diverging``.
        latent: ``(num_chains, num_samples, D)`` draws in the warped (base) space.
        divergences: total number of divergent transitions after warmup.
        seconds: wall time of warmup plus sampling, all chains.
        mcmc: the ``pyro.infer.MCMC`` object of each chain.
    """

    samples: dict
    idata: object
    latent: torch.Tensor
    divergences: int
    seconds: float
    mcmc: list


def _flatten(transform):
    if isinstance(transform, ComposeTransform):
        return [p for part in transform.parts for p in _flatten(part)]
    return [transform]


def check_deterministic(guide):
    """Raises ``ValueError`` naming the first layer of ``guide`` that is not a deterministic
    bijection (a surjection or an MCMC layer): NeuTra needs a deterministic potential."""
    if not isinstance(guide, AutoContinuous):
        raise TypeError("neutra_mcmc needs an AutoContinuous guide (e.g. AutoFlowGuide or "
                        f"AutoIAFNormal), got {type(guide).__name__}")
    if guide.prototype_trace is None:
        raise ValueError("the guide has not been set up: train it with SVI first (or call "
                         "guide(*args) once)")
    try:
        transform = guide.get_transform()
    except NotImplementedError as e:
        raise ValueError(f"{type(guide).__name__} has no get_transform(), which NeuTra "
                         "needs") from e
    for i, t in enumerate(_flatten(transform)):
        if not getattr(t, "bijective", True):  # surjections and MCMC layers are not
            raise ValueError(
                f"neutra_mcmc needs a guide made of deterministic bijections, but layer {i} "
                f"({type(t).__name__}) is not bijective (a surjection or stochastic layer); "
                "NUTS needs a deterministic potential: rebuild the guide without it")


JIT_CHECK_POINTS = 4
"""Random base points at which :func:`warped_potential` compares the traced potential with
the eager one before using it (and draws at which :func:`neutra_mcmc` compares them after)."""


def _same_potential(traced, eager, points, grad=True):
    """Whether ``traced`` and ``eager`` agree (value, and gradient with ``grad``) at every
    ``(D,)`` row of ``points``."""
    for z in points:
        z = z.detach().clone().requires_grad_(grad)
        z2 = z.detach().clone().requires_grad_(grad)  # a new tensor: no cached layer pairs
        with torch.set_grad_enabled(grad):
            u_jit, u_eager = traced(z), eager(z2)
            if not torch.allclose(u_jit, u_eager, rtol=1e-5, atol=1e-6):
                return False
            if grad:
                (g_jit,), (g_eager,) = torch.autograd.grad(u_jit, z), torch.autograd.grad(
                    u_eager, z2)
                if not torch.allclose(g_jit, g_eager, rtol=1e-4, atol=1e-6):
                    return False
    return True


def warped_potential(model, guide, model_args=(), model_kwargs=None, jit_compile=None):
    r"""The potential NeuTra's NUTS runs on, :math:`U(z) = -\log p(x, f(z)) -
    \log|\det \partial f/\partial z|`: Pyro's unconstrained potential of ``model`` (support
    log-dets included) at the guide's image :math:`f(z)` of a base point ``z`` ``(D,)``.

    It is what ``poutine.reparam(model, NeuTraReparam(guide))`` gives NUTS, without its extra
    sites and messengers: 1.3x faster eager, and traced once by ``torch.jit.trace`` 2.8x
    faster (banana and eight schools, CPU). A trace freezes Python control flow: it is used
    only where it equals the eager potential, value and gradient, at
    :data:`JIT_CHECK_POINTS` random base points (where the model branches on a latent value
    or draws random numbers, e.g. subsampling, they differ); otherwise (or when tracing
    fails) ``jit_compile=None`` runs eager and ``True`` raises.

    Returns: ``(potential_fn, jitted)``: ``potential_fn({"z": z})`` is a scalar tensor; when
    ``jitted``, ``potential_fn.eager`` / ``.traced`` are the two potentials of ``z`` and
    ``potential_fn.eager_fn`` the eager one of ``{"z": z}``.
    """
    model_kwargs = model_kwargs or {}
    _, model_potential, _, _ = initialize_model(model, model_args, model_kwargs)
    transform = guide.get_transform()
    names = list(guide._unconstrained_shapes)  # _unpack_latent's (prototype trace) order

    def potential(z):
        x = transform(z)
        ladj = transform.log_abs_det_jacobian(z, x)
        values = [value for _, value in guide._unpack_latent(x)]
        return model_potential(dict(zip(names, values))) - ladj.sum()

    def eager_fn(params):
        return potential(params["z"])

    if jit_compile is False:
        return eager_fn, False
    base = guide.get_base_dist()
    try:
        with warnings.catch_warnings(), torch.random.fork_rng():
            warnings.simplefilter("ignore")  # TracerWarnings: Pyro's own checks raise them
            traced = torch.jit.trace(potential, (base.sample(),), check_trace=False)
            if not _same_potential(traced, potential, base.sample((JIT_CHECK_POINTS,))):
                raise ValueError("the traced potential differs from the eager one (the "
                                 "model branches on a latent value or draws random numbers)")
    except Exception as e:  # noqa: BLE001 (any tracing failure falls back)
        if jit_compile:
            raise ValueError(f"neutra_mcmc: jit_compile=True, but tracing the potential "
                             f"failed: {e}") from e
        return eager_fn, False

    def potential_fn(params):
        return traced(params["z"])

    potential_fn.eager, potential_fn.traced, potential_fn.eager_fn = potential, traced, eager_fn
    return potential_fn, True


KHAT_NEUTRA = 0.7
"""Above this PSIS k-hat the guide is not good enough for NeuTra: :func:`neutra_mcmc` warns."""


CHECK_DRAWS = 4000
"""Guide draws behind :func:`neutra_mcmc`'s k-hat check. With 500, k-hat of one trained funnel
guide read 0.32 to 0.86 on three draw seeds (one guide whose NeuTra run failed read 0.52);
with 8000 it read 0.70 to 0.79. The draws are vectorised: 4000 cost 0.2 s on the 31-D
logistic regression."""


def guide_advice(khat, cli=False, flow="none"):
    """The warning :func:`neutra_mcmc` gives before sampling when the guide's k-hat is above
    :data:`KHAT_NEUTRA` (``None`` when it is not); ``cli``: the advice in ``pyro-flows infer``
    options, for a guide built with ``--flow flow``."""
    from ..diagnostics import KHAT_SCOPE

    if khat == khat and khat <= KHAT_NEUTRA:
        return None
    head = (f"the guide's PSIS k-hat is {khat:.2f} (> {KHAT_NEUTRA}): it is not good enough "
            "for NeuTra, whose chains mix badly where the guide's tails are too light. ")
    if cli:
        other = ("" if flow == "none" else "use the default guide (--flow none: site couplings, "
                 "full covariance, sticking the landing), which suits hierarchical "
                 "(funnel-like) models; ")
        return head + (f"Train longer (--steps); {other}reparameterise the model (e.g. a "
                       "non-centred hierarchy); or run plain NUTS")
    return head + ("Train it longer (more SVI steps); a guide with spline or IAF layers "
                   "trains without sticking the landing: the default AutoFlowGuide(model) "
                   "(affine site couplings, full covariance, sticking the landing with "
                   "clipped gradients) suits hierarchical (funnel-like) models; or run plain "
                   f"NUTS. (k-hat: {KHAT_SCOPE})")


def _run_chains(potential_fn, base, num_chains, num_samples, warmup_steps, target_accept_prob,
                max_tree_depth, progress):
    """NUTS on ``potential_fn``, chains one after another, each started at a base draw:
    ``(mcmc objects, (num_chains, num_samples, D) draws, (num_chains, num_samples) divergent
    flags)``."""
    runs, latents, diverging = [], [], []
    for _ in range(num_chains):
        kernel = NUTS(potential_fn=potential_fn, target_accept_prob=target_accept_prob,
                      max_tree_depth=max_tree_depth)
        mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=warmup_steps,
                    initial_params={"z": base.sample()}, disable_progbar=not progress)
        mcmc.run()
        runs.append(mcmc)
        latents.append(mcmc.get_samples()["z"])
        div = torch.zeros(num_samples, dtype=torch.bool)
        idx = mcmc.diagnostics().get("divergences", {}).get("chain 0", [])
        div[[i for i in idx if i < num_samples]] = True
        diverging.append(div)
    return runs, torch.stack(latents), diverging


def neutra_mcmc(model, guide, *model_args, num_samples=1000, warmup_steps=500, num_chains=2,
                seed=None, target_accept_prob=0.8, max_tree_depth=10, progress=False,
                check_guide=True, jit_compile=None, **model_kwargs):
    r"""NUTS on the model reparameterised by a trained flow guide (NeuTra, Hoffman et al. 2019).

    With the guide's map :math:`\theta = f(z)`, NUTS samples
    :math:`p(z \mid x) \propto p(x, f(z))\, |\det \partial f/\partial z|`, which is near
    :math:`N(0, I)` when the guide is good; draws are mapped back through :math:`f` and each
    site's support transform. Chains run one after another in this process.

    Diagnostics (one :class:`~pyro_flows_ext.diagnostics.DiagnosticWarning` each, naming the
    worst sites): before sampling, when the guide's PSIS k-hat (from :data:`CHECK_DRAWS`
    guide draws) is above 0.7, with what to do instead; after sampling, when divergences
    exceed 1% of the draws, when any bulk or tail ESS is below 100 per chain, or when R-hat
    is above 1.01 (:func:`~pyro_flows_ext.diagnostics.mcmc_warnings`). Two chains by
    default, so R-hat is defined.

    Everything after ``guide`` that is positional goes to the model, and the options are
    keyword-only: ``neutra_mcmc(model, guide, x, y, num_samples=500)`` runs ``model(x, y)``.

    Args:
        model: the Pyro model (its observed sites stay observed).
        guide: a trained :class:`~pyro.infer.autoguide.AutoContinuous`
            (e.g. :class:`~pyro_flows_ext.infer.AutoFlowGuide`) of deterministic bijections.
        *model_args: the model's positional arguments.
        num_samples: draws per chain kept after warmup.
        warmup_steps: adaptation steps per chain.
        num_chains: number of chains (default 2; R-hat needs at least 2).
        seed: seeds ``pyro.set_rng_seed`` once before the first chain.
        target_accept_prob, max_tree_depth: NUTS settings.
        progress: show Pyro's progress bar.
        check_guide: ``True`` computes the guide's k-hat first and warns above 0.7 (the
            global RNG is left as it was); ``False`` skips it; a number is taken as a k-hat
            already computed (e.g. by :func:`~pyro_flows_ext.diagnostics.psis_khat`).
        jit_compile: ``None`` traces the potential when the trace matches the eager
            potential (else runs eager), ``True`` requires the trace, ``False`` runs eager
            (:func:`warped_potential`).
        **model_kwargs: the model's keyword arguments.
    Returns: a :class:`NeuTraResult`.
    Raises: ``TypeError`` when the model does not accept ``model_args``/``model_kwargs``
    (e.g. options passed positionally, as in ``neutra_mcmc(model, guide, 1000, 500)`` for a
    model without arguments).
    References: NeuTra-lizing Bad Geometry in Hamiltonian Monte Carlo Using Neural Transport,
    https://arxiv.org/abs/1903.03704
    """
    from ..diagnostics import (  # arviz only when needed
        DiagnosticWarning,
        _plate_depth,
        check_model_args,
        mcmc_warnings,
        to_inference_data,
    )

    for name, value in (("num_samples", num_samples), ("warmup_steps", warmup_steps),
                        ("num_chains", num_chains)):
        if (isinstance(value, bool) or not isinstance(value, int)
                or value < (0 if name == "warmup_steps" else 1)):
            raise ValueError(f"{name} must be a "
                             f"{'non-negative' if name == 'warmup_steps' else 'positive'} "
                             f"integer, got {value!r}")
    check_model_args("neutra_mcmc", model, model_args, model_kwargs)
    if isinstance(guide, AutoContinuous) and guide.prototype_trace is None:
        guide(*model_args, **model_kwargs)
    check_deterministic(guide)
    if check_guide is not False:
        if isinstance(check_guide, bool):
            from ..diagnostics import psis_khat

            with torch.random.fork_rng():  # the chains' draws do not depend on the check
                khat = psis_khat(model, guide, *model_args, num_samples=CHECK_DRAWS,
                                 **model_kwargs)
        else:
            khat = float(check_guide)
        advice = guide_advice(khat)
        if advice:
            warnings.warn(f"neutra_mcmc: {advice}", DiagnosticWarning, stacklevel=2)
    if seed is not None:
        pyro.set_rng_seed(seed)

    grads = [p.requires_grad for p in guide.parameters()]
    guide.requires_grad_(False)  # the guide is fixed; no graph through its parameters
    try:
        potential, jitted = warped_potential(model, guide, model_args, model_kwargs,
                                             jit_compile)
        start = time.perf_counter()
        runs, latent, diverging = _run_chains(potential, guide.get_base_dist(), num_chains,
                                              num_samples, warmup_steps, target_accept_prob,
                                              max_tree_depth, progress)
        if jitted:  # the draws visit regions the trace check did not: compare there too
            rows = latent.reshape(-1, latent.shape[-1])
            picks = rows[torch.linspace(0, len(rows) - 1, 2 * JIT_CHECK_POINTS).long()]
            if not _same_potential(potential.traced, potential.eager, picks, grad=False):
                warnings.warn("neutra_mcmc: the traced potential differs from the model's at "
                              "some draws (the model branches on a latent value?): rerunning "
                              "the chains without tracing (jit_compile=False)",
                              DiagnosticWarning, stacklevel=2)
                runs, latent, diverging = _run_chains(
                    potential.eager_fn, guide.get_base_dist(), num_chains, num_samples,
                    warmup_steps, target_accept_prob, max_tree_depth, progress)
        seconds = time.perf_counter() - start
        # draws go left of every plate dimension (_unpack_latent broadcasts batch dims
        # against the sites' plate dims)
        nesting = _plate_depth(guide.prototype_trace)
        nodes = guide.prototype_trace.nodes
        with torch.no_grad():
            x = guide.get_transform()(
                latent.reshape((-1,) + (1,) * nesting + latent.shape[-1:]))
            flat = {site["name"]: biject_to(site["fn"].support)(value).reshape(
                (-1,) + nodes[site["name"]]["value"].shape)
                for site, value in guide._unpack_latent(x)}
    finally:
        for p, g in zip(guide.parameters(), grads):
            p.requires_grad_(g)
    samples = {k: v.detach() for k, v in flat.items()}
    idata = to_inference_data(samples, num_chains=num_chains)
    idata.add_groups(sample_stats={"diverging": torch.stack(diverging).numpy()})
    for message in mcmc_warnings(idata):
        warnings.warn(f"neutra_mcmc: {message}", DiagnosticWarning, stacklevel=2)
    return NeuTraResult(samples, idata, latent.detach(), int(torch.stack(diverging).sum()),
                        seconds, runs)
