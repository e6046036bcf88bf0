"""Diagnostics for guides and MCMC runs with arviz: PSIS k-hat, importance-weighted evidence,
``InferenceData``. arviz is imported here only (it is slow to import)."""

import inspect
import math
import warnings

import arviz as az
import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer.importance import vectorized_importance_weights

__all__ = ["DiagnosticWarning", "KHAT_SCOPE", "log_importance_weights", "psis_khat",
           "log_evidence", "mcmc_warnings", "to_inference_data"]


class DiagnosticWarning(UserWarning):
    """A run's diagnostics say its draws or its guide may not be trustworthy (divergences,
    small effective sample sizes, R-hat above 1.01, a guide's k-hat above 0.7). Raised by
    :func:`~pyro_flows_ext.infer.neutra_mcmc`; filter it with
    ``warnings.simplefilter("error", DiagnosticWarning)`` to make such runs fail."""


KHAT_SCOPE = ("it checks that the guide's tails are not too light where the guide has mass; "
              "it cannot see posterior regions the guide never visits (a missed mode, the "
              "unexplored part of a ring)")
"""What PSIS k-hat can and cannot tell, in one sentence (printed next to every k-hat)."""

#: Thresholds of :func:`mcmc_warnings`: divergent fraction of draws, ESS per chain, R-hat.
MAX_DIVERGENT_FRACTION, MIN_ESS_PER_CHAIN, MAX_RHAT = 0.01, 100, 1.01


def check_model_args(caller, model, args, kwargs):
    """Raises a ``TypeError`` naming ``caller`` when ``model(*args, **kwargs)`` does not match
    the model's signature: the functions here pass every positional argument after the guide
    to the model, and their own options are keyword-only."""
    try:
        signature = inspect.signature(model)
    except (TypeError, ValueError):  # no signature to check (some builtins): let it run
        return
    try:
        signature.bind(*args, **kwargs)
    except TypeError as e:
        shown = ", ".join([repr(a) if not torch.is_tensor(a) else f"<tensor {tuple(a.shape)}>"
                           for a in args] + [f"{k}=..." for k in kwargs])
        raise TypeError(
            f"{caller}: the model cannot be called with ({shown}): {e}. Every positional "
            f"argument after the guide goes to the model and the options are keyword-only: "
            f"{caller}(model, guide, *model_args, num_samples=..., **model_kwargs)") from None


def _traces(model, guide, args, kwargs):
    """One guide trace and the model's trace replayed on it, hidden from outer handlers."""
    with poutine.block():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *args, **kwargs)
    return model_trace, guide_trace


def _plate_depth(*traces):
    """The deepest vectorized plate of the traces' sample sites (0 without plates)."""
    dims = [-f.dim for tr in traces for site in tr.nodes.values()
            if site["type"] == "sample" for f in site["cond_indep_stack"] if f.vectorized]
    return max(dims, default=0)


def _max_plate_nesting(model, guide, args, kwargs):
    return _plate_depth(*_traces(model, guide, args, kwargs))


def _autocontinuous_log_weights(model, guide, num_samples, args, kwargs):
    """One batched pass through the guide's posterior, then one model trace per draw."""
    from torch.distributions import biject_to

    if guide.prototype_trace is None:
        guide(*args, **kwargs)
    posterior = guide.get_posterior(*args, **kwargs)
    latent = posterior.sample((num_samples,))
    log_q = posterior.log_prob(latent)  # a flow scores its own sample from the layer caches
    out = []
    for s in range(num_samples):
        values, log_q_s = {}, log_q[s]
        for site, u in guide._unpack_latent(latent[s]):
            t = biject_to(site["fn"].support)
            values[site["name"]] = x = t(u)
            log_q_s = log_q_s - t.log_abs_det_jacobian(u, x).sum()
        model_trace = poutine.trace(poutine.condition(model, values)).get_trace(*args, **kwargs)
        out.append(model_trace.log_prob_sum() - log_q_s)
    return torch.stack(out)


def _sequential_log_weights(model, guide, num_samples, args, kwargs):
    from pyro.infer.autoguide import AutoContinuous

    if isinstance(guide, AutoContinuous):
        return _autocontinuous_log_weights(model, guide, num_samples, args, kwargs)
    out = []
    for _ in range(num_samples):
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *args, **kwargs)
        out.append(model_trace.log_prob_sum() - guide_trace.log_prob_sum())
    return torch.stack(out)


