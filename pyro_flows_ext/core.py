r"""The layer protocol shared by every layer: bijections, surjections and MCMC layers.

Pyro's direction is generative, ``z`` (base side) -> ``x`` (data side).
:class:`~torch.distributions.TransformedDistribution.log_prob` walks the layers backwards,
calling ``t.inv(x)`` and subtracting ``t.log_abs_det_jacobian(z, x)``. A layer here
computes value and log-det in one pass and caches the exact pair it produced, so that loop
(and SVI's ``rsample`` -> ``log_prob`` round trip) costs one pass per layer and never inverts.

Subclasses implement

* ``call_and_ladj(z) -> (x, ladj)`` with ``ladj = log|det dx/dz|`` (generative), and
* ``inverse_and_ladj(x) -> (z, v)`` with ``v`` the SurVAE likelihood contribution
  (``v = log|det dz/dx|`` for a bijection),

so that ``log p(x) = log p(z) + v`` and ``log_abs_det_jacobian(z, x) = -v`` for that pair.
"""

import torch
from pyro.distributions.conditional import ConditionalTransform
from pyro.distributions.torch_transform import TransformModule
from torch.distributions import constraints

__all__ = ["FlowLayer", "Surjection", "StochasticLayer", "UnseenPairError", "ConditionedLayer"]


class UnseenPairError(RuntimeError):
    """Raised when a non-bijective layer is asked for the likelihood of a pair it did not make."""


class FlowLayer(TransformModule, ConditionalTransform):
    r"""Base of every layer: a :class:`pyro.distributions.TransformModule` with a pair cache.

    Class attributes:
        bijective: whether the layer is a bijection (Pyro's flag).
        exact: whether ``log_prob`` through the layer is the exact log-density
            (``False`` for layers whose contribution is a stochastic bound).
        event_dim: number of rightmost dimensions forming one event (1 for vectors,
            3 for ``(C, H, W)`` images).
        fast_inverse: whether ``inverse_and_ladj`` costs about one pass (False for layers
            that invert by ``D`` passes or by iteration); guides use it to decide whether
            scoring with detached parameters (sticking-the-landing gradients) is cheap.

    Conditional layers (``context_dim > 0``) take ``context=`` in ``call_and_ladj`` and
    ``inverse_and_ladj``; ``layer.condition(c)`` returns a :class:`ConditionedLayer` view that
    shares the parameters, so a layer works in Pyro's ``TransformedDistribution`` and in its
    ``ConditionalTransformedDistribution``. Unconditional layers return themselves.

    The pair cache holds ``(z, x, ladj)`` for the last computation in either direction,
    matched by identity (``is``). ``clear_cache()`` drops it; it is never pickled, so
    ``copy.deepcopy`` and ``torch.save`` work after ``rsample``.
    """

    bijective = True
    exact = True
    event_dim = 1
    context_dim = 0
    fast_inverse = True

    def __init__(self):
        super().__init__(cache_size=1)
        self._pair = None

    def condition(self, context):
        """A view of this layer with ``context`` fixed (``self`` when unconditional)."""
        return ConditionedLayer(self, context) if self.context_dim else self

    def _require_context(self, context):
        if self.context_dim and context is None:
            raise ValueError(f"{type(self).__name__} has context_dim={self.context_dim}: call "
                             ".condition(context) first (or pass context=...)")

    # -- constraints: real-valued events of ``event_dim`` dimensions -------------------------
    @constraints.dependent_property(is_discrete=False)
    def domain(self):
        return constraints.independent(constraints.real, self.event_dim)

    @constraints.dependent_property(is_discrete=False)
    def codomain(self):
        return constraints.independent(constraints.real, self.event_dim)

    # -- to be implemented -------------------------------------------------------------------
    def call_and_ladj(self, z):
        """Returns ``(x, log|det dx/dz|)``; ``ladj`` has the batch shape of ``z``."""
        raise NotImplementedError

    def inverse_and_ladj(self, x):
        """Returns ``(z, v)`` with ``v`` the likelihood contribution (``log|det dz/dx|``)."""
        raise NotImplementedError

    # -- torch.distributions.Transform API ---------------------------------------------------
    def _call(self, z):
        x, ladj = self.call_and_ladj(z)
        self._pair = (z, x, ladj)
        return x

    def _inverse(self, x):
        z, v = self.inverse_and_ladj(x)
        self._pair = (z, x, -v)
        return z

    def log_abs_det_jacobian(self, z, x):
        pair = self._pair
        if pair is not None and pair[0] is z and pair[1] is x:
            return pair[2]
        return self._ladj_of_unseen_pair(z, x)

    def _ladj_of_unseen_pair(self, z, x):
        if self.bijective:
            return self.call_and_ladj(z)[1]
        raise UnseenPairError(
            f"{type(self).__name__} is not a bijection, so its likelihood contribution is only "
            "defined for the (z, x) pair it produced itself; score through the Flow "
            "(flow.log_prob(x)) or call clear_cache() and transform again."
        )

    def inverse_with_cache(self, x):
        """``(z, v)`` for ``x``, reusing the cached pair when ``x`` is the tensor it produced."""
        pair = self._pair
        if pair is not None and pair[1] is x:
            return pair[0], -pair[2]
        cached_x, cached_y = self._cached_x_y
        if cached_y is x and cached_x is not None:  # produced by __call__ before _pair existed
            return cached_x, -self.log_abs_det_jacobian(cached_x, x)
        z = self._inverse(x)
        self._cached_x_y = (z, x)
        return z, -self._pair[2]

    def call_with_cache(self, z):
        """``(x, ladj)`` for ``z``, reusing the cached pair when ``z`` is its base-side tensor."""
        pair = self._pair
        if pair is not None and pair[0] is z:
            return pair[1], pair[2]
        x = self._call(z)
        self._cached_x_y = (z, x)
        return x, self._pair[2]

    def with_cache(self, cache_size=1):
        """Layers always cache: for a bijection the cache only saves work, so any size returns
        ``self``; a non-bijective layer must reuse its own draw and refuses ``cache_size=0``."""
        if cache_size == 0 and not self.bijective:
            raise ValueError(
                f"{type(self).__name__} is not a bijection and needs cache_size=1: without the "
                "cache a second call would draw new noise and the log-det would not match."
            )
        return self

    def clear_cache(self):
        """Forgets the cached pair (and torch's cache); the next call computes afresh."""
        self._cached_x_y = (None, None)
        self._pair = None

    def __getstate__(self):
        state = super().__getstate__()
        state["_pair"] = None
        state["_cached_x_y"] = (None, None)
        return state

    # -- shapes --------------------------------------------------------------------------
    def base_event_shape(self):
        """Event shape on the base side, used by :class:`~pyro_flows_ext.Flow` when no base is
        given. Vector layers know it from ``dim``; image layers need an explicit shape."""
        dim = getattr(self, "dim", None)
        if self.event_dim == 1 and isinstance(dim, int):
            return torch.Size([dim])
        raise ValueError(
            f"cannot infer the base event shape from {type(self).__name__}; "
            "pass event_shape=... (e.g. (C, H, W)) or a base distribution to Flow"
        )


