r"""Training Stochastic Normalizing Flows: maximum likelihood, reverse KL ("Boltzmann
generator") and the paper's mix (:func:`fit_snf`), and an SNF as a Pyro SVI guide
(:class:`AutoSNFGuide`)."""

import math

import torch
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.autoguide.initialization import init_to_feasible
from torch.distributions.transforms import ComposeTransform

from ..distributions import Flow
from ..infer.guide import LocScale
from ..transforms import AffineCoupling
from .langevin import LangevinLayer
from .potential import potential_from_model

__all__ = ["AutoSNFGuide", "default_snf_layers", "fit_snf"]


def fit_snf(flow, energy=None, data=None, num_steps=600, batch_size=128, ml_weight=None,
            kl_weight=None, optim=None, lr=5e-3, clip_norm=None, schedule=None,
            callback=None):
    r"""Trains ``flow`` by maximum likelihood on ``data``, by reverse KL to
    :math:`\pi \propto e^{-U}` (a Boltzmann generator), or by their weighted sum:

    .. math:: L = w_{ML}\,\Big(-\frac1B\sum_b \log q(x_b)\Big) +
              w_{KL}\,\frac1B\sum_b \big[U(x'_b) + \log q(x'_b)\big],\quad x'_b \sim q,

    with :math:`\log q` the flow's ``log_prob`` (for a stochastic flow the path estimate, so
    the KL term is an upper bound of :math:`KL(q\|\pi) - \log Z`; Wu et al. 2020, eq. 9).

    Args:
        flow: a :class:`~pyro_flows_ext.Flow`, put in train mode (MCMC step sizes adapt).
        energy: :math:`U` ``(B, D) -> (B,)`` (e.g. :func:`potential_from_model`); needed
            when ``kl_weight > 0``.
        data: ``(N, D)`` training samples; needed when ``ml_weight > 0``.
        num_steps, batch_size: optimisation steps; samples per term per step.
        ml_weight, kl_weight: defaults: 1 for each term whose input is given.
        optim: a torch optimizer over ``flow.parameters()`` (default ``Adam(lr)``).
        clip_norm: clip the total gradient norm.
        schedule: optional ``step -> (ml_weight, kl_weight)`` (e.g. ML first, then the mix).
        callback: optional ``callback(step, flow, record)``.
    Returns:
        history dict: ``loss``, ``nll``, ``kl`` per step (NaN where a term is off).
    """
    if ml_weight is None:
        ml_weight = 1.0 if data is not None else 0.0
    if kl_weight is None:
        kl_weight = 1.0 if energy is not None else 0.0
    if data is not None:
        ref = next(iter(flow.parameters()), None)
        data = torch.as_tensor(data).to(ref) if ref is not None else torch.as_tensor(data)
    params = [p for p in flow.parameters() if p.requires_grad]
    opt = optim if optim is not None else torch.optim.Adam(params, lr=lr)
    history = {"loss": [], "nll": [], "kl": []}
    flow.train()
    for step in range(num_steps):
        w_ml, w_kl = schedule(step) if schedule is not None else (ml_weight, kl_weight)
        loss, nll, kl = 0.0, math.nan, math.nan
        if w_ml:
            if data is None:
                raise ValueError("ml_weight > 0 needs data=")
            batch = data[torch.randint(0, len(data), (batch_size,), device=data.device)]
            nll_t = -flow.log_prob(batch).mean()
            loss, nll = loss + w_ml * nll_t, nll_t.item()
        if w_kl:
            if energy is None:
                raise ValueError("kl_weight > 0 needs energy=")
            x, log_q = flow.sample_and_log_prob((batch_size,))
            kl_t = (energy(x) + log_q).mean()
            loss, kl = loss + w_kl * kl_t, kl_t.item()
        if not torch.is_tensor(loss):
            raise ValueError("both ml_weight and kl_weight are 0: nothing to train")
        opt.zero_grad()
        loss.backward()
        if clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, clip_norm)
        opt.step()
        record = {"loss": loss.item(), "nll": nll, "kl": kl}
        for k, v in record.items():
            history[k].append(v)
        if callback is not None:
            callback(step, flow, record)
    flow.eval()
    return history


