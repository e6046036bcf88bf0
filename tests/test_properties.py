"""Property-based contract tests (hypothesis) over every layer family.

Strategies draw sample/batch shapes, dtypes, event sizes and parameter values (clamps, bins,
bounds, Lipschitz constants, pieces, masks, orders) and random parameter perturbations.
Properties: round trips; log-det against the autograd Jacobian (float64, small dims); the
inverse contribution is minus the forward log-det; (sample, batch, event) shapes; finite
outputs on extreme but valid inputs (``|x|`` up to 1e4 for layers on the real line); a clear
``ValueError`` for a wrong event size and for invalid constructor arguments.

The number of examples per test comes from the hypothesis profile (``tests/conftest.py``):
``default`` (about 20, derandomized) in the default suite, ``long`` under ``-m slow`` or
``PFE_HYPOTHESIS_PROFILE=long``.
"""

import pytest

pytest.importorskip("hypothesis")

import torch  # noqa: E402
from hypothesis import assume, given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from pyro_flows_ext import surjections as SJ  # noqa: E402
from pyro_flows_ext import transforms as T  # noqa: E402

from .contract import autograd_ladj, perturb  # noqa: E402
from .test_devices import LAYERS  # noqa: E402

F64 = torch.float64
dtypes = st.sampled_from([torch.float32, torch.float64])
batch_shapes = st.lists(st.integers(1, 3), min_size=0, max_size=2).map(tuple)
seeds = st.integers(0, 2**16)
scales = st.floats(0.0, 1.0)


def tol(dtype):
    return dict(atol=1e-7, rtol=1e-6) if dtype == F64 else dict(atol=2e-4, rtol=2e-4)


@st.composite
def masks(draw, dim):
    """A boolean mask of size ``dim`` with both values."""
    m = draw(st.lists(st.booleans(), min_size=dim, max_size=dim))
    assume(any(m) and not all(m))
    return m


@st.composite
def element_maps(draw):
    if draw(st.booleans()):
        return T.Affine(draw(st.floats(0.1, 8.0)))
    return T.RationalQuadratic(draw(st.integers(1, 8)), draw(st.floats(0.5, 5.0)))


@st.composite
def bijections(draw):
    """``(layer, event_shape, domain)`` for a random bijective layer with random settings;
    ``domain`` is ``'real'`` (all of R^D) or ``'positive'``."""
    kind = draw(st.sampled_from(["coupling", "autoregressive", "spline", "residual", "actnorm",
                                 "batchnorm", "conv", "permute", "reverse", "standardize",
                                 "cholesky", "exp", "actnorm-image", "conv-image",
                                 "emerging-image", "coupling-image", "logit"]))
    dim = draw(st.integers(2 if kind == "coupling" else 1, 4))
    if kind == "coupling":
        layer = T.Coupling(dim, draw(element_maps()), hidden_dims=(draw(st.integers(1, 8)),),
                           mask=draw(masks(dim)), invert=draw(st.booleans()))
    elif kind == "autoregressive":
        order = draw(st.permutations(range(dim)))
        layer = T.MaskedAutoregressive(dim, draw(element_maps()), draw(st.booleans()),
                                       hidden_dims=(draw(st.integers(1, 8)),), order=order)
    elif kind == "spline":
        layer = T.RationalQuadraticSpline(dim, draw(st.integers(1, 10)), draw(st.floats(0.5, 5)))
    elif kind == "residual":
        layer = T.ResidualBlock(dim, (draw(st.integers(2, 8)),), draw(st.floats(0.1, 0.95)))
    elif kind in ("actnorm", "actnorm-image"):
        layer = T.ActNorm(dim, event_dim=3 if kind == "actnorm-image" else 1)
    elif kind == "batchnorm":
        layer = T.InvertibleBatchNorm(dim, momentum=draw(st.floats(0, 1))).eval()
    elif kind in ("conv", "conv-image"):
        layer = T.InvertibleConv1x1(dim, lu=draw(st.booleans()),
                                    event_dim=3 if kind == "conv-image" else 1)
    elif kind == "permute":
        layer = T.Permute(dim, draw(st.permutations(range(dim))))
    elif kind == "reverse":
        layer = T.Reverse(dim)
    elif kind == "standardize":
        # |loc| / scale <= 1e3: beyond that a float32 round trip loses the base point to
        # cancellation (x = loc + scale z), whatever the code
        loc = draw(st.lists(st.floats(-10, 10), min_size=dim, max_size=dim))
        scale = draw(st.lists(st.floats(1e-2, 1e2), min_size=dim, max_size=dim))
        layer = T.Standardize(dim, torch.tensor(loc), torch.tensor(scale))
    elif kind == "cholesky":
        layer = T.CholeskyAffine(dim)
    elif kind == "emerging-image":
        layer = T.EmergingConv(dim, kernel_size=draw(st.sampled_from([1, 3])))
    elif kind == "coupling-image":
        mask = "checkerboard" if dim == 1 else draw(st.sampled_from(["checkerboard", "channel"]))
        layer = T.ImageCoupling(dim, mask, draw(st.integers(0, 1)), hidden_channels=4,
                                clamp=draw(st.floats(0.5, 8.0)))
    elif kind == "logit":
        # alpha > 0: with alpha = 0 the ends of [0, scale] map to -inf and inf (documented)
        layer = T.Logit(dim, alpha=draw(st.floats(0.01, 0.45)), scale=draw(st.integers(1, 256)))
    else:
        layer = T.Exp(dim)
    torch.manual_seed(draw(seeds))
    perturb(layer, draw(scales))
    if kind == "residual":  # the perturbation moved the weights: refresh the spectral norms
        for lin in layer.linears:
            lin.update(50)
    image = kind.endswith("-image")
    event_shape = (dim, 2, 2) if image else (dim,)
    domain = {"exp": "positive", "logit": "interval"}.get(kind, "real")
    return layer, event_shape, domain


