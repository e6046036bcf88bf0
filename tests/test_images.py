"""Image layers and the multi-scale glow (issue 14): every layer's log-det against autograd,
squeeze against an index-by-index reference, a glow's log_prob against its parts walked by
hand, normalisation by importance sampling, shapes, dtypes, persistence and a short fit."""

import copy
import math

import pyro.optim
import pytest
import torch

import pyro_flows_ext as pfe
from pyro_flows_ext.surjections import ChannelSlice, MaxPool2d
from pyro_flows_ext.transforms import (
    ActNorm,
    EmergingConv,
    ImageCoupling,
    InvertibleConv1x1,
    Squeeze,
)

from .contract import autograd_ladj, check_bijection, perturb

LAYERS = {
    "coupling-checkerboard-0": lambda: ImageCoupling(2, "checkerboard", 0, hidden_channels=8),
    "coupling-checkerboard-1": lambda: ImageCoupling(2, "checkerboard", 1, hidden_channels=8),
    "coupling-channel-0": lambda: ImageCoupling(3, "channel", 0, hidden_channels=8),
    "coupling-channel-1": lambda: ImageCoupling(3, "channel", 1, hidden_channels=8),
    "coupling-generative-form": lambda: ImageCoupling(2, "checkerboard", hidden_channels=8,
                                                      invert=False),
    "emerging-3x3": lambda: EmergingConv(2),
    "emerging-5x5": lambda: EmergingConv(3, kernel_size=5),
    "actnorm": lambda: ActNorm(2, event_dim=3),
    "conv1x1": lambda: InvertibleConv1x1(2, event_dim=3),
    "conv1x1-lu": lambda: InvertibleConv1x1(3, lu=True, event_dim=3),
}
SHAPES = {"coupling-channel-0": (3, 4, 4), "coupling-channel-1": (3, 4, 4),
          "emerging-5x5": (3, 3, 5), "conv1x1-lu": (3, 4, 4)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_image_layer_contract(name, dtype):
    """Round trips, log-det against the autograd Jacobian, batch shapes, gradients, copies."""
    check_bijection(perturb(LAYERS[name]()), SHAPES.get(name, (2, 4, 4)), dtype=dtype)


def test_conditional_coupling_against_autograd():
    layer = perturb(ImageCoupling(2, "checkerboard", context_dim=3, hidden_channels=8)).double()
    c = torch.randn(3, dtype=torch.float64)
    conditioned = layer.condition(c)
    check_bijection(conditioned, (2, 4, 4))
    z = torch.randn(4, 2, 4, 4, dtype=torch.float64)
    other = layer.condition(torch.randn(3, dtype=torch.float64))
    assert (conditioned.call_and_ladj(z)[0] - other.call_and_ladj(z)[0]).abs().max() > 1e-3
    # one context per entry of the batch
    cs = torch.randn(4, 3, dtype=torch.float64)
    x, ladj = layer.call_and_ladj(z, context=cs)
    for i in range(4):
        xi, li = layer.call_and_ladj(z[i], context=cs[i])
        torch.testing.assert_close(x[i], xi)
        torch.testing.assert_close(ladj[i], li)
    with pytest.raises(ValueError, match="context"):
        layer.call_and_ladj(z)


def test_emerging_conv_is_a_full_kxk_convolution():
    """After training moves its taps, output pixel (i, j) depends on every input pixel of its
    3x3 neighbourhood (both masked halves contribute) and on nothing outside it."""
    layer = perturb(EmergingConv(2)).double()
    x = torch.randn(2, 5, 5, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda e: layer.inverse_and_ladj(e)[0], x)
    block = jac[:, 2, 2].abs().sum((0, 1))  # |dz(:, 2, 2) / dx(:, a, b)|
    assert (block[1:4, 1:4] > 1e-6).all()
    block[1:4, 1:4] = 0
    assert block.abs().max() == 0
    # the starting layer is Glow's LU 1x1 convolution: only the centre taps are non-zero
    fresh = EmergingConv(3)
    lower, upper = fresh.kernels()
    w = (lower[:, :, 1, 1] @ upper[:, :, 1, 1])
    torch.testing.assert_close(w @ w.T, torch.eye(3), atol=1e-5, rtol=0)  # a rotation
    assert lower[:, :, [0, 2]].abs().max() == 0 and upper[:, :, :, [0, 2]].abs().max() == 0


# -- squeeze -----------------------------------------------------------------------------------

def reference_squeeze(x, f):
    """Space-to-depth, index by index: z[c f^2 + f i + j, h, w] = x[c, f h + i, f w + j]."""
    c, height, width = x.shape[-3:]
    z = x.new_empty(*x.shape[:-3], c * f * f, height // f, width // f)
    for ch in range(c):
        for i in range(f):
            for j in range(f):
                z[..., ch * f * f + f * i + j, :, :] = x[..., ch, i::f, j::f]
    return z


@pytest.mark.parametrize("factor", [2, 3])
def test_squeeze_round_trip_shapes_and_jacobian(factor):
    layer = Squeeze(2, factor)
    x = torch.randn(3, 4, 2, 2 * factor, 3 * factor, dtype=torch.float64)
    z, v = layer.inverse_and_ladj(x)
    assert z.shape == (3, 4, 2 * factor ** 2, 2, 3)
    torch.testing.assert_close(z, reference_squeeze(x, factor), atol=0, rtol=0)
    back, ladj = layer.call_and_ladj(z)
    torch.testing.assert_close(back, x, atol=0, rtol=0)
    assert v.shape == ladj.shape == (3, 4) and not v.any() and not ladj.any()
    assert tuple(layer.inverse_shape(x.shape)) == tuple(z.shape)
    assert tuple(layer.forward_shape(z.shape)) == tuple(x.shape)
    # a permutation: its Jacobian's log|det| is 0
    torch.testing.assert_close(autograd_ladj(layer, z[0, :1], z.shape[-3:]),
                               torch.zeros(1, dtype=torch.float64))
    with pytest.raises(ValueError, match="divisible by"):
        layer.inv(torch.randn(2, 2 * factor + 1, 2 * factor))
    with pytest.raises(ValueError, match="2 channels"):
        layer.inv(torch.randn(3, 2 * factor, 2 * factor))
    with pytest.raises(ValueError, match="base side"):
        layer(torch.randn(2, 2, 2))


# -- channel slice -----------------------------------------------------------------------------

def test_channel_slice_likelihood_is_the_conditional_gaussian():
    layer = perturb(ChannelSlice(3, 1, hidden_channels=8)).double()
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    z, v = layer.inverse_and_ladj(x)
    torch.testing.assert_close(z, x[:, :1])
    _, loc, log_scale = layer.params(z)
    expected = torch.distributions.Normal(loc, log_scale.exp()).log_prob(x[:, 1:]).sum((1, 2, 3))
    torch.testing.assert_close(v, expected)
    layer.clear_cache()
    torch.testing.assert_close(layer.log_abs_det_jacobian(z, x), -expected)
    # generative draws follow that Gaussian; the returned ladj is minus its log-density
    zs = z[:1].expand(4000, 1, 4, 4)
    xs, ladj = layer.call_and_ladj(zs)
    torch.testing.assert_close(xs[:, :1], zs)
    dropped, scale = xs[:, 1:], log_scale[0].exp()
    assert ((dropped.mean(0) - loc[0]).abs() / (scale / math.sqrt(len(zs)))).max() < 4.5
    torch.testing.assert_close(dropped.std(0).log(), log_scale[0], atol=0.1, rtol=0)
    expected = torch.distributions.Normal(loc[:1], log_scale[:1].exp()).log_prob(dropped)
    torch.testing.assert_close(ladj, -expected.sum((1, 2, 3)))
    assert tuple(layer.inverse_shape(x.shape)) == (5, 1, 4, 4)
    assert tuple(layer.forward_shape((5, 1, 4, 4))) == (5, 3, 4, 4)
    with pytest.raises(ValueError, match="3 channels"):
        layer.inv(torch.randn(2, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="0 < keep < dim"):
        ChannelSlice(2, 2)


def test_channel_slice_density_integrates_to_one():
    """A (2, 1, 1) image: one kept value from N(0, 1), one dropped value from the learned
    conditional Gaussian; the 2-D density integrates to 1 on a grid."""
    layer = perturb(ChannelSlice(2, 1, hidden_channels=8), 0.5).double()
    flow = pfe.Flow(None, [layer], event_shape=(1, 1, 1)).double()
    axis = torch.linspace(-12, 12, 481, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2, 1, 1)
    with torch.no_grad():
        mass = flow.log_prob(grid).exp().sum().item() * (axis[1] - axis[0]).item() ** 2
    assert abs(mass - 1) < 1e-3


# -- the multi-scale glow ----------------------------------------------------------------------

def small_glow(shape=(1, 4, 4), scale=0.2, **kwargs):
    settings = dict(levels=2, steps_per_level=1, hidden_channels=8)
    settings.update(kwargs)
    flow = pfe.flows.glow(shape, **settings).double()
    for layer in flow.transforms:
        perturb(layer, scale)
    return flow.eval()


VARIANTS = {
    "slice-channel-lu": dict(factor_out="slice", coupling_mask="channel", conv="lu"),
    "slice-checkerboard-emerging": dict(shape=(1, 8, 8), factor_out="slice",
                                        coupling_mask="checkerboard", conv="emerging"),
    "maxpool-checkerboard-1x1": dict(shape=(1, 8, 8), factor_out="maxpool",
                                     coupling_mask="checkerboard", conv="1x1"),
    "maxpool-channel-emerging": dict(factor_out="maxpool", coupling_mask="channel",
                                     conv="emerging"),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_glow_log_prob_is_the_sum_of_its_parts(variant):
    """Walks the layers from data to base by hand: each bijection's term from its own autograd
    Jacobian, each slice's from torch's Normal on its network's output, the max-pool's from its
    window decomposition, and the base from torch's Normal."""
    flow = small_glow(**VARIANTS[variant])
    x = torch.randn(3, *flow.event_shape, dtype=torch.float64)
    total, y = torch.zeros(3, dtype=torch.float64), x
    for layer in reversed(flow.transforms):
        z = layer._inverse(y)
        if isinstance(layer, ChannelSlice):
            _, loc, log_scale = layer.params(z)
            v = torch.distributions.Normal(loc, log_scale.exp()).log_prob(y[:, layer.keep:])
            total = total + v.sum((1, 2, 3))
        elif isinstance(layer, MaxPool2d):
            total = total - layer._ladj_of_unseen_pair(z, y)
            assert torch.equal(z, torch.nn.functional.max_pool2d(y, 2))
        else:
            total = total - autograd_ladj(layer, z, z.shape[1:])
        assert tuple(layer.inverse_shape(y.shape)) == tuple(z.shape)
        y = z
    assert tuple(y.shape[1:]) == tuple(flow.base_dist.event_shape)
    total = total + torch.distributions.Normal(0.0, 1.0).log_prob(y).sum((1, 2, 3))
    torch.testing.assert_close(flow.log_prob(x), total, atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("shape,levels,factor_out,base", [
    ((1, 8, 8), 2, "slice", (8, 2, 2)),
    ((1, 8, 8), 2, "maxpool", (4, 2, 2)),
    ((3, 16, 16), 3, "slice", (48, 2, 2)),
    ((1, 16, 16), 3, "maxpool", (4, 2, 2)),
    ((2, 8, 12), 2, "slice", (16, 2, 3)),
])
def test_glow_shapes(shape, levels, factor_out, base):
    flow = pfe.flows.glow(shape, levels=levels, steps_per_level=1, hidden_channels=4,
                          factor_out=factor_out)
    assert tuple(flow.event_shape) == shape and tuple(flow.base_dist.event_shape) == base
    s = (2, 3) + base
    for layer in flow.transforms:  # forward_shape from the base to the data
        s = layer.forward_shape(s)
    assert tuple(s) == (2, 3) + shape
    for layer in reversed(flow.transforms):  # and inverse_shape back
        s = layer.inverse_shape(s)
    assert tuple(s) == (2, 3) + base
    with torch.no_grad():
        x = flow.sample((2, 3))
        assert x.shape == (2, 3) + shape
        assert flow.log_prob(x).shape == (2, 3)
        xs, log_p = flow.sample_and_log_prob((4,))
    assert xs.shape == (4,) + shape
    # inference surjections: scoring a draw afresh gives the log-density it was drawn with
    torch.testing.assert_close(flow.log_prob(xs.clone()), log_p, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("shape,kwargs,scale,n", [
    ((1, 2, 2), dict(levels=1, conv="emerging"), 0.1, 20000),
    ((1, 4, 4), dict(factor_out="slice", conv="lu"), 0.1, 20000),
    ((1, 4, 4), dict(factor_out="maxpool", conv="1x1"), 0.05, 40000),
], ids=["1x2x2", "1x4x4-slice", "1x4x4-maxpool"])
def test_glow_integrates_to_one(shape, kwargs, scale, n):
    r"""Importance sampling from a Gaussian fitted to the flow's draws (an independent,
    normalised proposal r): :math:`E_r[p(x) / r(x)] = \int p = 1`. (The max-pool's gap
    densities make the weights heavy-tailed under larger perturbations.)"""
    flow = small_glow(shape, scale=scale, **kwargs)
    d = math.prod(shape)
    with torch.no_grad():
        draws = flow.sample((4000,)).reshape(-1, d)
        cov = torch.cov(draws.T) * 1.2 ** 2 + 1e-3 * torch.eye(d, dtype=torch.float64)
        proposal = torch.distributions.MultivariateNormal(draws.mean(0), cov)
        x = proposal.sample((n,))
        log_p = flow.log_prob(x.reshape(-1, *shape))
        w = (log_p - proposal.log_prob(x)).exp()
        # the perturbed flow is far from its N(0, I) base, so the check has teeth
        base = torch.distributions.Normal(0.0, 1.0).log_prob(x).sum(-1)
        assert (log_p - base).abs().mean() > 0.5
    estimate, se = w.mean().item(), w.std().item() / math.sqrt(len(w))
    assert se < 0.03, f"proposal too poor to test (standard error {se:.3f})"
    assert abs(estimate - 1) < 4 * se + 1e-3, f"integral {estimate:.4f} +- {se:.4f}"


def test_glow_dtypes_devices_and_errors():
    flow = pfe.flows.glow((1, 8, 8), steps_per_level=1, hidden_channels=8, conv="emerging")
    for layer in flow.transforms:
        perturb(layer, 0.2)
    flow.eval()
    x = torch.randn(4, 1, 8, 8)
    lp32 = flow.log_prob(x)
    assert lp32.dtype == torch.float32 and torch.isfinite(lp32).all()
    flow64 = copy.deepcopy(flow).to(torch.float64)
    assert flow64.base_dist.mean.dtype == torch.float64
    assert flow64.sample((2,)).dtype == torch.float64
    torch.testing.assert_close(lp32.double(), flow64.log_prob(x.double()), atol=2e-3, rtol=1e-4)
    with pytest.raises(ValueError, match=r"event shape \(1, 8, 8\)"):
        flow.log_prob(torch.randn(2, 1, 8, 6))
    with pytest.raises(ValueError, match="divisible by 4"):
        pfe.flows.glow((1, 6, 8))
    with pytest.raises(ValueError, match="image shape"):
        pfe.flows.glow(64)
    with pytest.raises(ValueError, match="checkerboard coupling needs at least 2 pixels"):
        pfe.flows.glow((1, 8, 8), levels=3, coupling_mask="checkerboard")
    with pytest.raises(ValueError, match="gaussian_start"):
        pfe.flows.glow((1, 8, 8), gaussian_start=True)
    with pytest.raises(ValueError, match="unknown factor_out"):
        pfe.flows.glow((1, 8, 8), factor_out="avgpool")


def test_glow_registered_saved_and_loaded(tmp_path):
    assert pfe.flows.get_builder("glow") is pfe.flows.glow
    flow = pfe.flows.glow((1, 8, 8), steps_per_level=1, hidden_channels=8, factor_out="maxpool")
    for layer in flow.transforms:
        perturb(layer, 0.2)
    assert flow.spec["shape"] == (1, 8, 8) and flow.spec["kwargs"]["gaussian_start"] is False
    pfe.save(flow, tmp_path / "glow.pt")
    loaded = pfe.load(tmp_path / "glow.pt")
    x = torch.randn(3, 1, 8, 8)
    flow.eval(), loaded.eval()
    torch.testing.assert_close(loaded.log_prob(x), flow.log_prob(x))
    # composable: more layers at the data end, the base shape still known to the first layer
    extended = pfe.Flow(None, list(flow.transforms) + [ActNorm(1, event_dim=3)])
    assert extended.base_dist.event_shape == flow.base_dist.event_shape


def test_conditional_glow():
    flow = pfe.flows.glow((1, 8, 8), steps_per_level=1, hidden_channels=8, context_dim=10)
    for layer in flow.transforms:
        perturb(layer, 0.2)
    flow.eval()
    labels = torch.nn.functional.one_hot(torch.arange(10), 10).float()
    with torch.no_grad():
        conditioned = flow.condition(labels)
        x = conditioned.sample((3,))
        assert x.shape == (3, 10, 1, 8, 8)
        lp = conditioned.log_prob(x)
        assert lp.shape == (3, 10) and torch.isfinite(lp).all()
        # one image scored under every class: the classes give different densities
        one = flow.condition(labels).log_prob(x[0, 0])
    assert one.shape == (10,) and one.std() > 1e-3


def gaussian_field(n, size=8, length=2.0, noise=0.05, seed=0):
    """Smooth images: a Gaussian process on the pixel grid (squared-exponential kernel plus a
    little white noise), with its exact per-image entropy in nats."""
    g = torch.Generator().manual_seed(seed)
    ij = torch.stack(torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij"),
                     -1).reshape(-1, 2).double()
    cov = torch.exp(-torch.cdist(ij, ij).square() / (2 * length ** 2))
    cov = cov + noise ** 2 * torch.eye(size * size, dtype=torch.float64)
    mvn = torch.distributions.MultivariateNormal(torch.zeros(size * size, dtype=torch.float64),
                                                 cov)
    x = torch.linalg.cholesky(cov) @ torch.randn(size * size, n, generator=g, dtype=torch.float64)
    return x.T.reshape(n, 1, size, size).float(), mvn.entropy().item()


def test_glow_fit_on_smooth_images():
    """A short fit learns the pixels' correlations: its test NLL ends well below that of the
    best independent-pixel Gaussian and no lower than the exact entropy (cross-entropy)."""
    train, entropy = gaussian_field(2000)
    test, _ = gaussian_field(1000, seed=1)
    flow = pfe.flows.glow((1, 8, 8), steps_per_level=2, hidden_channels=16)
    history = pfe.infer.fit_density(flow, train, num_steps=150, batch_size=128, progress=False,
                                    eval_every=50, patience=None,
                                    optim=pyro.optim.Adam({"lr": 3e-3}))
    with torch.no_grad():
        nll = -flow.log_prob(test).mean().item()
    var = train.double().var(0).reshape(-1)
    independent = 0.5 * (torch.log(2 * math.pi * var) + 1).sum().item()
    assert all(math.isfinite(v) for v in history["loss"])
    assert history["val_nll"][-1] < history["val_nll"][0] - 20
    assert entropy - 3.0 < nll < independent - 40, (entropy, nll, independent)


def test_maxpool_gaps_are_truncated_normals():
    """The learned max-pool's likelihood is the categorical position times normals truncated
    to d > 0 (scored with torch's Normal and its CDF), positive at d = 0 (ties), and its
    draws have the truncated normal's mean."""
    layer = perturb(MaxPool2d(2), 0.5).double()
    z = torch.randn(2, 2, 2, dtype=torch.float64)
    x, ladj = layer.call_and_ladj(z.expand(4000, 2, 2, 2))
    log_pos, a, log_scale = (t[None] for t in layer._conditionals(z))
    windows = x.reshape(4000, 2, 2, 2, 2, 2).transpose(-3, -2).reshape(4000, 2, 2, 2, 4)
    k = windows.argmax(-1)
    d = z[None, ..., None] - windows
    sigma = log_scale.exp()
    normal = torch.distributions.Normal(a * sigma, sigma)
    log_gap = normal.log_prob(d) - torch.distributions.Normal(0.0, 1.0).cdf(a).log()
    is_max = torch.nn.functional.one_hot(k, 4).bool()
    log_k = log_pos.expand(d.shape).gather(-1, k[..., None])[..., 0]
    v = log_k + log_gap.masked_fill(is_max, 0.0).sum(-1)
    torch.testing.assert_close(ladj, -v.sum((1, 2, 3)))
    # draws: the mean gap at each (position, window) against sigma (a + phi(a) / Phi(a))
    std_normal = torch.distributions.Normal(0.0, 1.0)
    expected = sigma[0] * (a[0] + std_normal.log_prob(a[0]).exp() / std_normal.cdf(a[0]))
    not_max = (~is_max).double()
    count = not_max.sum(0)
    mean = (d * not_max).sum(0) / count.clamp_min(1)
    sd = (((d - mean).square() * not_max).sum(0) / count.clamp_min(2)).sqrt()
    seen = count > 200  # some positions are nearly always the maximum
    assert seen.sum() >= 16
    assert ((mean - expected).abs() / (sd / count.sqrt()))[seen].max() < 4.5
    # ties (gaps of exactly 0) have a finite log-density
    tie = x[:3].clone()
    tie[..., 0, 1] = tie[..., 0, 0] = tie[..., :2, :2].amax((-2, -1))
    assert torch.isfinite(layer.inverse_and_ladj(tie)[1]).all()