def default_snf_layers(dim, potential, init_loc=None, init_scale=1.0, mcmc=None,
                       hidden_dims=(32, 32)):
    r"""The :class:`AutoSNFGuide` default: two affine couplings (alternating masks; none when
    ``dim == 1``), a :class:`~pyro_flows_ext.infer.guide.LocScale` at the model's initial
    point, then ``mcmc`` (default: 10 MALA steps on the model's potential) in the model's
    unconstrained coordinates."""
    layers = []
    if dim >= 2:
        mask = torch.arange(dim) < dim // 2
        layers = [AffineCoupling(dim, hidden_dims=hidden_dims, mask=mask, clamp=2.0),
                  AffineCoupling(dim, hidden_dims=hidden_dims, mask=~mask, clamp=2.0)]
    layers.append(LocScale(dim, init_loc, init_scale))
    layers += list(mcmc) if mcmc is not None else [LangevinLayer(potential, steps=10)]
    return layers


class AutoSNFGuide(AutoContinuous):
    r"""A Stochastic Normalizing Flow as a Pyro autoguide over the model's unconstrained latent
    vector, trained with ``pyro.infer.SVI`` (reverse KL; the ELBO is the auxiliary-variable
    bound, valid because each MCMC layer's ``log_prob`` term is the SNF path weight).

    The layers see the model's potential (:func:`potential_from_model`, built when the guide
    first runs, with the model's arguments), so MCMC layers placed last act directly on the
    model's unconstrained coordinates. Unlike :class:`~pyro_flows_ext.infer.AutoFlowGuide`
    nothing is appended after the given layers.

    Args:
        model: a Pyro model with continuous latent sites that broadcasts over a leading batch
            dimension (for a vectorised potential).
        layers: ``layers(dim, potential, init_loc) -> list of transforms`` (default
            :func:`default_snf_layers`), or a list of transforms.
        init_loc_fn: initial values (for ``init_loc``).
        init_scale: used by the default layers.
    Use ``Trace_ELBO(num_particles=K, vectorize_particles=True)``: the K particles are K
    independent chains in one vectorised pass.
    """

    def __init__(self, model, layers=None, init_loc_fn=init_to_feasible, init_scale=1.0):
        self._raw_model, self._layers_spec, self._init_scale = model, layers, init_scale
        super().__init__(model, init_loc_fn=init_loc_fn)

    def _setup_prototype(self, *args, **kwargs):
        super()._setup_prototype(*args, **kwargs)
        self.potential = potential_from_model(self._raw_model, *args, **kwargs)
        if self.potential.dim != self.latent_dim:
            raise RuntimeError(f"the potential has {self.potential.dim} coordinates, the guide "
                               f"{self.latent_dim}")
        init = self._init_loc()
        spec = self._layers_spec
        if spec is None:
            layers = default_snf_layers(self.latent_dim, self.potential, init, self._init_scale)
        elif callable(spec):
            layers = list(spec(self.latent_dim, self.potential, init))
        else:
            layers = list(spec)
        flow = Flow(None, layers, event_shape=(self.latent_dim,))
        self.flow = flow.to(device=init.device, dtype=init.dtype)

    def get_base_dist(self):
        return self.flow.base_dist

    def get_transform(self, *args, **kwargs):
        return ComposeTransform(list(self.flow.transforms), cache_size=1)

    def get_posterior(self, *args, **kwargs):
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        return self.flow

    @torch.no_grad()
    def sample_unconstrained(self, num_samples=1000):
        """``(num_samples, D)`` draws of the latent vector (eval mode: no adaptation)."""
        was = self.flow.training
        self.flow.eval()
        try:
            return self.flow.sample((num_samples,))
        finally:
            self.flow.train(was)
