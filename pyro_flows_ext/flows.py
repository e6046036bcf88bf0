"""Ready-made flows. Every builder takes the event size ``dim`` first and returns a
:class:`~pyro_flows_ext.Flow`; ``FLOWS`` maps the names the CLI and ``pfe.load`` use."""

from .distributions import Flow
from .transforms import ActNorm, AffineCoupling, InvertibleBatchNorm, InvertibleConv1x1, Reverse

FLOWS = {}


def register(fn):
    """Adds a builder to :data:`FLOWS` and records its name and arguments on the flow it
    returns (``flow.spec``), which is what :func:`pyro_flows_ext.save` stores."""

    def builder(dim, **kwargs):
        flow = fn(dim, **kwargs)
        flow.spec = {"flow": fn.__name__, "dim": dim, "kwargs": dict(kwargs)}
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
def realnvp(dim, num_layers=8, hidden_dims=(64, 64), norm="actnorm", conv=True, lu=False,
            clamp=5.0):
    r"""RealNVP/Glow stack, the tutorial's "putting it all together": ``num_layers`` times
    affine coupling, a normalisation and an invertible 1x1 convolution (a learned rotation
    of the event; with ``conv=False`` a fixed reversal).

    Args:
        dim: event size ``D >= 2``.
        num_layers: number of (coupling, norm, mixing) blocks.
        hidden_dims: hidden sizes of each coupling network.
        norm: ``"actnorm"``, ``"batchnorm"`` or ``None``.
        conv: learned 1x1 convolution between couplings (else ``Reverse``).
        lu: LU-parametrised 1x1 convolution.
        clamp: bound on the coupling log-scales.
    """
    if norm not in _NORMS:
        raise ValueError(f"unknown norm {norm!r}; expected 'actnorm', 'batchnorm' or None")
    layers = []
    for _ in range(num_layers):
        layers.append(AffineCoupling(dim, hidden_dims=tuple(hidden_dims), clamp=clamp))
        if _NORMS[norm] is not None:
            layers.append(_NORMS[norm](dim))
        layers.append(InvertibleConv1x1(dim, lu=lu) if conv else Reverse(dim))
    return Flow(None, layers)