class Surjection(FlowLayer):
    r"""A SurVAE surjection (Nielsen et al., 2020) in Pyro's generative direction.

    ``stochastic_forward``: the generative map ``z -> x`` draws noise (inference surjection
    seen from the data side, e.g. Abs picks a sign). ``stochastic_inverse``: ``x -> z`` draws
    noise (generative surjection, e.g. Augment); then ``log_prob`` is a stochastic lower bound
    whose exp is unbiased, and ``exact`` is False.

    ``log_abs_det_jacobian(z, x)`` returns ``-V(z, x)`` for the pair the layer produced;
    subclasses whose V is a closed form of any pair override ``_ladj_of_unseen_pair``.
    """

    bijective = False
    stochastic_forward = True
    stochastic_inverse = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "exact" not in cls.__dict__:
            cls.exact = not cls.stochastic_inverse


class StochasticLayer(FlowLayer):
    r"""An MCMC layer (Stochastic Normalizing Flows, Wu et al., 2020): random in both
    directions, ``exact = False``; ``V = log pi(x) - log pi(z)`` for MH-corrected steps."""

    bijective = False
    exact = False
    stochastic_forward = True
    stochastic_inverse = True


def check_event_size(x, dim, name):
    """Raises a clear error when the last dimension of ``x`` is not ``dim``."""
    if x.dim() < 1 or x.shape[-1] != dim:
        raise ValueError(
            f"{name} expects events of size {dim} in the last dimension, "
            f"got a tensor of shape {tuple(x.shape)}"
        )


def batch_shape_of(x, event_dim):
    """The batch shape of ``x`` for events of ``event_dim`` dimensions."""
    return x.shape[: x.dim() - event_dim]


def broadcast_context(context, y, event_dim=1):
    """``context`` ``(*batch, C)`` expanded to the batch shape of ``y`` (``(*sample, *batch,
    *event)``), so it can be concatenated with per-event features."""
    batch = y.shape[: y.dim() - event_dim]
    if context.shape[:-1] == batch:
        return context
    return context.expand(batch + context.shape[-1:])


class ConditionedLayer(FlowLayer):
    """A conditional layer with its context fixed; shares the parameters of ``layer``."""

    def __init__(self, layer, context):
        super().__init__()
        self.layer, self.context = layer, context
        self.bijective, self.exact, self.event_dim = layer.bijective, layer.exact, layer.event_dim
        self.fast_inverse = layer.fast_inverse
        self.dim = getattr(layer, "dim", None)

    @constraints.dependent_property(is_discrete=False)
    def domain(self):
        return self.layer.domain

    @constraints.dependent_property(is_discrete=False)
    def codomain(self):
        return self.layer.codomain

    def forward_shape(self, shape):
        return self.layer.forward_shape(shape)

    def inverse_shape(self, shape):
        return self.layer.inverse_shape(shape)

    def base_event_shape(self):
        return self.layer.base_event_shape()

    def call_and_ladj(self, z):
        return self.layer.call_and_ladj(z, context=self.context)

    def inverse_and_ladj(self, x):
        return self.layer.inverse_and_ladj(x, context=self.context)