def base_sample(shape, domain, dtype, scale=1.0):
    z = torch.randn(shape, dtype=dtype) * scale
    return z.exp() if domain == "positive" else z


@given(case=bijections(), batch=batch_shapes, dtype=dtypes)
def test_round_trip_and_inverse_log_det(case, batch, dtype):
    """``inverse(call(z)) == z`` and ``v(x) == -ladj(z)`` with ``(sample, batch)`` shapes."""
    layer, event_shape, domain = case
    layer = layer.to(dtype)
    z = base_sample(batch + event_shape, domain, dtype)
    x, ladj = layer.call_and_ladj(z)
    assert x.shape == z.shape and ladj.shape == batch and x.dtype == ladj.dtype == dtype
    z2, v = layer.inverse_and_ladj(x)
    t = tol(dtype) if not isinstance(layer, T.ResidualBlock) else dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(z2, z, **t)
    torch.testing.assert_close(v, -ladj, **t)


@given(case=bijections())
def test_log_det_matches_autograd(case):
    """The layer's log-det equals ``slogdet`` of the autograd Jacobian (float64, two events)."""
    layer, event_shape, domain = case
    layer = layer.to(F64).eval()
    z = base_sample((2, *event_shape), domain, F64)
    _, ladj = layer.call_and_ladj(z)
    torch.testing.assert_close(ladj, autograd_ladj(layer, z, event_shape), atol=1e-6, rtol=1e-6)


@given(case=bijections(), magnitude=st.floats(1.0, 1e4), dtype=dtypes)
def test_finite_on_extreme_inputs(case, magnitude, dtype):
    """Scoring data of magnitude up to 1e4 (anywhere in the layer's domain) gives finite
    values and contributions."""
    layer, event_shape, domain = case
    layer = layer.to(dtype)
    x = torch.randn(3, *event_shape, dtype=dtype)
    x = x / x.abs().amax().clamp_min(1e-12) * magnitude
    if domain == "positive":
        x = x.abs() + 1e-3
    if domain == "interval":  # Logit: data in [0, scale], extremes at the ends
        x = (x.sigmoid() * layer.scale).clamp(0, layer.scale)
    z, v = layer.inverse_and_ladj(x)
    assert torch.isfinite(z).all() and torch.isfinite(v).all()


@st.composite
def surjections(draw):
    """``(layer, data event shape)`` for a random surjection with random settings."""
    kind = draw(st.sampled_from(["abs", "sort", "slice", "augment", "rad", "maxpool"]))
    dim = draw(st.integers(2, 4))
    if kind == "abs":
        layer = SJ.Abs(dim, learn_signs=draw(st.booleans()), hidden_dims=(4,))
    elif kind == "sort":
        layer = SJ.Sort(dim)
    elif kind == "slice":
        layer = SJ.Slice(dim, draw(st.integers(1, dim - 1)), hidden_dims=(4,))
    elif kind == "augment":
        layer = SJ.Augment(dim, draw(st.integers(1, 3)), hidden_dims=(4,))
    elif kind == "rad":
        layer = SJ.RAD(dim, draw(st.sampled_from([3, 5, 7])), hidden_dims=(4,))
    else:
        layer = SJ.MaxPool2d(dim, simple=draw(st.booleans()), hidden_dims=(4,))
    torch.manual_seed(draw(seeds))
    perturb(layer, draw(scales))
    return layer, ((dim, 4, 2) if kind == "maxpool" else (dim,))


