import pytest
import torch

import pyro_flows_ext as pfe
from pyro_flows_ext.infer.density import mean_nll
from pyro_flows_ext.nn import MADE
from pyro_flows_ext.transforms import MaskedAutoregressive

from .contract import assert_fit_beats_gaussian, check_bijection, perturb
from .densities import assert_nll_not_below_entropy, moons_log_prob

ORDER = [2, 0, 3, 1]
LAYERS = {
    "maf-affine": (lambda: MaskedAutoregressive(3, hidden_dims=(8,)), (3,)),
    "iaf-affine": (lambda: MaskedAutoregressive(3, inverse=True, hidden_dims=(8,)), (3,)),
    "maf-spline": (lambda: MaskedAutoregressive(3, kind="spline", hidden_dims=(8,),
                                                count_bins=4), (3,)),
    "iaf-spline-order": (lambda: MaskedAutoregressive(4, kind="spline", inverse=True,
                                                      hidden_dims=(8, 8), count_bins=3,
                                                      order=ORDER), (4,)),
    "maf-1d": (lambda: MaskedAutoregressive(1, hidden_dims=(4,)), (1,)),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_contract(name, dtype):
    make, event_shape = LAYERS[name]
    check_bijection(perturb(make()), event_shape, dtype=dtype)


def jacobian(fn, y):
    return torch.autograd.functional.jacobian(fn, y)


@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("kind", ["affine", "spline"])
def test_jacobian_triangular_in_made_order(kind, inverse):
    layer = perturb(MaskedAutoregressive(4, kind=kind, inverse=inverse, hidden_dims=(16, 16),
                                         order=ORDER)).double()
    y = torch.randn(4, dtype=torch.float64)
    rank = torch.empty(4, dtype=torch.long)
    rank[torch.tensor(ORDER)] = torch.arange(4)
    later = rank[:, None] < rank[None, :]  # (i, j): output i may not depend on later input j
    for fn in (lambda e: layer.call_and_ladj(e)[0], lambda e: layer.inverse_and_ladj(e)[0]):
        jac = jacobian(fn, y)
        assert (jac[later] == 0).all()
        assert (jac.diagonal() != 0).all()
        assert not (jac[~later & ~torch.eye(4, dtype=torch.bool)] == 0).all()  # not diagonal


def test_made_output_depends_only_on_earlier_variables_and_context():
    made = perturb(MADE(5, 3, hidden_dims=(20, 20), context_dim=2, order=[4, 1, 0, 3, 2]))
    xs, c = torch.randn(8, 5), torch.randn(2)
    # summed over a few points: a ReLU path may be dead at any single one
    jac_x = sum(jacobian(lambda e: made(e, c), x).abs() for x in xs)  # (5, 3, 5)
    jac_c = sum(jacobian(lambda e, x=x: made(x, e), c).abs() for x in xs)
    rank = torch.empty(5, dtype=torch.long)
    rank[torch.tensor([4, 1, 0, 3, 2])] = torch.arange(5)
    allowed = rank[:, None] > rank[None, :]
    assert (jac_x.abs().sum(1)[~allowed] == 0).all()
    assert (jac_x.abs().sum(1)[allowed] > 0).all()
    assert (jac_c.abs() > 0).all()  # every output sees the context


@pytest.mark.parametrize("kind", ["affine", "spline"])
def test_maf_and_iaf_agree_as_inverses(kind):
    maf = perturb(MaskedAutoregressive(3, kind=kind, hidden_dims=(16,))).double()
    iaf = MaskedAutoregressive(3, kind=kind, inverse=True, hidden_dims=(16,)).double()
    iaf.load_state_dict(maf.state_dict())
    x = 2 * torch.randn(10, 3, dtype=torch.float64)
    # the IAF's generative map is the MAF's scoring map run backwards: same element maps,
    # conditioner reading the other side
    z_maf, v_maf = maf.inverse_and_ladj(x)  # one pass
    x_iaf, l_iaf = iaf.call_and_ladj(x)  # one pass: tau(x; theta(x))
    x_back, l_back = maf.call_and_ladj(z_maf)  # D passes
    torch.testing.assert_close(x_back, x)
    torch.testing.assert_close(l_back, -v_maf)
    z_iaf, v_iaf = iaf.inverse_and_ladj(x_iaf)  # D passes
    torch.testing.assert_close(z_iaf, x)
    torch.testing.assert_close(v_iaf, -l_iaf)
    # an IAF with an inverted element map is the MAF's inverse: compare with Pyro-free maths
    theta = maf.made(x)
    expected, _ = maf._tau(x, theta, forward=False)
    torch.testing.assert_close(z_maf, expected)


@pytest.mark.parametrize("inverse", [False, True])
def test_conditional_jacobian_per_context(inverse):
    layer = perturb(MaskedAutoregressive(3, kind="spline", inverse=inverse, hidden_dims=(8,),
                                         count_bins=4, context_dim=2)).double()
    contexts = torch.randn(3, 2, dtype=torch.float64)
    outs = []
    for c in contexts:
        check_bijection(layer.condition(c), (3,))
        outs.append(layer.condition(c).call_and_ladj(torch.ones(3, dtype=torch.float64))[0])
    assert not torch.allclose(outs[0], outs[1])  # the context matters
    # a batch of contexts broadcast against (sample, batch, event) inputs
    flow = pfe.flows.maf(3, num_layers=2, hidden_dims=(8,), context_dim=2).double()
    cond = flow.condition(contexts)
    x = cond.rsample((5,))
    assert x.shape == (5, 3, 3) and cond.log_prob(x).shape == (5, 3)


def test_layers_start_at_identity():
    z = torch.randn(20, 3)
    for layer in (MaskedAutoregressive(3), MaskedAutoregressive(3, kind="spline", inverse=True)):
        x, ladj = layer.call_and_ladj(z)
        torch.testing.assert_close(x, z)
        torch.testing.assert_close(ladj, torch.zeros(20), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["maf", "iaf"])
def test_fits_moons_beyond_a_gaussian(name):
    assert_fit_beats_gaussian(pfe.flows.FLOWS[name](2, num_layers=4, hidden_dims=(32, 32)))


@pytest.mark.slow
def test_spline_maf_reaches_good_nll_on_moons():
    train, test = pfe.datasets.toy("moons", 20000, 0), pfe.datasets.toy("moons", 5000, 1)
    flow = pfe.flows.maf(2, kind="spline")
    pfe.infer.fit_density(flow, train, num_steps=3000, progress=False)
    assert mean_nll(flow, test) < 1.80  # true entropy about 1.676
    assert_nll_not_below_entropy(flow, test, moons_log_prob)  # and not below it