@torch.no_grad()
def log_importance_weights(model, guide, *args, num_samples=1000, **kwargs):
    r"""Log importance weights :math:`\log w_s = \log p(x, \theta_s) - \log q(\theta_s)`,
    :math:`\theta_s \sim q`.

    Draws are vectorized over a particle plate when the model allows it (it broadcasts over
    a new leftmost batch dimension); otherwise one trace per draw.

    Args:
        model: the Pyro model.
        guide: a trained guide for it (any Pyro guide).
        *args: the model's positional arguments.
        num_samples: number of draws ``S`` (keyword-only).
        **kwargs: the model's keyword arguments.
    Returns: a ``(S,)`` tensor.
    """
    if isinstance(num_samples, bool) or not (isinstance(num_samples, int) and num_samples >= 2):
        raise ValueError(f"num_samples must be an integer >= 2, got {num_samples!r}")
    check_model_args("log_importance_weights", model, args, kwargs)
    with poutine.block():
        try:
            nesting = _max_plate_nesting(model, guide, args, kwargs)
            # probe with 3 draws first (RNG forked: the draws below are unchanged): a model
            # that does not broadcast over the particle dimension can build an (S, S, ...)
            # tensor before its wrong shape shows, 2 GB at S = 4000 for a 30-row regression
            with torch.random.fork_rng():
                probe = vectorized_importance_weights(model, guide, *args, num_samples=3,
                                                      max_plate_nesting=nesting, **kwargs)[0]
            if probe.shape != (3,):
                raise ValueError("model is not vectorizable over particles")
            log_w = vectorized_importance_weights(model, guide, *args, num_samples=num_samples,
                                                  max_plate_nesting=nesting, **kwargs)[0]
            if log_w.shape != (num_samples,):
                raise ValueError("model is not vectorizable over particles")
        except Exception:  # any failure of the vectorized run: one trace per draw instead
            log_w = _sequential_log_weights(model, guide, num_samples, args, kwargs)
    return log_w.detach()


def _khat(log_w):
    lw = log_w.double().cpu().numpy()
    if not np.isfinite(lw).any():
        return float("inf")
    lw = np.where(np.isfinite(lw), lw, -np.inf)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, k = az.psislw(lw.copy())
    return float(k)


def psis_khat(model, guide, *args, num_samples=1000, **kwargs):
    r"""Pareto-smoothed importance sampling :math:`\hat k` of the guide (Yao et al., 2018).

    Fits a generalized Pareto to the upper tail of :math:`w = p(x,\theta)/q(\theta)`,
    :math:`\theta \sim q`. Below 0.5: importance sampling (and the guide) can be trusted;
    0.5 to 0.7: usable with care; above 0.7: the guide's tails are too light.

    What it checks and what it cannot see (:data:`KHAT_SCOPE`): the weights are computed at
    the guide's own draws, so k-hat checks that the guide's tails are not too light where the
    guide has mass; posterior regions the guide never visits (a missed mode, half of a ring,
    ``examples/models/ring.py``) leave no trace in the weights, and k-hat can then read
    "trustworthy" for a guide that misses half the posterior.

    Args:
        model, guide: the Pyro model and a trained guide.
        *args: the model's positional arguments.
        num_samples: draws ``S`` (keyword-only; a few hundred at least, 1000 by default).
        **kwargs: the model's keyword arguments.
    Returns: :math:`\hat k` as a float.
    References: Yes, but Did It Work?: Evaluating Variational Inference,
    https://arxiv.org/abs/1802.02538
    """
    check_model_args("psis_khat", model, args, kwargs)
    return _khat(log_importance_weights(model, guide, *args, num_samples=num_samples, **kwargs))