@given(case=surjections(), batch=batch_shapes, dtype=dtypes, magnitude=st.floats(1e-2, 1e4))
def test_surjection_shapes_round_trip_and_finite(case, batch, dtype, magnitude):
    """Data -> base gives the declared shape and a finite contribution for data up to 1e4;
    base -> data -> base returns the base point for inference surjections, and
    data -> base -> data returns the data for generative ones (Augment)."""
    layer, data_shape = case
    layer = layer.to(dtype)
    x = torch.randn(batch + data_shape, dtype=dtype)
    x = x / x.abs().amax().clamp_min(1e-12) * magnitude
    z, v = layer.inverse_and_ladj(x)
    assert tuple(z.shape) == tuple(layer.inverse_shape(x.shape)) and v.shape == batch
    assert torch.isfinite(z).all() and torch.isfinite(v).all()
    x2, _ = layer.call_and_ladj(z)
    assert x2.shape == x.shape
    if layer.stochastic_inverse:  # Augment: z = [x, noise] and the generative map drops it
        torch.testing.assert_close(x2, x, **tol(dtype))
    else:  # the generative draw lands in the fibre of z
        z2, _ = layer.inverse_and_ladj(x2)
        torch.testing.assert_close(z2, z, atol=1e-5 * magnitude, rtol=1e-4)


EVENT_LAYERS = sorted(n for n in LAYERS if "context" not in n)


@given(name=st.sampled_from(EVENT_LAYERS), extra=st.integers(1, 3), batch=batch_shapes)
def test_wrong_event_size_is_a_clear_error(name, extra, batch):
    """A data-side tensor whose checked size is off by ``extra`` raises a ValueError naming the
    expected size (not an opaque shape error from inside the layer)."""
    make, shape, data = LAYERS[name]
    layer = make()
    k = layer.event_dim
    dim = getattr(layer, "dim", None)
    assume(dim is not None)
    bad = list(shape)
    bad[len(bad) - k] += extra
    x = data((*batch, *bad))
    with pytest.raises(ValueError, match="expects|needs|size|channels"):
        layer.inv(x)


INVALID = {
    "dim": (lambda v: T.ActNorm(v), st.one_of(st.integers(-5, 0), st.floats(0.1, 3.9),
                                              st.just("3"))),
    "spline bins": (lambda v: T.RationalQuadraticSpline(2, count_bins=v), st.integers(-3, 0)),
    "spline bound": (lambda v: T.SplineCoupling(2, count_bins=4, bound=v),
                     st.one_of(st.floats(-10, 0), st.just(float("inf")))),
    "clamp": (lambda v: T.AffineCoupling(2, clamp=v), st.floats(-10, 0)),
    "lipschitz": (lambda v: T.ResidualBlock(2, lipschitz=v),
                  st.one_of(st.floats(-2, 0), st.floats(1, 5))),
    "rad pieces": (lambda v: SJ.RAD(2, num_pieces=v),
                   st.one_of(st.integers(-2, 2), st.integers(2, 10).map(lambda n: 2 * n))),
    "slice keep": (lambda v: SJ.Slice(3, v), st.one_of(st.integers(-3, 0), st.integers(3, 6))),
    "augment extra": (lambda v: SJ.Augment(2, v), st.integers(-3, 0)),
    "momentum": (lambda v: T.InvertibleBatchNorm(2, momentum=v),
                 st.one_of(st.floats(-3, -0.01), st.floats(1.01, 3))),
    "mask": (lambda v: T.AffineCoupling(3, mask=v), st.sampled_from([[1, 1, 1], [0, 0, 0],
                                                                      [1, 0]])),
    "order": (lambda v: T.MaskedAutoregressive(3, order=v),
              st.lists(st.integers(0, 2), min_size=3, max_size=3).filter(
                  lambda o: sorted(o) != [0, 1, 2])),
    "permutation": (lambda v: T.Permute(3, v),
                    st.lists(st.integers(0, 3), min_size=3, max_size=3).filter(
                        lambda o: sorted(o) != [0, 1, 2])),
}


@given(data=st.data(), what=st.sampled_from(sorted(INVALID)))
def test_invalid_constructor_arguments_are_clear_errors(data, what):
    """Each invalid argument raises a ValueError whose message names what was expected."""
    make, values = INVALID[what]
    value = data.draw(values)
    with pytest.raises(ValueError, match="must|needs|expected|permutation"):
        make(value)


PROPERTIES = [test_round_trip_and_inverse_log_det, test_log_det_matches_autograd,
              test_finite_on_extreme_inputs, test_surjection_shapes_round_trip_and_finite,
              test_wrong_event_size_is_a_clear_error,
              test_invalid_constructor_arguments_are_clear_errors]


@pytest.mark.slow
@pytest.mark.parametrize("prop", PROPERTIES, ids=[p.__name__[5:] for p in PROPERTIES])
def test_long_profile(prop):
    """Every property again under ``-m slow``, with the ``long`` profile (300 random examples
    each; loaded by tests/conftest.py for ``-m slow``)."""
    prop()
