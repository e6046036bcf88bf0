"""Devices and dtypes, checked on a CPU-only machine.

The device-mismatch detector runs every layer with torch's default device set to ``meta``
while the layer and its inputs live on the CPU, under a :class:`TorchFunctionMode` that
fails on the first op that returns or receives a ``meta`` tensor. A tensor created
without ``device=`` inside a forward (``torch.zeros(n)``, ``torch.tensor(c)``,
``torch.eye(d)``) lands on ``meta`` and is reported with its file and line: on a GPU that
tensor would be on the CPU while the data are on the GPU. The dtype checks run each layer in
float32 with the default dtype set to float64 (and the reverse), which catches tensors
created without ``dtype=`` and tensors that ``.to()`` does not move (plain attributes that
are not registered buffers).
"""

import traceback

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

import pyro_flows_ext as pfe
from pyro_flows_ext import continuous as C
from pyro_flows_ext import stochastic as S
from pyro_flows_ext import surjections as SJ
from pyro_flows_ext import transforms as T

from .contract import perturb
from .test_compile import TINY


class DefaultDeviceLeak(AssertionError):
    pass


def _where():
    """The innermost stack frame in the package (where the tensor was made or used)."""
    frames = [f for f in traceback.extract_stack()[:-2] if "pyro_flows_ext" in f.filename]
    if not frames:
        return "outside pyro_flows_ext"
    f = frames[-1]
    return f"{f.filename.split('pyro_flows_ext/')[-1]}:{f.lineno} ({f.line})"


class DeviceLeakDetector(TorchFunctionMode):
    """Fails on any op whose inputs or outputs include a tensor on ``leak`` (the default
    device while the detector runs, distinct from the device the layer lives on)."""

    def __init__(self, leak="meta"):
        super().__init__()
        self.leak = torch.device(leak)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        for what, tree in (("input", (args, kwargs)), ("output", out)):
            for t in tree_flatten(tree)[0]:
                if isinstance(t, torch.Tensor) and t.device == self.leak:
                    name = getattr(func, "__name__", str(func))
                    raise DefaultDeviceLeak(
                        f"{name} has an {what} on the default device (created without "
                        f"device=), at {_where()}")
        return out


class LeakEnergy(torch.nn.Module):
    """A normalised N(0, I) energy written device-agnostically (the energy is user code)."""

    def forward(self, x):
        return 0.5 * x.square().sum(-1) + 0.5 * x.shape[-1] * 1.8378770664093453


def _ints(k):
    return lambda shape: torch.randint(0, k, shape).float()


def _normal(shape):
    return torch.randn(shape)


def _unit(shape):
    return torch.rand(shape) * 0.9 + 0.05


def _ordered(shape):
    return torch.randn(shape).sort(-1).values


def _positive(shape):
    return torch.rand(shape) + 0.1