def log_evidence(model, guide, *args, num_samples=1000, **kwargs):
    r"""Importance-weighted log-evidence estimate and the ELBO from the same draws.

    :math:`\log \hat p(x) = \log \frac1S \sum_s w_s` (a stochastic lower bound, tight as
    :math:`S \to \infty`); :math:`\mathrm{ELBO} = \frac1S \sum_s \log w_s`.

    Args:
        model, guide: the Pyro model and a trained guide.
        *args: the model's positional arguments.
        num_samples: draws ``S`` (keyword-only).
        **kwargs: the model's keyword arguments.
    Returns: a dict with ``log_evidence``, ``log_evidence_se``, ``elbo``, ``elbo_se``
    (standard errors), ``khat`` and ``ess`` (importance-sampling effective sample size), all
    floats. ``log_evidence_se`` is the delta-method standard error
    :math:`\mathrm{sd}(w)/(\sqrt S\,\bar w)`: it is itself unreliable when ``khat`` is above
    0.5 (the weights' variance may be infinite), and no error bar covers posterior mass the
    guide never visits (see :data:`KHAT_SCOPE`).
    """
    check_model_args("log_evidence", model, args, kwargs)
    log_w = log_importance_weights(model, guide, *args, num_samples=num_samples,
                                   **kwargs).double()
    finite = log_w[torch.isfinite(log_w)]
    n = log_w.numel()
    lse = torch.logsumexp(log_w, 0)
    w = torch.exp(log_w - lse)
    # delta method on log(mean w): sd(w / mean w) / sqrt(S); weights normalised to mean 1
    ratio = w * n
    log_evidence_se = float(ratio.std() / math.sqrt(n)) if torch.isfinite(lse) else math.nan
    return {"log_evidence": float(lse - math.log(n)),
            "log_evidence_se": log_evidence_se,
            "elbo": float(log_w.mean()),
            "elbo_se": float(finite.std() / math.sqrt(max(len(finite), 1))),
            "khat": _khat(log_w),
            "ess": float(1.0 / w.square().sum())}


def _worst(dataset, reverse=False, limit=3):
    """``(value, 'site[i]')`` pairs of an arviz dataset's coordinates, the smallest first (the
    largest with ``reverse``), NaN dropped."""
    pairs = []
    for name in dataset.data_vars:
        values = np.asarray(dataset[name].values, dtype=float)
        for index in np.ndindex(values.shape):
            v = values[index]
            if np.isfinite(v):
                label = name + (f"[{','.join(map(str, index))}]" if index else "")
                pairs.append((float(v), label))
    pairs.sort(key=lambda p: -p[0] if reverse else p[0])
    return pairs[:limit] if limit else pairs


def _named(pairs, fmt):
    return ", ".join(f"{label} {fmt.format(v)}" for v, label in pairs)


def mcmc_warnings(idata, max_divergent=MAX_DIVERGENT_FRACTION, min_ess_per_chain=MIN_ESS_PER_CHAIN,
                  max_rhat=MAX_RHAT, limit=3):
    r"""One-line warnings about an MCMC run's draws, naming the worst sites (``limit`` each).

    Checks: divergent transitions above ``max_divergent`` (1%) of the draws
    (``sample_stats.diverging``); any site's bulk or tail ESS below ``min_ess_per_chain``
    (100) per chain (arviz's rank-normalised ESS); R-hat above ``max_rhat`` (1.01; with one
    chain R-hat cannot be computed, which is said instead). Thresholds from Vehtari et al.
    (2021), https://arxiv.org/abs/1903.08008.

    Args:
        idata: ``arviz.InferenceData`` with a ``posterior`` group ``(chain, draw, *site)``.
    Returns: a list of strings, empty when the run passes every check.
    """
    post = idata.posterior
    chains, draws = post.sizes["chain"], post.sizes["draw"]
    total = chains * draws
    out = []
    if "sample_stats" in idata.groups() and "diverging" in idata.sample_stats:
        n_div = int(np.asarray(idata.sample_stats["diverging"].values).sum())
        if n_div > max_divergent * total:
            out.append(f"{n_div} of {total} draws ({100 * n_div / total:.1f}%) are divergent "
                       f"(more than {100 * max_divergent:g}%): the sampler did not explore the "
                       "posterior's curved or narrow regions and the draws are biased")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        low = []
        for method in ("bulk", "tail"):
            for v, label in _worst(az.ess(post, method=method), limit=0):
                if v < min_ess_per_chain * chains:
                    low.append((v, f"{label} ({method})"))
        low.sort()
        rhat = _worst(az.rhat(post), reverse=True, limit=0) if chains > 1 else []
    if low:
        out.append(f"effective sample size below {min_ess_per_chain} per chain "
                   f"({min_ess_per_chain * chains} for {chains} chain"
                   f"{'s' if chains > 1 else ''}): worst {_named(low[:limit], '{:.0f}')}; "
                   "estimates from these draws are unreliable (run longer)")
    high = [(v, label) for v, label in rhat if v > max_rhat]
    if high:
        out.append(f"R-hat above {max_rhat:g}: worst {_named(high[:limit], '{:.3f}')}; the "
                   "chains disagree (not converged)")
    elif chains == 1:
        out.append("one chain: R-hat cannot be computed; run 2 or more chains to check "
                   "convergence")
    return out


