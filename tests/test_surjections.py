"""SurVAE surjections and RAD: exactness against closed forms and grid/Monte-Carlo integrals,
bounds against a known marginal, shapes, caches, gradients, copies, guides and builders."""

import copy
import io
import math

import pyro
import pyro.distributions as dist
import pytest
import torch

import pyro_flows_ext as pfe
from pyro_flows_ext.core import Surjection
from pyro_flows_ext.surjections import (
    RAD,
    Abs,
    Augment,
    HalfNormalMap,
    MaxPool2d,
    Ordered,
    OrderStatistics,
    Slice,
    Sort,
)
from pyro_flows_ext.transforms import AffineCoupling, Exp

from .contract import check_bijection, perturb

F64 = torch.float64


def normal_base(shape, batch=(), dtype=F64):
    loc = torch.zeros(*batch, *shape, dtype=dtype)
    return dist.Normal(loc, torch.ones_like(loc)).to_event(len(shape))


# -- the reusable check ---------------------------------------------------------------------

def check_surjection(layers, base_shape, data_shape, dtype=F64, base=None):
    """Checks a flow ``base -> layers`` whose last layer is a surjection: shapes and event
    dims, ``(sample, batch, event)`` shapes with a batched base, sample -> score through the
    pair cache, the generative and inference directions agreeing (exact layers: scoring a
    copy of a sample gives the sample's own log-density; bound layers: a new draw), the
    unseen-pair closed form, a clear error for a wrong event, gradients on every parameter,
    and deepcopy/``torch.save`` after sampling."""
    layer = layers[-1]
    assert isinstance(layer, Surjection) and not layer.bijective
    flow = pfe.Flow(base or normal_base(base_shape, dtype=dtype), layers).to(dtype)
    assert tuple(flow.event_shape) == tuple(data_shape)
    assert tuple(layer.forward_shape(torch.Size((3, *base_shape)))) == (3, *data_shape)
    assert tuple(layer.inverse_shape(torch.Size((3, *data_shape)))) == (3, *base_shape)

    # (sample, batch, event) with a batched base
    batched = pfe.Flow(normal_base(base_shape, (4,), dtype), layers)
    x = batched.sample((5,))
    assert x.shape == (5, 4, *data_shape) and x.dtype == dtype
    assert batched.log_prob(x).shape == (5, 4)
    assert flow.log_prob(x).shape == (5, 4)  # an unbatched flow broadcasts over the batch

    # sample -> score reuses the pair; a copy is scored through the inverse
    x, lp = flow.sample_and_log_prob((6, 3))
    assert x.shape == (6, 3, *data_shape) and lp.shape == (6, 3)
    torch.testing.assert_close(flow.log_prob(x), lp)
    again = flow.log_prob(x.detach().clone())
    if flow.is_exact:
        torch.testing.assert_close(again, lp.detach(), atol=1e-8, rtol=1e-6)
    else:
        assert not torch.allclose(again, lp.detach())  # e was drawn again
        copy_ = x.detach().clone()
        torch.testing.assert_close(flow.log_prob(copy_), flow.log_prob(copy_))  # same draw

    # the closed-form V of a pair the layer did not make
    xd = x.detach().clone()
    zd, vd = layer.inverse_and_ladj(xd)
    layer.clear_cache()
    torch.testing.assert_close(-layer.log_abs_det_jacobian(zd, xd), vd, atol=1e-8, rtol=1e-6)

    # a wrong event is a clear error in both directions
    k = layer.event_dim  # the size checked: features for vectors, channels for images
    for shape, call in ((data_shape, layer.inv), (base_shape, layer)):
        bad = list(shape)
        bad[-k] += 1
        with pytest.raises(ValueError, match="expects events"):
            call(torch.zeros(2, *bad, dtype=dtype))

    # gradients reach every parameter, from scoring data and from sampling
    params = dict(flow.named_parameters())
    for what in ("score", "sample") if params else ():
        flow.zero_grad()
        if what == "score":
            loss = -flow.log_prob(x.detach().clone()).mean()
        else:
            s, lp = flow.sample_and_log_prob((64,))
            loss = lp.mean() + s.square().mean()
        loss.backward()
        for name, p in params.items():
            assert p.grad is not None, f"{what}: no gradient reaches {name}"
            assert torch.isfinite(p.grad).all(), f"{what}: non-finite gradient for {name}"
            if what == "score":
                assert p.grad.abs().sum() > 0, f"score: zero gradient for {name}"

    # deepcopy and torch.save after sampling (with a graph in the caches)
    s = flow.rsample((5,))
    flow.log_prob(s).sum()
    clone = copy.deepcopy(flow)
    buf = io.BytesIO()
    torch.save(flow, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    fresh = s.detach().clone()
    for other in (clone, loaded):
        torch.manual_seed(1)
        mine = flow.log_prob(fresh.clone())
        torch.manual_seed(1)
        torch.testing.assert_close(other.log_prob(fresh.clone()), mine)
    return flow


def perturbed(*layers, scale=0.3):
    for layer in layers:
        perturb(layer, scale)
    return list(layers)


CASES = {
    "abs": lambda: ([HalfNormalMap(3)] + perturbed(Abs(3)), (3,), (3,)),
    "abs-uniform": lambda: ([Exp(3), Abs(3, learn_signs=False)], (3,), (3,)),
    "slice": lambda: (perturbed(Slice(3, 2)), (2,), (3,)),
    "augment": lambda: (perturbed(Augment(3, 2)), (5,), (3,)),
    "sort": lambda: ([Ordered(4), Sort(4)], (4,), (4,)),
    "maxpool": lambda: (perturbed(MaxPool2d(2)), (2, 2, 3), (2, 4, 6)),
    "maxpool-simple": lambda: (perturbed(MaxPool2d(2, simple=True)), (2, 2, 3), (2, 4, 6)),
    "rad": lambda: (perturbed(RAD(3)), (3,), (3,)),
    "rad-5": lambda: (perturbed(RAD(2, num_pieces=5)), (2,), (2,)),
}


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_surjection_contract(name, dtype):
    layers, base_shape, data_shape = CASES[name]()
    if dtype == torch.float32:
        layers = [t.float() for t in layers]
        flow = pfe.Flow(normal_base(base_shape, dtype=dtype), layers)
        x, lp = flow.sample_and_log_prob((50,))
        assert x.dtype == lp.dtype == torch.float32
        if flow.is_exact:  # float32 paths agree with the float64 copy
            ref = copy.deepcopy(flow).double()
            torch.testing.assert_close(flow.log_prob(x.clone()).double(),
                                       ref.log_prob(x.detach().double()), atol=2e-4, rtol=2e-4)
        return
    check_surjection(layers, base_shape, data_shape, dtype)


@pytest.mark.parametrize("name", ["abs", "abs-uniform", "sort", "slice", "maxpool", "rad"])
def test_flags(name):
    layers, _, _ = CASES[name]()
    assert layers[-1].exact and not layers[-1].bijective
    assert not Augment(2).exact and Augment.stochastic_inverse


def test_base_side_bijections_match_autograd():
    check_bijection(HalfNormalMap(3), (3,))
    check_bijection(Ordered(4), (4,))


# -- exact layers against closed forms ------------------------------------------------------

@pytest.mark.parametrize("learn_signs", [True, False])
def test_exp_then_abs_is_the_closed_form(learn_signs):
    flow = pfe.Flow(None, [Exp(3), Abs(3, learn_signs=learn_signs)]).double()
    x = 3 * torch.randn(200, 3, dtype=F64)
    r = x.abs()
    expected = (dist.Normal(0.0, 1.0).log_prob(r.log()) - r.log() - math.log(2)).sum(-1)
    torch.testing.assert_close(flow.log_prob(x), expected, atol=1e-12, rtol=0)


def test_half_normal_map_and_uniform_abs_is_a_standard_normal():
    flow = pfe.Flow(None, [HalfNormalMap(2), Abs(2)]).double()
    x = 4 * torch.randn(500, 2, dtype=F64)
    expected = dist.Normal(0.0, 1.0).log_prob(x).sum(-1)
    torch.testing.assert_close(flow.log_prob(x), expected, atol=1e-9, rtol=0)
    # draws are standard normal: mean 0, variance 1 within 5 standard errors
    s = flow.sample((40000,))
    assert s.mean(0).abs().max() < 5 / math.sqrt(40000)
    assert (s.var(0) - 1).abs().max() < 5 * math.sqrt(2 / 40000)


def test_abs_and_sort_samples_take_every_sign_and_order():
    s = pfe.Flow(None, [HalfNormalMap(2), Abs(2)]).sample((400,))
    quadrants = {(a, b) for a, b in (s > 0).tolist()}
    assert quadrants == {(False, False), (False, True), (True, False), (True, True)}
    x = pfe.Flow(OrderStatistics(3), [Sort(3)]).sample((600,))
    orders = {tuple(o) for o in x.argsort(-1).tolist()}
    assert len(orders) == 6


def test_sort_over_order_statistics_is_iid_normal():
    flow = pfe.Flow(OrderStatistics(5, loc=torch.zeros(5, dtype=F64)), [Sort(5)])
    x = torch.randn(300, 5, dtype=F64)
    torch.testing.assert_close(flow.log_prob(x), dist.Normal(0.0, 1.0).log_prob(x).sum(-1),
                               atol=1e-12, rtol=0)
    # the base alone is the order-statistics density: -inf off the sorted cone
    base = OrderStatistics(3)
    assert base.log_prob(torch.tensor([0.0, -1.0, 1.0])) == -math.inf
    assert base.sample((7,)).diff(dim=-1).min() >= 0


def test_abs_sign_model_learns_correlated_signs():
    # signs equal in both coordinates: only an autoregressive sign model can say so
    g = torch.Generator().manual_seed(0)
    r = torch.randn(2000, 2, generator=g).abs() + 0.5
    s = torch.where(torch.rand(2000, 1, generator=g) < 0.5, 1.0, -1.0)
    data = r * s
    flow = pfe.Flow(None, [HalfNormalMap(2), Abs(2)])
    opt = torch.optim.Adam(flow.parameters(), lr=1e-2)
    for _ in range(150):
        loss = -flow.log_prob(data[torch.randint(0, 2000, (256,))]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        x = flow.sample((2000,))
    same = ((x[:, 0] > 0) == (x[:, 1] > 0)).double().mean().item()
    assert same > 0.9  # uniform signs: 0.5


# -- exact layers integrate to 1 -------------------------------------------------------------

def grid_mass(flow, half=8.0, n=801):
    axis = torch.linspace(-half, half, n, dtype=F64)
    # the second axis shifted by a third of a step: no grid point has x_1 = x_2 (ties)
    grid = torch.stack(torch.meshgrid(axis, axis + (axis[1] - axis[0]) / 3, indexing="ij"),
                       -1).reshape(-1, 2)
    with torch.no_grad():
        lp = torch.cat([flow.log_prob(part) for part in grid.split(100_000)])
    assert torch.isfinite(lp).all()
    return lp.exp().sum().item() * (axis[1] - axis[0]).item() ** 2


MASS_CASES = {
    "abs": lambda: [perturb(AffineCoupling(2, hidden_dims=(8, 8)), 0.2), HalfNormalMap(2),
                    perturb(Abs(2), 0.5)],
    "slice": lambda: [perturb(Slice(2, 1), 0.15),
                      perturb(AffineCoupling(2, hidden_dims=(8, 8)), 0.2)],
    "rad": lambda: [perturb(AffineCoupling(2, hidden_dims=(8, 8)), 0.2), perturb(RAD(2), 0.3)],
    "sort": lambda: [perturb(AffineCoupling(2, hidden_dims=(8, 8)), 0.2), Ordered(2), Sort(2)],
}


@pytest.mark.parametrize("name", sorted(MASS_CASES))
def test_exact_flows_integrate_to_one_on_a_grid(name):
    flow = pfe.Flow(None, MASS_CASES[name]()).double().eval()
    assert flow.is_exact
    with torch.no_grad():
        x = flow.sample((20000,))
    outside = (x.abs() > 8).any(-1).double().mean().item()
    assert outside < 1e-3
    # the perturbed flow is far from a standard normal (the check is not trivially met)
    assert (flow.log_prob(x) - dist.Normal(0.0, 1.0).log_prob(x).sum(-1)).abs().mean() > 0.05
    assert abs(grid_mass(flow) + outside - 1.0) < 0.01


@pytest.mark.parametrize("simple", [False, True], ids=["learned", "simple"])
def test_maxpool_integrates_to_one(simple):
    """A 1x2x2 image: the integral over R^4 by importance sampling from a Student-t (an
    independent computation), and E_model[1_B(x) / p(x)] = vol(B) on a box (the sampler and
    the density agree)."""
    layer = perturb(MaxPool2d(1, simple=simple), 0.1)
    flow = pfe.Flow(normal_base((1, 1, 1)), [layer]).double().eval()
    torch.manual_seed(0)
    n = 200_000
    q = dist.StudentT(3.0, torch.zeros(1, 2, 2, dtype=F64), 1.5).to_event(3)
    with torch.no_grad():
        y = q.sample((n,))
        w = (flow.log_prob(y) - q.log_prob(y)).exp()
        mass, se = w.mean().item(), w.std().item() / math.sqrt(n)
        assert se < 0.025 and abs(mass - 1) < 4 * se
        ties = y.clone()
        ties[..., 0, 1] = ties[..., 0, 0]  # equal entries: density 0 (learned) or finite
        assert not torch.isnan(flow.log_prob(ties[:100])).any()
        x = flow.sample((n,))
        inside = (x.abs() < 1).flatten(1).all(-1)
        r = torch.where(inside, (-flow.log_prob(x)).exp(), torch.zeros(()))
        vol, vse = r.mean().item(), r.std().item() / math.sqrt(n)
        assert vse < 0.05 * 16 and abs(vol - 16.0) < 4 * vse


# -- the bound layer against a known marginal ------------------------------------------------

def test_augment_is_a_lower_bound_that_iw_tightens():
    """Base N(0, I_{D+A}), so the marginal of x is N(0, I_D) exactly. With a learned Gaussian
    q(e|x) the single-draw gap is -E KL(q(e|x) || N(0, I)), computed in closed form from q's
    parameters; the importance-weighted bound rises towards the marginal as K grows."""
    d, a = 2, 2
    layer = perturb(Augment(d, a, hidden_dims=(16, 16)), 0.15)
    flow = pfe.Flow(None, [layer]).double()
    x = torch.randn(4000, d, dtype=F64)
    exact = dist.Normal(0.0, 1.0).log_prob(x).sum(-1)
    with torch.no_grad():
        loc, log_scale = layer.density.params(x)
        kl = (0.5 * (loc.square() + (2 * log_scale).exp() - 1) - log_scale).sum(-1)
        gap1 = flow.log_prob(x) - exact
        gaps = {k: (pfe.infer.iw_log_prob(flow, x, num_samples=k) - exact) for k in (10, 100)}
        gaps[1000] = pfe.infer.iw_log_prob(flow, x[:500], num_samples=1000, chunk_size=300) \
            - exact[:500]
    assert kl.mean() > 0.1  # q is far enough from N(0, I) for the gap to show
    se = (gap1 + kl).std().item() / math.sqrt(len(x))
    assert abs((gap1 + kl).mean().item()) < 4 * se
    means = [gap1.mean().item()] + [gaps[k].mean().item() for k in (10, 100, 1000)]
    assert means[0] < means[1] < means[2] < 1e-3  # below the marginal and tightening
    assert abs(means[3]) < 0.1 * abs(means[0])
    assert (gap1 <= 1e-12).float().mean() < 1  # single draws scatter on both sides of the mean


def test_untrained_augment_with_standard_normal_q_is_exact():
    flow = pfe.Flow(None, [Augment(3, 2)]).double()
    x = torch.randn(50, 3, dtype=F64)
    torch.testing.assert_close(flow.log_prob(x), dist.Normal(0.0, 1.0).log_prob(x).sum(-1))


def test_iw_log_prob_combines_chunks_exactly_and_passes_exact_flows_through():
    class Counter:
        is_exact, event_shape = False, torch.Size([1])

        def __init__(self):
            self.n = 0

        def log_prob(self, value):
            k = value.shape[0]
            out = torch.arange(self.n, self.n + k, dtype=F64)[:, None].expand(value.shape[:-1])
            self.n += k
            return out

    x = torch.zeros(3, 1, dtype=F64)
    expected = torch.logsumexp(torch.arange(7, dtype=F64), 0) - math.log(7)
    for chunk in (None, 1, 3, 7):
        got = pfe.infer.iw_log_prob(Counter(), x, num_samples=7, chunk_size=chunk)
        torch.testing.assert_close(got, expected.expand(3))
    exact = pfe.Flow(None, [Exp(2), Abs(2)])
    y = torch.randn(4, 2)
    torch.testing.assert_close(pfe.infer.iw_log_prob(exact, y, 10), exact.log_prob(y))
    with pytest.raises(ValueError, match="num_samples"):
        pfe.infer.iw_log_prob(exact, y, 0)


# -- conditional densities and contexts ------------------------------------------------------

def test_slice_and_augment_take_a_conditional_flow_density():
    inner = pfe.flows.nsf(1, num_layers=2, hidden_dims=(8, 8), context_dim=2,
                          gaussian_start=False)
    layer = Slice(3, 2, density=inner)
    flow = pfe.Flow(None, [layer]).double()
    assert flow.is_exact
    x, lp = flow.sample_and_log_prob((10,))
    torch.testing.assert_close(flow.log_prob(x.clone()), lp)
    aug = Augment(2, 1, density=pfe.flows.nsf(1, num_layers=2, hidden_dims=(8, 8), context_dim=2,
                                              gaussian_start=False))
    f2 = pfe.Flow(None, [aug])
    assert not f2.is_exact and f2.log_prob(torch.randn(6, 2)).shape == (6,)
    with pytest.raises(ValueError, match="event shape"):
        Slice(3, 1, density=inner)


@pytest.mark.parametrize("make", [lambda: Abs(2, context_dim=3),
                                  lambda: Slice(3, 2, context_dim=3),
                                  lambda: Augment(2, 1, context_dim=3),
                                  lambda: RAD(2, context_dim=3)],
                         ids=["abs", "slice", "augment", "rad"])
def test_conditional_layers_broadcast_contexts(make):
    layer = perturb(make(), 0.3)
    first = [HalfNormalMap(2)] if isinstance(layer, Abs) else []
    flow = pfe.Flow(None, first + [layer])
    c = torch.randn(4, 3)
    conditioned = flow.condition(c)
    x, lp = conditioned.sample_and_log_prob((5,))
    assert lp.shape == (5, 4) and x.shape == (5, 4, *flow.event_shape)
    torch.testing.assert_close(conditioned.log_prob(x), lp)
    one = torch.randn(*flow.event_shape)
    assert conditioned.log_prob(one).shape == (4,)  # one event against many contexts
    if layer.exact:
        torch.testing.assert_close(conditioned.log_prob(x.detach().clone()), lp.detach(),
                                   atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="context"):
        flow.log_prob(x.detach())


# -- in guides: the auxiliary-variable bound -------------------------------------------------

D, A, N_OBS = 2, 2, 5


def conjugate(data):
    z = pyro.sample("z", dist.Normal(torch.zeros(D), 1.0).to_event(1))
    with pyro.plate("n", N_OBS):
        pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=data)


def log_evidence(data):
    cov = torch.eye(N_OBS) + torch.ones(N_OBS, N_OBS)  # x_{.,d} ~ N(0, I + 11^T) per dim
    return dist.MultivariateNormal(torch.zeros(N_OBS), cov).log_prob(data.T).sum().item()


def elbo(guide, data, m=20000):
    """Mean and standard error of log p(data, z) - log q(z) over the guide's own draws, each
    scored through its cached pair (what Trace_ELBO does)."""
    with torch.no_grad():
        z, log_q = guide.flow.sample_and_log_prob((m,))
        log_joint = (dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
                     + dist.Normal(z[:, None, :], 1.0).log_prob(data).sum((-1, -2)))
        e = log_joint - log_q
    return e.mean().item(), e.std().item() / math.sqrt(m)


def test_augmented_guide_elbo_is_a_lower_bound_and_trains_to_the_evidence():
    data = torch.randn(N_OBS, D) + 1.0
    log_z = log_evidence(data)
    guide = pfe.infer.AutoFlowGuide(conjugate, flow=[
        Slice(D + A, D, hidden_dims=(16, 16)), AffineCoupling(D + A, hidden_dims=(16, 16)),
        Augment(D, A, hidden_dims=(16, 16))])
    guide(data)
    assert not guide.flow.is_exact
    for layer in guide.flow.transforms[:3]:
        perturb(layer, 0.2)
    before, se = elbo(guide, data)
    assert before < log_z + 4 * se
    svi = pyro.infer.SVI(conjugate, guide, pyro.optim.Adam({"lr": 1e-2}),
                         pyro.infer.Trace_ELBO(num_particles=4, vectorize_particles=True,
                                               max_plate_nesting=1))
    for _ in range(300):
        svi.step(data)
    after, se = elbo(guide, data)
    assert after < log_z + 4 * se  # still a lower bound
    assert after > log_z - 0.1 and after > before  # and close to the evidence
    # Pyro's own estimate agrees with ours
    loss = pyro.infer.Trace_ELBO(num_particles=5000, vectorize_particles=True,
                                 max_plate_nesting=1).loss(conjugate, guide, data)
    assert abs(-loss - after) < 0.05


def test_guide_with_augment_first():
    # the guide's base is sized by walking the layers back from the latent (D + A here)
    guide = pfe.infer.AutoFlowGuide(conjugate, flow=[AffineCoupling(D + A), Augment(D, A)])
    data = torch.randn(N_OBS, D)
    guide(data)
    assert guide.flow.base_dist.event_shape == (D + A,)
    svi = pyro.infer.SVI(conjugate, guide, pyro.optim.Adam({"lr": 1e-2}), pyro.infer.Trace_ELBO())
    losses = [svi.step(data) for _ in range(30)]
    assert all(math.isfinite(v) for v in losses)


# -- builders --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["abs_flow", "rad_flow"])
def test_builders_save_load_and_fit(name, tmp_path):
    data = 2.0 * torch.randn(3000, 2).sign() + 0.4 * torch.randn(3000, 2)  # four mirrored blobs
    flow = pfe.flows.FLOWS[name](2, num_layers=2, hidden_dims=(16, 16))
    assert flow.is_exact and flow.spec["flow"] == name
    hist = pfe.infer.fit_density(flow, data, num_steps=60, progress=False,
                                 optim=pyro.optim.Adam({"lr": 3e-3}))
    assert hist["best_val_nll"] < hist["val_nll"][0]  # better than the Gaussian start
    pfe.save(flow, tmp_path / "m.pt")
    loaded = pfe.load(tmp_path / "m.pt")
    x = torch.randn(20, 2)
    torch.testing.assert_close(loaded.log_prob(x), flow.log_prob(x))


def test_cli_fit_abs_flow(tmp_path, capsys):
    from pyro_flows_ext.cli import main

    out = tmp_path / "run"
    assert main(["fit", "8gaussians", "--flow", "abs_flow", "--steps", "20", "--n", "2000",
                 "--out", str(out), "--quiet"]) == 0
    assert "test NLL" in capsys.readouterr().out
    flow = pfe.load(out / "model.pt")
    assert flow.spec["flow"] == "abs_flow" and flow.is_exact
