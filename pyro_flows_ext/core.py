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

import operator

import torch
from pyro.distributions.conditional import ConditionalTransform
from pyro.distributions.torch_transform import TransformModule
from torch.distributions import constraints

__all__ = ["FlowLayer", "Surjection", "StochasticLayer", "UnseenPairError", "ConditionedLayer"]


class UnseenPairError(RuntimeError):
    """Raised when a non-bijective layer is asked for the likelihood of a pair it did not make."""


class _Pair:
    """A ``(z, x, ladj)`` triple with what it was computed under: the parameters (by
    identity and version: an optimizer step bumps the versions), the grad mode, the
    train/eval mode and the direction (``generative``: made by ``_call``)."""

    __slots__ = ("z", "x", "ladj", "generative", "params", "versions", "grad", "training")

    def __init__(self, layer, z, x, ladj, generative):
        self.z, self.x, self.ladj, self.generative = z, x, ladj, generative
        self.params = layer._param_list()
        self.versions = tuple(p._version for p in self.params)
        self.grad, self.training = torch.is_grad_enabled(), layer.training

    def fresh(self, layer):
        """Whether the pair is still what the layer would compute now: same parameter
        tensors at the same versions, same mode, and a graph if gradients are wanted."""
        if layer.training != self.training or (torch.is_grad_enabled() and not self.grad):
            return False
        params = tuple(layer.parameters())  # walked afresh: catches replaced parameters
        if len(params) != len(self.params) or any(a is not b for a, b in zip(params, self.params)):
            layer._params = params
            return False
        return all(p._version == v for p, v in zip(params, self.versions))


def _check_dim(name, dim):
    """A clear error for an event size (or channel count) that is not a positive integer."""
    try:
        ok = not isinstance(dim, bool) and operator.index(dim) >= 1
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"{name} needs a positive integer dim (the event size), got {dim!r}")


class FlowLayer(TransformModule, ConditionalTransform):
    r"""Base of every layer: a :class:`pyro.distributions.TransformModule` with a pair cache.

    Class attributes:
        bijective: whether the layer is a bijection (Pyro's flag).
        exact: whether ``log_prob`` through the layer is the exact log-density
            (``False`` for layers whose contribution is a stochastic bound).
        event_dim: number of rightmost dimensions forming one event (1 for vectors,
            3 for ``(C, H, W)`` images).
        fast_inverse: whether ``inverse_and_ladj`` costs about one pass (False for layers
            that invert by ``D`` passes or by iteration).
        stl_stable: whether the layer is known to train stably with sticking-the-landing
            gradients in a guide (False for spline element maps).

    Shapes: ``forward_shape``/``inverse_shape`` are the shape contract and are checked on
    every call: the default accepts events whose size in dimension ``-event_dim`` is
    ``self.dim`` (features for vectors, channels for images; ``dim=None`` accepts any) and
    keeps the shape; shape-changing layers override both.

    Conditional layers (``context_dim > 0``) take ``context=`` in ``call_and_ladj`` and
    ``inverse_and_ladj``; ``layer.condition(c)`` returns a :class:`ConditionedLayer` view that
    shares the parameters, so a layer works in Pyro's ``TransformedDistribution`` and in its
    ``ConditionalTransformedDistribution``. Unconditional layers return themselves.

    The pair cache holds ``(z, x, ladj)`` for the last computation, matched by identity
    (``is``) and reused only while the parameters are unchanged (their versions: any
    in-place update such as ``optimizer.step()`` invalidates it), in the same train/eval
    mode, and with a graph when gradients are enabled. A pair made generatively (a sample)
    is reused when that sample is scored, so ``rsample`` -> ``log_prob`` never inverts. A pair
    made by scoring is reused only by ``log_abs_det_jacobian`` on that very pair (torch's
    ``log_prob`` loop) and, for non-bijective layers, to give the same draw when the same
    tensor is scored again; a bijection scores a tensor afresh every time, so a full-batch
    training loop over one data tensor always sees the current parameters. The cache is
    never pickled, so ``copy.deepcopy`` and ``torch.save`` work after ``rsample``.
    """

    bijective = True
    exact = True
    event_dim = 1
    context_dim = 0
    fast_inverse = True
    stl_stable = True

    def __init__(self):
        super().__init__(cache_size=1)
        self._pair = None
        self._params = None

    def __setattr__(self, name, value):
        if name == "dim" and value is not None:  # every layer's event size, checked once
            _check_dim(type(self).__name__, value)
        super().__setattr__(name, value)

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

    # -- shapes ------------------------------------------------------------------------------
    def _check_event(self, shape):
        dim, k = getattr(self, "dim", None), self.event_dim
        if dim is not None and (len(shape) < k or shape[len(shape) - k] != dim):
            what = (f"events of size {dim} in the last dimension" if k == 1 else
                    f"events with {dim} channels in dimension -{k} ((..., {dim}, H, W))")
            raise ValueError(f"{type(self).__name__} expects {what}, got a tensor of shape "
                             f"{tuple(shape)}")

    def forward_shape(self, shape):
        """Shape of ``x`` for a ``z`` of ``shape`` (checks the event size)."""
        self._check_event(shape)
        return shape

    def inverse_shape(self, shape):
        """Shape of ``z`` for an ``x`` of ``shape`` (checks the event size)."""
        self._check_event(shape)
        return shape

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

    # -- the pair cache ------------------------------------------------------------------
    def _param_list(self):
        if self._params is None:
            self._params = tuple(self.parameters())
        return self._params

    def _call(self, z):
        self.forward_shape(z.shape)
        x, ladj = self.call_and_ladj(z)
        self._pair = _Pair(self, z, x, ladj, generative=True)
        return x

    def _inverse(self, x):
        self.inverse_shape(x.shape)
        z, v = self.inverse_and_ladj(x)
        self._pair = _Pair(self, z, x, -v, generative=False)
        return z

    def _reusable_for_inverse(self, x):
        pair = self._pair
        return (pair is not None and pair.x is x and (pair.generative or not self.bijective)
                and pair.fresh(self))

    def __call__(self, z):
        pair = self._pair
        if pair is not None and pair.z is z and pair.fresh(self):
            return pair.x
        return self._call(z)

    def _inv_call(self, x):
        if self._reusable_for_inverse(x):
            return self._pair.z
        return self._inverse(x)

    def log_abs_det_jacobian(self, z, x):
        pair = self._pair
        if pair is not None and pair.z is z and pair.x is x:
            return pair.ladj
        return self._ladj_of_unseen_pair(z, x)

    def _ladj_of_unseen_pair(self, z, x):
        if self.bijective:
            return self.call_and_ladj(z)[1]
        if not getattr(self, "stochastic_inverse", True):
            return -self.inverse_and_ladj(x)[1]  # inference surjection: V is a function of x
        raise UnseenPairError(
            f"{type(self).__name__} is not a bijection, so its likelihood contribution is only "
            "defined for the (z, x) pair it produced itself; score through the Flow "
            "(flow.log_prob(x)) or call clear_cache() and transform again."
        )

    def inverse_with_cache(self, x):
        """``(z, v)`` for ``x``, reusing the cached pair when ``x`` is a sample this layer
        just produced (or, for a non-bijective layer, a tensor it just scored). Inside
        ``torch.compile`` the cache is neither read nor written (its identity and version
        checks would break the graph): a compiled ``log_prob`` scores every tensor afresh."""
        if torch.compiler.is_compiling():
            self.inverse_shape(x.shape)
            return self.inverse_and_ladj(x)
        if self._reusable_for_inverse(x):
            return self._pair.z, -self._pair.ladj
        z = self._inverse(x)
        return z, -self._pair.ladj

    def call_with_cache(self, z):
        """``(x, ladj)`` for ``z``, reusing the cached pair when ``z`` is its base-side tensor
        (outside ``torch.compile``, as :meth:`inverse_with_cache`)."""
        if torch.compiler.is_compiling():
            self.forward_shape(z.shape)
            return self.call_and_ladj(z)
        pair = self._pair
        if pair is not None and pair.z is z and pair.fresh(self):
            return pair.x, pair.ladj
        x = self._call(z)
        return x, self._pair.ladj

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
        """Forgets the cached pair; the next call computes afresh."""
        self._pair = None

    def __getstate__(self):
        state = super().__getstate__()
        state["_pair"], state["_params"] = None, None
        return state