def _to_numpy(value):
    if torch.is_tensor(value):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def to_inference_data(source, *model_args, num_chains=None, model=None, guide=None,
                      num_samples=1000, **model_kwargs):
    r"""An arviz ``InferenceData`` from MCMC or guide draws, so ``az.summary`` and
    ``az.plot_trace`` work.

    Args:
        source: a ``pyro.infer.MCMC`` (after ``run``), a dict of site draws shaped
            ``(chains, draws, *site)`` (pass ``num_chains=1`` for ``(draws, *site)``), an
            existing ``InferenceData`` (returned as is), or ``None`` with ``model`` and
            ``guide`` to draw ``num_samples`` from the guide (``pyro.infer.Predictive``).
        *model_args: the model's positional arguments (``source=None`` only).
        num_chains: split ``(chains * draws, *site)`` arrays into this many chains
            (keyword-only, like every option after ``source``).
        model, guide, num_samples: what to draw from when ``source`` is ``None``.
        **model_kwargs: the model's keyword arguments (``source=None`` only).
    Returns: ``arviz.InferenceData`` with a ``posterior`` group.

    Example:
        >>> import torch
        >>> idata = to_inference_data({"a": torch.zeros(8, 3)}, num_chains=2)
        >>> idata.posterior["a"].shape  # (chain, draw, *site)
        (2, 4, 3)
    """
    if isinstance(source, az.InferenceData):
        return source
    if source is not None and (model_args or model_kwargs):
        raise TypeError("to_inference_data: model arguments are only used with source=None "
                        f"(drawing from a guide), got source={type(source).__name__} and "
                        f"{len(model_args)} positional, {len(model_kwargs)} keyword model "
                        "arguments; options such as num_chains are keyword-only")
    if num_chains is not None and (isinstance(num_chains, bool) or not isinstance(
            num_chains, int) or num_chains < 1):
        raise ValueError(f"num_chains must be a positive integer, got {num_chains!r}")
    if source is None:
        if model is None or guide is None:
            raise ValueError("to_inference_data(None, ...) needs model= and guide= to draw "
                             "from the guide")
        if isinstance(num_samples, bool) or not (isinstance(num_samples, int)
                                                 and num_samples >= 1):
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        check_model_args("to_inference_data", model, model_args, model_kwargs)
        if getattr(guide, "prototype_trace", None) is not None:
            nodes = guide.prototype_trace.nodes
            names = [n for n, _ in guide.prototype_trace.iter_stochastic_nodes()]
        else:  # any other guide: its latent sites and their shapes from one trace
            with poutine.block():
                nodes = poutine.trace(guide).get_trace(*model_args, **model_kwargs).nodes
            names = [n for n, s in nodes.items() if s["type"] == "sample"
                     and not s["is_observed"] and not n.startswith("_")]
        with torch.no_grad():
            draws = pyro.infer.Predictive(model, guide=guide, num_samples=num_samples,
                                          return_sites=names)(*model_args, **model_kwargs)
        # Predictive pads each draw with the plate dimensions: back to the site's own shape
        source = {k: draws[k].reshape((num_samples,) + nodes[k]["value"].shape)
                  for k in names if k in draws}
        num_chains = 1
    if hasattr(source, "get_samples") and hasattr(source, "num_chains"):
        samples = source.get_samples(group_by_chain=True)
        data = {k: _to_numpy(v) for k, v in samples.items()}
        return az.from_dict(posterior=data)
    if not isinstance(source, dict):
        raise TypeError("to_inference_data expects a pyro MCMC, a dict of draws or an "
                        f"InferenceData, got {type(source).__name__}")
    data = {}
    for name, value in source.items():
        value = _to_numpy(value)
        if num_chains is not None:
            if value.shape[0] % num_chains:
                raise ValueError(f"site {name!r}: {value.shape[0]} draws do not split into "
                                 f"{num_chains} chains")
            value = value.reshape((num_chains, -1) + value.shape[1:])
        data[name] = value
    return az.from_dict(posterior=data)
