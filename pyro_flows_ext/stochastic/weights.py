r"""Importance weights of a flow's samples against an unnormalised target, and their ESS."""

import math
from dataclasses import dataclass

import torch

__all__ = ["ImportanceWeights", "effective_sample_size", "importance_weights"]


def effective_sample_size(log_weights):
    r"""Kish's effective sample size :math:`(\sum w)^2 / \sum w^2` of unnormalised log-weights
    (over the last dimension); NaN weights count as zero."""
    lw = torch.nan_to_num(torch.as_tensor(log_weights), nan=-math.inf)
    return torch.exp(2 * torch.logsumexp(lw, -1) - torch.logsumexp(2 * lw, -1))


@dataclass
class ImportanceWeights:
    r"""Samples of a flow and their importance weights :math:`w = \tilde p(x) / \hat q(x)`.

    For a stochastic flow :math:`\hat q` is the flow's ``log_prob`` along each sample's own
    path (``sample_and_log_prob``), so :math:`E[w\,f(x)] = Z\,E_p[f]` holds exactly (the
    path weights of SNF), and self-normalised expectations are consistent.

    Attributes:
        samples: ``(N, D)``.
        log_weights: ``(N,)`` unnormalised log-weights :math:`\log\tilde p - \log\hat q`.
        weights: ``(N,)`` self-normalised weights (sum to 1).
        ess: Kish effective sample size; ``ess_fraction`` = ess / N.
        log_evidence: :math:`\log\frac1N\sum w`, an estimate of :math:`\log Z` (its exp is
            unbiased); ``log_evidence_se``: the delta-method standard error.
        reverse_kl: :math:`-\frac1N\sum\log w`, an estimate of
            :math:`E_q[\log\hat q - \log\tilde p] = KL(q\|p) - \log Z` for a bijective flow
            (an upper bound on it for a stochastic one); add ``log Z`` when it is known.
    """

    samples: torch.Tensor
    log_weights: torch.Tensor
    weights: torch.Tensor
    ess: float
    ess_fraction: float
    log_evidence: float
    log_evidence_se: float
    reverse_kl: float

    def expectation(self, fn):
        """Self-normalised estimate of :math:`E_p[f(x)]` (``fn``: ``(N, D) -> (N, ...)``)."""
        values = fn(self.samples)
        w = self.weights.reshape((-1,) + (1,) * (values.dim() - 1))
        return (w * values).sum(0)


@torch.no_grad()
def importance_weights(flow, log_target=None, num_samples=10_000, batch_size=10_000,
                       energy=None):
    r"""Draws ``num_samples`` from ``flow`` and weighs them against an unnormalised target.

    Args:
        flow: a :class:`~pyro_flows_ext.Flow` (bijective or stochastic); sampled in eval mode
            (no step-size adaptation), its mode restored afterwards.
        log_target: callable ``(N, D) -> (N,)``, :math:`\log\tilde p` up to a constant.
        energy: alternatively :math:`U = -\log\tilde p` (e.g. a
            :func:`~pyro_flows_ext.stochastic.potential_from_model`).
        num_samples, batch_size: total draws and draws per pass.
    Returns:
        :class:`ImportanceWeights`.
    """
    if (log_target is None) == (energy is None):
        raise ValueError("pass exactly one of log_target= and energy=")
    log_p = log_target if log_target is not None else (lambda x: -energy(x))
    was_training = flow.training
    flow.eval()
    xs, lws = [], []
    try:
        left = num_samples
        while left > 0:
            n = min(batch_size, left)
            x, log_q = flow.sample_and_log_prob((n,))
            xs.append(x)
            lws.append(log_p(x) - log_q)
            left -= n
    finally:
        flow.train(was_training)
        if hasattr(flow, "clear_cache"):
            flow.clear_cache()
    x, lw = torch.cat(xs), torch.cat(lws)
    lw = torch.nan_to_num(lw, nan=-math.inf)
    n = len(lw)
    log_sum = torch.logsumexp(lw, 0)
    weights = torch.exp(lw - log_sum)
    ess = float(effective_sample_size(lw))
    log_z = float(log_sum - math.log(n))
    # delta method: se(log mean w) = sd(w) / (sqrt(n) mean(w))
    w_rel = torch.exp(lw - lw.max())
    se = float(w_rel.std() / (math.sqrt(n) * w_rel.mean())) if n > 1 else math.nan
    finite = torch.isfinite(lw)
    kl = float(-lw[finite].mean()) if finite.any() else math.inf
    return ImportanceWeights(x, lw, weights, ess, ess / n, log_z, se, kl)