class Surjection(FlowLayer):
    r"""A SurVAE surjection (Nielsen et al., 2020) in Pyro's generative direction.

    ``stochastic_inverse``: ``x -> z`` draws noise (generative surjection, e.g. Augment); then
    ``log_prob`` is a stochastic lower bound whose exp is unbiased, and ``exact`` is False.
    Otherwise (inference surjection, e.g. Abs) ``x -> z`` is deterministic and exact.

    ``log_abs_det_jacobian(z, x)`` returns ``-V(z, x)`` for the pair the layer produced;
    subclasses whose V is a closed form of any pair override ``_ladj_of_unseen_pair``.
    """

    bijective = False
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
    stochastic_inverse = True


def batch_shape_of(x, event_dim):
    """The batch shape of ``x`` for events of ``event_dim`` dimensions."""
    return x.shape[: x.dim() - event_dim]


def broadcast_context(context, y, event_dim=1):
    """``(context, y)`` expanded to their common batch shape: ``context`` is ``(*batch, C)``,
    ``y`` is ``(*batch', *event)``; one event against many contexts and many events against
    one context both work."""
    y_batch, c_batch = y.shape[: y.dim() - event_dim], context.shape[:-1]
    if y_batch == c_batch:
        return context, y
    batch = torch.broadcast_shapes(y_batch, c_batch)
    return (context.expand(batch + context.shape[-1:]),
            y.expand(batch + y.shape[y.dim() - event_dim:]))


class ConditionedLayer(FlowLayer):
    """A conditional layer with its context fixed; shares the parameters of ``layer``."""

    def __init__(self, layer, context):
        super().__init__()
        self.layer, self.context = layer, context
        self.bijective, self.exact, self.event_dim = layer.bijective, layer.exact, layer.event_dim
        self.fast_inverse, self.stl_stable = layer.fast_inverse, layer.stl_stable
        # an unseen pair is scored by the base rule with the context (a layer's own closed
        # form cannot see it; condition() returns unconditional layers themselves)
        self.stochastic_inverse = getattr(layer, "stochastic_inverse", not layer.bijective)
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
