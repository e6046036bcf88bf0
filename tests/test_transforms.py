import pyro.distributions as dist
import pytest
import torch

import pyro_flows_ext as pfe
from pyro_flows_ext.transforms import (
    ActNorm,
    AffineCoupling,
    AutogradBijection,
    Exp,
    InvertibleBatchNorm,
    InvertibleConv1x1,
    Permute,
    Reverse,
)

from .contract import check_bijection, perturb


class Cube(AutogradBijection):
    """x = z + a z^3 (a > 0): a bijection given only by its maps."""

    def __init__(self, dim):
        super().__init__()
        self.dim = dim
        self.log_a = torch.nn.Parameter(torch.zeros(dim))

    def forward_map(self, z):
        return z + self.log_a.exp() * z**3

    def inverse_map(self, x):
        z = x.clone()
        for _ in range(100):  # Newton's method on a strictly monotone cubic
            z = z - (z + self.log_a.exp() * z**3 - x) / (1 + 3 * self.log_a.exp() * z**2)
        return z


def batchnorm_eval(dim):
    return InvertibleBatchNorm(dim).eval()


LAYERS = {
    "exp": (lambda: Exp(3), (3,)),
    "coupling": (lambda: AffineCoupling(4, hidden_dims=(8,)), (4,)),
    "coupling-odd-mask": (lambda: AffineCoupling(5, hidden_dims=(8,), mask=[1, 0, 1, 0, 0]), (5,)),
    "coupling-rational": (lambda: AffineCoupling(4, hidden_dims=(8,), squash="rational",
                                                 invert=True), (4,)),
    "conv1x1": (lambda: InvertibleConv1x1(3), (3,)),
    "conv1x1-lu": (lambda: InvertibleConv1x1(3, lu=True), (3,)),
    "conv1x1-image": (lambda: InvertibleConv1x1(3, event_dim=3), (3, 2, 2)),
    "conv1x1-lu-image": (lambda: InvertibleConv1x1(2, lu=True, event_dim=3), (2, 3, 2)),
    "actnorm": (lambda: ActNorm(3), (3,)),
    "actnorm-image": (lambda: ActNorm(2, event_dim=3), (2, 2, 3)),
    "batchnorm-eval": (lambda: batchnorm_eval(3), (3,)),
    "batchnorm-image-eval": (lambda: InvertibleBatchNorm(2, event_dim=3).eval(), (2, 2, 2)),
    "reverse": (lambda: Reverse(4), (4,)),
    "permute": (lambda: Permute(4), (4,)),
    "autograd-bijection": (lambda: Cube(3), (3,)),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_contract(name, dtype):
    make, event_shape = LAYERS[name]
    check_bijection(perturb(make()), event_shape, dtype=dtype)


def test_layers_are_pyro_transform_modules():
    for make, _ in LAYERS.values():
        layer = make()
        assert isinstance(layer, dist.TransformModule)
        assert layer.bijective


def test_affine_coupling_starts_at_identity_and_clamps_scale():
    layer = AffineCoupling(4, clamp=2.0)
    z = torch.randn(10, 4)
    x, ladj = layer.call_and_ladj(z)
    torch.testing.assert_close(x, z)
    assert (ladj == 0).all()
    with torch.no_grad():  # a huge network output cannot push the log-scale past the clamp
        layer.net.layers()[-1][1].fill_(1e4)
    _, ladj = layer.call_and_ladj(z)
    assert torch.isfinite(ladj).all() and (ladj.abs() <= 2.0 * 2 + 1e-5).all()


def test_rational_squash_is_bounded_with_polynomial_slope():
    # r / (1 + |r| / b): bounded by b, slope 1 at 0, and slope (1 + |r|/b)^-2 (autograd)
    # where tanh's has decayed exponentially: a saturated log-scale keeps learning
    b = 2.0
    layer = AffineCoupling(4, clamp=b, squash="rational")
    with torch.no_grad():
        layer.net.layers()[-1][1].fill_(1e4)
    _, ladj = layer.call_and_ladj(torch.randn(10, 4))
    assert torch.isfinite(ladj).all() and (ladj.abs() < 2 * b).all()
    assert (ladj.abs() > 2 * b * 0.999).all()  # 1e4 / (1 + 5e3) = b * 0.9998
    r = torch.tensor([0.0, 1.0, 10.0, -10.0], dtype=torch.float64, requires_grad=True)
    s = layer.element_map._squash(r, b)
    (slope,) = torch.autograd.grad(s.sum(), r)
    torch.testing.assert_close(slope, (1 + r.detach().abs() / b) ** -2)
    tanh_slope = 1 - torch.tanh(torch.tensor(10.0 / b)) ** 2
    assert slope[2] > 100 * tanh_slope
    with pytest.raises(ValueError, match="unknown squash"):
        AffineCoupling(4, squash="sigmoid")


def test_affine_coupling_leaves_masked_part_unchanged():
    layer = perturb(AffineCoupling(5, mask=[1, 0, 1, 0, 0]))
    z = torch.randn(7, 5)
    x = layer(z)
    torch.testing.assert_close(x[:, [0, 2]], z[:, [0, 2]])
    assert not torch.allclose(x[:, [1, 3, 4]], z[:, [1, 3, 4]])


def test_bad_event_size_is_a_clear_error():
    with pytest.raises(ValueError, match="expects events of size 4.*shape \\(2, 3\\)"):
        AffineCoupling(4)(torch.randn(2, 3))
    with pytest.raises(ValueError, match="dim >= 2"):
        AffineCoupling(1)
    with pytest.raises(ValueError, match="permutation of range"):
        Permute(3, [0, 0, 1])


def test_actnorm_data_dependent_init_and_flag_in_state_dict():
    layer = ActNorm(3)
    x = torch.randn(1000, 3) * torch.tensor([0.5, 2.0, 5.0]) + torch.tensor([1.0, -2.0, 3.0])
    z, _ = layer.inverse_and_ladj(x)
    torch.testing.assert_close(z.mean(0), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(z.std(0), torch.ones(3), atol=1e-4, rtol=0)
    state = layer.state_dict()
    assert bool(state["initialized"])
    other = ActNorm(3)
    other.load_state_dict(state)
    z2, _ = other.inverse_and_ladj(x + 10)  # loaded layer must not re-initialise
    torch.testing.assert_close(z2, z + 10 / x.std(0), atol=1e-4, rtol=1e-4)


def test_actnorm_image_init_per_channel():
    layer = ActNorm(2, event_dim=3)
    x = torch.randn(50, 2, 4, 4) * torch.tensor([3.0, 0.1]).view(2, 1, 1)
    z, v = layer.inverse_and_ladj(x)
    torch.testing.assert_close(z.std((0, 2, 3)), torch.ones(2), atol=1e-3, rtol=0)
    assert v.shape == (50,)


def test_batchnorm_train_mode_is_exactly_invertible():
    layer = InvertibleBatchNorm(3)
    with torch.no_grad():
        layer.log_gamma.normal_()
        layer.beta.normal_()
    x = torch.randn(6, 5, 3) * 3 + 1
    z, v = layer.inverse_and_ladj(x)  # batch statistics over both batch dims
    torch.testing.assert_close(z.mean((0, 1)), layer.beta.detach(), atol=1e-5, rtol=0)
    x_back, ladj = layer.call_and_ladj(z)  # the generative direction reuses them
    torch.testing.assert_close(x_back, x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ladj, -v)
    # running statistics moved towards the batch ones
    assert (layer.running_mean != 0).all() and (layer.running_var != 1).all()


def test_batchnorm_eval_uses_running_statistics():
    layer = InvertibleBatchNorm(2).eval()
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor([1.0, -1.0]))
        layer.running_var.copy_(torch.tensor([4.0, 0.25]))
    x = torch.randn(10, 2)
    z, _ = layer.inverse_and_ladj(x)
    expected = (x - layer.running_mean) / torch.sqrt(layer.running_var + layer.eps)
    torch.testing.assert_close(z, expected)


def test_lu_conv_weight_matches_its_factors():
    layer = perturb(InvertibleConv1x1(4, lu=True))
    w, logdet = layer.weight_and_logdet()
    torch.testing.assert_close(logdet, torch.linalg.slogdet(w)[1], atol=1e-5, rtol=1e-5)


def test_conv_is_pixelwise_matrix_product():
    layer = perturb(InvertibleConv1x1(3, event_dim=3))
    z = torch.randn(2, 3, 4, 5)
    expected = torch.nn.functional.conv2d(z, layer.weight[:, :, None, None])
    torch.testing.assert_close(layer(z), expected, atol=1e-5, rtol=1e-5)


def test_exp_matches_pyro_exp_transform():
    z = torch.randn(5, 3)
    ours = pfe.Flow(None, [Exp(3)])
    pyros = dist.TransformedDistribution(dist.Normal(torch.zeros(3), 1).to_event(1),
                                         [dist.transforms.ExpTransform()])
    x = pyros.sample((4,))
    torch.testing.assert_close(ours.log_prob(x), pyros.log_prob(x))
    assert ours.support.check(z.exp()).all()


def test_with_cache_returns_self_for_bijections():
    layer = AffineCoupling(2)
    assert layer.with_cache(1) is layer and layer.with_cache(0) is layer


def test_conditional_affine_coupling_contract_per_context():
    layer = perturb(AffineCoupling(3, hidden_dims=(8,), context_dim=2)).double()
    for _ in range(2):
        context = torch.randn(2, dtype=torch.float64)
        check_bijection(layer.condition(context), (3,), dtype=torch.float64)


def test_conditional_flow_depends_on_context_and_needs_it():
    layers = [perturb(AffineCoupling(2, context_dim=3)), perturb(ActNorm(2))]
    flow = pfe.Flow(None, layers)
    with pytest.raises(ValueError, match="context_dim=3"):
        flow.log_prob(torch.randn(4, 2))
    c = torch.randn(4, 3)
    conditioned = flow.condition(c)
    x, lp = conditioned.sample_and_log_prob()
    assert x.shape == (4, 2) and conditioned.batch_shape == (4,)
    torch.testing.assert_close(conditioned.log_prob(x.clone()), lp)
    assert not torch.allclose(flow.condition(torch.randn(4, 3)).log_prob(x), lp)
    xs = conditioned.sample((5,))  # (sample, batch, event) with a batch of contexts
    assert xs.shape == (5, 4, 2) and conditioned.log_prob(xs).shape == (5, 4)
    pyro_cond = dist.ConditionalTransformedDistribution(dist.Normal(torch.zeros(2), 1).to_event(1),
                                                        layers).condition(c)
    torch.testing.assert_close(pyro_cond.log_prob(x.clone()), lp)


def test_conv_reverse_init_is_the_channel_reversal():
    z = torch.randn(5, 4)
    for lu in (False, True):
        torch.testing.assert_close(InvertibleConv1x1(4, lu=lu, init="reverse")(z), z.flip(-1))
    with pytest.raises(ValueError, match="init must be"):
        InvertibleConv1x1(4, init="nope")