# name -> (layer factory, data-side event shape, data generator). Every layer type of the
# package appears at least once; small sizes keep the whole file at a few seconds.
LAYERS = {
    "affine-coupling": (lambda: T.AffineCoupling(4, hidden_dims=(8,)), (4,), _normal),
    "affine-coupling-context": (lambda: T.AffineCoupling(3, hidden_dims=(8,), context_dim=2)
                                .condition(torch.randn(2)), (3,), _normal),
    "spline-coupling": (lambda: T.SplineCoupling(4, hidden_dims=(8,), count_bins=4),
                        (4,), _normal),
    "spline": (lambda: T.RationalQuadraticSpline(3, count_bins=4), (3,), _normal),
    "maf": (lambda: T.MaskedAutoregressive(3, hidden_dims=(8,)), (3,), _normal),
    "iaf-spline": (lambda: T.MaskedAutoregressive(3, "spline", inverse=True, hidden_dims=(8,),
                                                  count_bins=4), (3,), _normal),
    "residual": (lambda: T.ResidualBlock(3, hidden_dims=(8,)), (3,), _normal),
    "residual-power": (lambda: T.ResidualBlock(3, hidden_dims=(8,), logdet="power"),
                       (3,), _normal),
    "residual-roulette": (lambda: T.ResidualBlock(3, hidden_dims=(8,), logdet="roulette"),
                          (3,), _normal),
    "actnorm": (lambda: T.ActNorm(3), (3,), _normal),
    "actnorm-image": (lambda: T.ActNorm(2, event_dim=3), (2, 4, 4), _normal),
    "batchnorm": (lambda: T.InvertibleBatchNorm(3), (3,), _normal),
    "conv1x1": (lambda: T.InvertibleConv1x1(3), (3,), _normal),
    "conv1x1-lu-image": (lambda: T.InvertibleConv1x1(2, lu=True, event_dim=3), (2, 4, 4),
                         _normal),
    "permute": (lambda: T.Permute(4), (4,), _normal),
    "reverse": (lambda: T.Reverse(4), (4,), _normal),
    "exp": (lambda: T.Exp(3), (3,), _positive),
    "standardize": (lambda: T.Standardize(3, torch.randn(3), torch.rand(3) + 0.5), (3,),
                    _normal),
    "cholesky-affine": (lambda: T.CholeskyAffine(3), (3,), _normal),
    "logit": (lambda: T.Logit(3, scale=4), (3,), lambda s: torch.rand(s) * 4),
    "squeeze": (lambda: T.Squeeze(2), (2, 4, 4), _normal),
    "emerging-conv": (lambda: T.EmergingConv(2), (2, 4, 4), _normal),
    "image-coupling": (lambda: T.ImageCoupling(2, hidden_channels=4), (2, 4, 4), _normal),
    "abs": (lambda: SJ.Abs(3, hidden_dims=(8,)), (3,), _normal),
    "half-normal-map": (lambda: SJ.HalfNormalMap(3), (3,), _positive),
    "slice": (lambda: SJ.Slice(3, 2, hidden_dims=(8,)), (3,), _normal),
    "augment": (lambda: SJ.Augment(3, 2, hidden_dims=(8,)), (3,), _normal),
    "sort": (lambda: SJ.Sort(3), (3,), _normal),
    "ordered": (lambda: SJ.Ordered(3), (3,), _ordered),
    "maxpool": (lambda: SJ.MaxPool2d(2, hidden_dims=(8,)), (2, 4, 4), _normal),
    "rad": (lambda: SJ.RAD(3, hidden_dims=(8,)), (3,), _normal),
    "channel-slice": (lambda: SJ.ChannelSlice(4, hidden_channels=4), (4, 4, 4), _normal),
    "uniform-dequantization": (lambda: SJ.UniformDequantization(4), (3,), _ints(4)),
    "variational-dequantization": (lambda: SJ.VariationalDequantization(3, 4, hidden_channels=4),
                                   (3,), _ints(4)),
    "metropolis": (lambda: S.MetropolisLayer(LeakEnergy(), steps=2), (2,), _normal),
    "langevin": (lambda: S.LangevinLayer(LeakEnergy(), steps=2), (2,), _normal),
    "ula": (lambda: S.LangevinLayer(LeakEnergy(), steps=2, adjusted=False), (2,), _normal),
    "hmc": (lambda: S.HMCLayer(LeakEnergy(), steps=1, leapfrog_steps=2), (2,), _normal),
    "cnf": (lambda: C.CNF(2, hidden_dims=(8,), solver="rk4"), (2,), _normal),
    "cnf-exact": (lambda: C.CNF(2, hidden_dims=(8,), trace="exact", solver="rk4"), (2,),
                  _normal),
    "otflow": (lambda: C.OTFlow(2, width=8, num_steps=2, eval_steps=2), (2,), _normal),
}


def build(name, dtype=torch.float32):
    make, shape, data = LAYERS[name]
    torch.manual_seed(0)
    layer = perturb(make(), 0.1).to(dtype)
    return layer, data((3, *shape)).to(dtype)


def run_both_directions(layer, x):
    """Scores ``x`` (data to base), then maps the result back (base to data), in the
    layer's current mode; returns the four outputs."""
    z, v = layer.inverse_and_ladj(x)
    x2, ladj = layer.call_and_ladj(z.detach())
    return z, v, x2, ladj


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_no_tensor_is_created_on_the_default_device(name, mode):
    layer, x = build(name)
    layer.train(mode == "train")
    with torch.device("meta"), DeviceLeakDetector("meta"):
        outs = run_both_directions(layer, x)
    assert all(o.device.type == "cpu" for o in outs)


