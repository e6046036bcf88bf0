"""Element maps: each exists once and works in every scheme, including a user's own map."""

import pytest
import torch

import pyro_flows_ext as pfe
from pyro_flows_ext.transforms import (
    Affine,
    AffineCoupling,
    Coupling,
    ElementMap,
    MaskedAutoregressive,
    RationalQuadratic,
    SplineCoupling,
)

from .contract import check_bijection, perturb


class Sigmoidal(ElementMap):
    """The README's example: y = u + a tanh(u) with a = 0.9 tanh(r), strictly increasing
    (dy/du >= 0.1); the inverse brackets the root (|y - u| < 1), bisects, and takes one
    Newton step with gradients (implicit differentiation) at the end."""

    num_params = 1
    closed_form_inverse = False

    def forward(self, u, theta):
        a = 0.9 * torch.tanh(theta[..., 0])
        return u + a * torch.tanh(u), torch.log1p(a / torch.cosh(u) ** 2)

    def inverse(self, y, theta):
        with torch.no_grad():
            lo, hi = y - 1, y + 1
            for _ in range(60):
                mid = (lo + hi) / 2
                above = self.forward(mid, theta)[0] > y
                lo, hi = torch.where(above, lo, mid), torch.where(above, mid, hi)
        u = (lo + hi) / 2
        fu, lad = self.forward(u, theta)
        u = u - (fu - y) / lad.exp()
        return u, -self.forward(u, theta)[1]


MAPS = {"affine": lambda: Affine(clamp=3.0), "spline": lambda: RationalQuadratic(6, 2.0),
        "sigmoidal": Sigmoidal}


@pytest.mark.parametrize("name", MAPS)
def test_map_inverts_and_log_derivative_matches_autograd(name):
    emap = MAPS[name]().double()
    u = 3 * torch.randn(50, 3, dtype=torch.float64)  # inside and outside a spline's box
    theta = torch.randn(50, 3, emap.num_params, dtype=torch.float64)
    y, lad = emap.forward(u, theta)
    back, v = emap.inverse(y, theta)
    torch.testing.assert_close(back, u)
    torch.testing.assert_close(v, -lad)
    grad = torch.autograd.grad(emap.forward(u.requires_grad_(), theta)[0].sum(), u)[0]
    torch.testing.assert_close(lad, grad.log())  # element-wise: dy_i/du_i > 0


def test_zero_parameters_are_the_identity():
    for make in MAPS.values():
        emap = make()
        u = torch.randn(10, 4)
        y, lad = emap.forward(u, torch.zeros(10, 4, emap.num_params))
        torch.testing.assert_close(y, u)
        torch.testing.assert_close(lad, torch.zeros_like(u))


@pytest.mark.parametrize("name", MAPS)
@pytest.mark.parametrize("scheme", ["coupling", "coupling-inverted", "maf", "iaf"])
def test_every_map_in_every_scheme_passes_the_contract(name, scheme):
    emap = MAPS[name]()
    layer = {"coupling": lambda: Coupling(4, emap, hidden_dims=(8,)),
             "coupling-inverted": lambda: Coupling(4, emap, hidden_dims=(8,), invert=True),
             "maf": lambda: MaskedAutoregressive(3, emap, hidden_dims=(8,)),
             "iaf": lambda: MaskedAutoregressive(3, emap, inverse=True, hidden_dims=(8,)),
             }[scheme]()
    check_bijection(perturb(layer, 0.2), (layer.dim,))


def test_aliases_build_the_same_maps():
    affine, spline = AffineCoupling(4, clamp=2.0), SplineCoupling(4, count_bins=5, bound=2.5)
    assert isinstance(affine.element_map, Affine) and affine.clamp == 2.0
    assert isinstance(spline.element_map, RationalQuadratic) and spline.bound == 2.5
    assert spline.element_map.bins == 5 and spline.invert  # data-to-base spline by default
    assert not SplineCoupling(4, inverse=True).invert
    maf = MaskedAutoregressive(3, kind="spline", count_bins=4)
    assert maf.kind == "spline" and maf.element_map.bins == 4
    assert MaskedAutoregressive(3).kind == "affine"
    with pytest.raises(ValueError, match="element_map must be"):
        MaskedAutoregressive(3, "sigmoid")


def test_same_parameters_same_function_as_the_alias():
    # Coupling(dim, Affine) with AffineCoupling's weights is the same map, value and log-det
    a = perturb(AffineCoupling(4, hidden_dims=(8,)))
    b = Coupling(4, Affine(), hidden_dims=(8,))
    b.load_state_dict(a.state_dict())
    z = torch.randn(6, 4)
    for u, v in zip(a.call_and_ladj(z), b.call_and_ladj(z)):
        torch.testing.assert_close(u, v)


def test_user_map_fits_a_density_in_both_schemes():
    # a flow built from the user's map is a normalised density (1-D grid along a 2-D slice is
    # not enough: integrate the full 2-D density on a grid)
    for layers in ([Coupling(2, Sigmoidal(), hidden_dims=(8,)),
                    Coupling(2, Sigmoidal(), hidden_dims=(8,), mask=[False, True])],
                   [MaskedAutoregressive(2, Sigmoidal(), hidden_dims=(8,))]):
        flow = pfe.Flow(None, [perturb(t, 0.3) for t in layers]).double()
        axis = torch.linspace(-9, 9, 361, dtype=torch.float64)
        grid = torch.cartesian_prod(axis, axis)
        with torch.no_grad():
            mass = flow.log_prob(grid).exp().sum() * (axis[1] - axis[0]) ** 2
        assert abs(mass.item() - 1) < 0.02


def test_spline_tables_are_module_buffers_not_global_caches():
    import pyro_flows_ext.transforms._rqs as rqs

    assert not [name for name, v in vars(rqs).items() if isinstance(v, dict)
                and not name.startswith("__")]
    layer = SplineCoupling(4)
    assert "element_map.table_m" not in layer.state_dict()  # derived, not saved
    with torch.inference_mode():  # a first call under inference mode ...
        layer.inverse_and_ladj(torch.randn(3, 4))
    x = torch.randn(3, 4)
    layer.inverse_and_ladj(x)[1].sum().backward()  # ... does not poison training
    assert layer.net.flat.grad is not None
    double = SplineCoupling(4).double()
    assert double.element_map.table_m.dtype == torch.float64
    exact = rqs.table_map(8, 3.0)[0]
    assert torch.equal(double.float().double().element_map.table_m, exact)  # nothing lost