def test_the_detector_catches_a_hard_coded_tensor():
    """The detector's own check: a layer adding ``torch.zeros(n)`` in its forward fails."""

    class Leaky(T.Exp):
        def call_and_ladj(self, z):
            x, ladj = super().call_and_ladj(z)
            return x + torch.zeros(z.shape[-1]), ladj

    layer, z = Leaky(3), torch.randn(2, 3)
    with torch.device("meta"), DeviceLeakDetector("meta"):
        with pytest.raises(DefaultDeviceLeak, match="zeros has an output on the default"):
            layer.call_and_ladj(z)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_keeps_its_dtype_whatever_the_default(name, dtype):
    """A layer cast with ``.to(dtype)`` computes in ``dtype`` with the default dtype set to the
    other one, and float32 agrees with float64 (the layer's own float64 copy)."""
    other = torch.float64 if dtype == torch.float32 else torch.float32
    layer, x = build(name, dtype)
    layer.eval()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(other)
    try:
        torch.manual_seed(1)
        outs = run_both_directions(layer, x)
    finally:
        torch.set_default_dtype(previous)
    for o in outs:
        assert o.dtype == dtype, f"an output is {o.dtype}, expected {dtype}"
        assert torch.isfinite(o).all()
    if dtype == torch.float32 and layer.exact and not getattr(layer, "stochastic_inverse", 0):
        ref = layer.double()
        torch.manual_seed(1)
        ref_outs = run_both_directions(ref, x.double())
        # a non-bijective layer's generative direction draws (signs, orders, pieces)
        for o, r in list(zip(outs, ref_outs))[: 4 if layer.bijective else 2]:
            torch.testing.assert_close(o.double(), r, atol=2e-3, rtol=2e-3)


def _plain_tensors(module):
    """``(path, tensor)`` for tensors held in plain attributes (not parameters or buffers,
    so ``.to()`` would not move them), caches excepted."""
    found = []
    for prefix, m in module.named_modules():
        for key, value in vars(m).items():
            if key in ("_pair", "_params", "_parameters", "_buffers", "_modules") or (
                    key == "context" and isinstance(m, pfe.core.ConditionedLayer)):
                continue  # caches, and a conditioned view's context (the caller's tensor)
            values = value if isinstance(value, (tuple, list)) else (value,)
            for v in values:
                if isinstance(v, torch.Tensor) and not isinstance(v, torch.nn.Parameter):
                    found.append((f"{prefix}.{key}".lstrip("."), v))
    return found


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_to_moves_every_tensor(name):
    """After calls in both modes, ``.to(float64)`` leaves no float32 tensor behind (a plain
    tensor attribute would stay on the CPU under ``.to('cuda')``)."""
    layer, x = build(name)
    for training in (True, False):
        layer.train(training)
        run_both_directions(layer, x)
    layer.to(torch.float64)
    stale = [path for path, t in _plain_tensors(layer) if t.dtype == torch.float32]
    assert not stale, f"tensors not moved by .to(): {stale}"


@pytest.mark.parametrize("name", ["realnvp", "nsf", "maf", "iaf", "residual_flow", "abs_flow",
                                  "rad_flow", "ffjord", "ot_flow"])
def test_builders_on_the_detector_in_both_dtypes(name):
    """Every vector builder: a short training step and a sample under the detector, and the
    same flow in float64."""
    torch.manual_seed(0)
    flow = pfe.flows.FLOWS[name](2, **TINY[name])
    x = pfe.datasets.toy("moons", 64, 0)
    flow.log_prob(x)  # data-dependent initialisation (runs on the training data, once)
    with torch.device("meta"), DeviceLeakDetector("meta"):
        (-flow.log_prob(x).mean()).backward()
        flow.eval()
        with torch.no_grad():
            sample = flow.sample((4,))
    assert sample.device.type == "cpu"
    flow.double()
    lp = flow.log_prob(x.double())
    assert lp.dtype == torch.float64 and torch.isfinite(lp).all()
