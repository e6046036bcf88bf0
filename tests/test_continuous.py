"""Continuous flows: CNF (both traces, adjoint, augmentation, RNODE, context), OT-Flow and
flow-matching training, each against an independent computation."""

import math

import pyro
import pyro.distributions as dist
import pyro.optim
import pytest
import torch
from torch import nn

import pyro_flows_ext as pfe
from pyro_flows_ext.continuous import CNF, OTFlow, regularization
from pyro_flows_ext.continuous import cnf as cnf_module
from pyro_flows_ext.infer import fit_density, fit_flow_matching
from pyro_flows_ext.infer.density import mean_nll

from .contract import check_bijection, perturb

F64 = torch.float64
TIGHT = dict(rtol=1e-9, atol=1e-9)


class Linear(nn.Module):
    """dy/dt = A y (context ignored)."""

    def __init__(self, A):
        super().__init__()
        self.A = nn.Parameter(A.clone())

    def forward(self, t, y, context=None):
        return y @ self.A.T


def small_cnf(dim=2, **kwargs):
    kwargs.setdefault("hidden_dims", (16, 16))
    layer = CNF(dim, **kwargs).double()
    return perturb(layer, 0.3)


# -- linear dynamics: closed forms ------------------------------------------------------------

@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_linear_dynamics_is_expm_and_trace(trace):
    A = torch.tensor([[0.3, -1.0, 0.2], [0.8, -0.4, 0.1], [0.0, 0.5, 0.2]], dtype=F64)
    T = 0.7
    layer = CNF(3, dynamics=Linear(A), T=T, trace="exact", **TIGHT).double().eval()
    z = torch.randn(5, 3, dtype=F64)
    x, ladj = layer.call_and_ladj(z)
    torch.testing.assert_close(x, z @ torch.linalg.matrix_exp(T * A).T, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(ladj, torch.full((5,), T * A.trace().item(), dtype=F64),
                               rtol=1e-8, atol=1e-8)
    # the state does not depend on the trace estimator; Hutchinson's estimate of tr(A) is
    # eps^T A eps, whose mean over Rademacher probes is tr(A) exactly
    layer.train()
    layer.trace = trace
    xs, ladjs = layer.call_and_ladj(z.expand(4000, 5, 3))
    torch.testing.assert_close(xs[0], x, rtol=1e-9, atol=1e-9)
    se = ladjs.std() / math.sqrt(ladjs.numel())
    assert abs(ladjs.mean() - T * A.trace()) < 4 * se + 1e-9


def test_linear_kinetic_energy_matches_quadrature():
    A = torch.tensor([[0.2, -0.7], [0.9, -0.3]], dtype=F64)
    layer = CNF(2, dynamics=Linear(A), trace="exact", kinetic_weight=1.0, jacobian_weight=1.0,
                **TIGHT).double().train()
    z = torch.randn(6, 2, dtype=F64)
    layer.call_and_ladj(z)
    terms = layer.regularization_terms()
    ts = torch.linspace(0, 1, 2001, dtype=F64)
    vel = torch.stack([z @ torch.linalg.matrix_exp(t * A).T @ A.T for t in ts])  # f(y(t))
    kinetic = torch.trapezoid(vel.square().sum(-1), ts, dim=0).mean()
    torch.testing.assert_close(terms["kinetic"], kinetic, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(terms["jacobian"], A.square().sum(), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(layer.regularization(), kinetic + A.square().sum(),
                               rtol=1e-6, atol=1e-9)
    layer.eval()
    layer.call_and_ladj(z)
    assert layer.regularization_terms() is None and float(layer.regularization()) == 0.0


# -- exact trace, Hutchinson, round trips -----------------------------------------------------

def test_exact_trace_cnf_passes_the_bijection_contract():
    # ladj vs the autograd Jacobian of the whole flow map, round trips, shapes, gradients,
    # deepcopy/save after rsample (float64, perturbed dynamics, eval mode: exact trace)
    check_bijection(small_cnf(hidden_dims=(8, 8), **TIGHT).eval(), (2,))


def test_hutchinson_mean_matches_exact_within_4_se():
    layer = small_cnf(3, rtol=1e-8, atol=1e-8)
    z = torch.randn(3, 3, dtype=F64)
    layer.eval()
    with torch.no_grad():
        _, exact = layer.call_and_ladj(z)
        layer.train()
        _, est = layer.call_and_ladj(z.expand(3000, 3, 3))  # one probe per row
    se = est.std(0) / math.sqrt(len(est))
    assert (se > 1e-4).all()  # the estimator is really noisy: the check has teeth
    assert ((est.mean(0) - exact).abs() < 4 * se).all()


def test_hutchinson_round_trip_and_train_mode_bijection():
    layer = small_cnf(rtol=1e-9, atol=1e-9).train()
    x = torch.randn(7, 2, dtype=F64)
    z, v = layer.inverse_and_ladj(x)
    x2, ladj = layer.call_and_ladj(z)
    torch.testing.assert_close(x2, x, rtol=1e-7, atol=1e-7)


def test_nfe_bounded_noise_drawn_once_per_solve(monkeypatch):
    layer = small_cnf(rtol=1e-6, atol=1e-6)
    x = torch.randn(64, 2, dtype=F64)
    layer.eval()
    layer.inverse_and_ladj(x)
    exact_nfe = layer.nfe_forward
    layer.train()
    layer.inverse_and_ladj(x)
    hutch_nfe = layer.nfe_forward
    assert 8 <= exact_nfe and hutch_nfe <= 1.5 * exact_nfe + 12

    # the same bound fails for a field that redraws its probe at every evaluation
    class Redraw(cnf_module._Field):
        def __call__(self, t, state):
            if self.eps is not None:
                self.eps = torch.randint(0, 2, self.eps.shape).to(self.eps) * 2 - 1
            return super().__call__(t, state)

    monkeypatch.setattr(cnf_module, "_Field", Redraw)
    layer.solver_options = {"max_num_steps": 50}  # 50 steps are already ~300 evaluations
    try:
        layer.inverse_and_ladj(x)
        redraw_nfe = layer.nfe_forward
    except AssertionError:  # torchdiffeq gave up: the step count exploded
        redraw_nfe = math.inf
    assert redraw_nfe > 1.5 * exact_nfe + 12


# -- gradients --------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["train", "eval"])
def test_adjoint_and_direct_gradients_agree(mode):
    direct = small_cnf(rtol=1e-10, atol=1e-10)
    adjoint = CNF(2, hidden_dims=(16, 16), adjoint=True, rtol=1e-10, atol=1e-10).double()
    adjoint.load_state_dict(direct.state_dict())
    x = torch.randn(5, 2, dtype=F64)
    grads = []
    for layer in (direct, adjoint):
        layer.train(mode == "train")
        xi = x.clone().requires_grad_()
        torch.manual_seed(1)  # the same Hutchinson probes
        z, v = layer.inverse_and_ladj(xi)
        loss = (v - 0.5 * z.square().sum(-1)).sum()
        grads.append(torch.autograd.grad(loss, [xi, *layer.parameters()]))
    assert adjoint.nfe_backward > 0 and direct.nfe_backward == direct.nfe_forward
    for a, b in zip(*grads):
        assert b.abs().max() > 0 or a.abs().max() == 0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_eval_mode_parameter_gradients_reach_every_parameter():
    layer = small_cnf(adjoint=True, rtol=1e-6, atol=1e-6).eval()
    flow = pfe.Flow(None, [layer])
    flow.log_prob(torch.randn(4, 2, dtype=F64)).sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert sum(p.grad.abs().sum() for p in layer.parameters()) > 0


# -- OT-Flow ----------------------------------------------------------------------------------

@pytest.mark.parametrize("depth", [2, 3])
def test_otflow_closed_form_gradient_and_trace_match_autograd(depth):
    layer = perturb(OTFlow(3, width=8, depth=depth, context_dim=2).double(), 0.5)
    x, c = torch.randn(6, 3, dtype=F64), torch.randn(6, 2, dtype=F64)
    t = torch.tensor(0.3, dtype=F64, requires_grad=True)
    grad, lap = layer.grad_and_laplacian(x, 0.3, c)
    xs = x.clone().requires_grad_()
    phi = layer.potential(xs, t, c)
    gx, gt = torch.autograd.grad(phi.sum(), [xs, t], create_graph=True)
    hess_tr = sum(torch.autograd.grad(gx[:, i].sum(), xs, retain_graph=True)[0][:, i]
                  for i in range(3))
    torch.testing.assert_close(grad[:, :3], gx, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad[:, 3].sum(), gt, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lap, hess_tr, rtol=1e-10, atol=1e-12)
    # the velocity is -grad_x Phi and its divergence (the trace of the velocity Jacobian,
    # by autograd) is -Laplacian
    v = layer.velocity(0.3, xs, c)
    div = sum(torch.autograd.grad(v[:, i].sum(), xs, retain_graph=True)[0][:, i]
              for i in range(3))
    torch.testing.assert_close(div, -lap, rtol=1e-10, atol=1e-12)


def test_otflow_log_det_matches_jacobian_of_the_rk4_map():
    layer = perturb(OTFlow(2, width=8).double(), 0.5).eval()
    layer.eval_steps = 64  # the integrated trace converges to the discrete map's log-det
    x = torch.randn(4, 2, dtype=F64)
    z, v = layer.inverse_and_ladj(x)
    for i in range(4):
        jac = torch.autograd.functional.jacobian(lambda e: layer.inverse_and_ladj(e[None])[0][0],
                                                 x[i])
        assert abs(torch.linalg.slogdet(jac)[1] - v[i]) < 1e-6
    x2, ladj = layer.call_and_ladj(z)
    torch.testing.assert_close(x2, x, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ladj, -v, rtol=1e-6, atol=1e-6)


def test_otflow_automatic_eval_steps_converge_where_a_fixed_count_does_not():
    torch.manual_seed(0)
    layer = OTFlow(2, width=16).double()
    with torch.no_grad():  # a stiff potential: a large ResNet readout
        layer.w.normal_(0.0, 8.0)
        layer.K0.mul_(3.0)
    layer.eval()
    x = torch.randn(64, 2, dtype=F64)
    layer.eval_steps = 1024
    reference = layer.inverse_and_ladj(x)[1]
    layer.eval_steps = 12  # the earlier fixed default
    fixed_error = (layer.inverse_and_ladj(x)[1] - reference).abs().max()
    layer.eval_steps = None
    auto = layer.inverse_and_ladj(x)[1]
    chosen = layer.eval_steps_used
    assert fixed_error > 0.05  # the case the automatic count is for
    assert (auto - reference).abs().max() < 1e-3
    assert 16 <= chosen <= 1024
    # kept while the parameters are unchanged, chosen again after they change
    layer.inverse_and_ladj(x[:10])
    assert layer.eval_steps_used == chosen and layer.nfe_forward == 4 * chosen
    with torch.no_grad():
        layer.w.mul_(0.01)
    layer.inverse_and_ladj(x)
    assert layer.eval_steps_used < chosen
    # a potential no step count resolves: a warning, not a silent answer
    with torch.no_grad():
        layer.w.normal_(0.0, 400.0)
    layer.eval_tol = 1e-12
    with pytest.warns(RuntimeWarning, match="stiff"):
        layer.inverse_and_ladj(x[:4])


def test_otflow_regularisers_match_quadrature_of_the_potential():
    layer = perturb(OTFlow(2, width=8).double(), 0.5).train()
    layer.num_steps = 32
    x = torch.randn(5, 2, dtype=F64)
    layer.inverse_and_ladj(x)
    terms = layer.regularization_terms()
    # independent: the trajectory's points (solves of k steps of the same size), then
    # autograd derivatives of Phi along it and Simpson's rule
    layer.eval()
    ts = torch.linspace(0, 1, 33, dtype=F64)
    ys = [x]
    for k in range(1, 33):
        layer.eval_steps, layer.T = k, float(ts[k])
        ys.append(layer.inverse_and_ladj(x)[0].detach())
    layer.T = 1.0
    kin, hjb = [], []
    for t, y in zip(ts, ys):
        y = y.clone().requires_grad_()
        tt = t.expand(len(y), 1).clone().requires_grad_()  # one time per row: per-row d/dt
        gx, gt = torch.autograd.grad(layer.potential(y, tt).sum(), [y, tt])
        kin.append(0.5 * gx.square().sum(-1))
        hjb.append((gt[:, 0] - 0.5 * gx.square().sum(-1)).abs())
    simpson = torch.ones(33, dtype=F64)
    simpson[1:-1:2], simpson[2:-1:2] = 4.0, 2.0
    simpson = simpson / (3 * 32)
    kinetic = (simpson @ torch.stack(kin)).mean()
    penalty = (simpson @ torch.stack(hjb)).mean()
    torch.testing.assert_close(terms["transport"], kinetic, rtol=2e-3, atol=1e-6)
    torch.testing.assert_close(terms["hjb"], penalty, rtol=2e-2, atol=1e-4)


# -- builders: normalised densities, save / load ----------------------------------------------

@pytest.mark.parametrize("name", ["ffjord", "ot_flow"])
def test_builder_log_prob_integrates_to_one_on_a_grid(name):
    kwargs = dict(hidden_dims=(16, 16), rtol=1e-6, atol=1e-6) if name == "ffjord" else {}
    flow = pfe.flows.FLOWS[name](2, gaussian_start=False, **kwargs)
    perturb(flow.transforms[0], 0.3 if name == "ffjord" else 0.2)  # draws stay inside |x| < 6
    flow = flow.double().eval()
    axis = torch.linspace(-7, 7, 141, dtype=F64)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        log_p = flow.log_prob(grid)
        base = dist.Normal(torch.zeros(2, dtype=F64), 1.0).to_event(1).log_prob(grid)
    assert (log_p - base).abs().max() > 0.1  # really moved away from the base
    mass = log_p.exp().sum().item() * (axis[1] - axis[0]).item() ** 2
    assert abs(mass - 1.0) < 0.01


def test_save_load_round_trip(tmp_path):
    for flow in (pfe.flows.ffjord(2, hidden_dims=(8, 8)), pfe.flows.ot_flow(2, width=8)):
        perturb(flow.transforms[0], 0.3)
        flow.eval()
        pfe.save(flow, tmp_path / "f.pt")
        loaded = pfe.load(tmp_path / "f.pt").eval()
        x = torch.randn(5, 2)
        with torch.no_grad():
            torch.testing.assert_close(loaded.log_prob(x), flow.log_prob(x))


def test_ot_flow_spec_saved_with_the_old_defaults_rebuilds_them(tmp_path):
    # a spec that lacks the arguments whose defaults changed (8 RK4 steps, weights 1 / 1)
    # rebuilds the flow of those values, not today's defaults
    old = pfe.flows.ot_flow(2, width=8, num_steps=8, transport_weight=1.0, hjb_weight=1.0)
    pfe.save(old, tmp_path / "old.pt")
    record = torch.load(tmp_path / "old.pt", weights_only=False)
    for name in ("num_steps", "transport_weight", "hjb_weight"):
        record["spec"]["kwargs"].pop(name)
    torch.save(record, tmp_path / "old.pt")
    layer = pfe.load(tmp_path / "old.pt").transforms[0]
    assert (layer.num_steps, layer.transport_weight, layer.hjb_weight) == (8, 1.0, 1.0)
    new = pfe.flows.ot_flow(2).transforms[0]
    assert (new.num_steps, new.transport_weight, new.hjb_weight) == (4, 0.01, 0.05)


# -- augmented neural ODE: an Augment-style lower bound -----------------------------------------

def test_augmented_cnf_is_an_unbiased_bound_that_integrates_to_one():
    layer = CNF(1, hidden_dims=(16, 16), augment_dim=1, rtol=1e-6, atol=1e-6).double().eval()
    perturb(layer.dynamics, 0.3)
    perturb(layer.augment, 0.05)  # q(e | x) (its Augment layer) moved off N(0, 1), mildly:
    # a poor proposal keeps the estimate unbiased but makes its variance large
    flow = pfe.Flow(None, [layer])
    assert not flow.is_exact and flow.event_shape == (1,) and flow.base_dist.event_shape == (2,)
    x = flow.sample((6,))
    assert x.shape == (6, 1)
    axis = torch.linspace(-7, 7, 141, dtype=F64)
    K = 64
    with torch.no_grad():
        bounds = flow.log_prob(axis[:, None].expand(K, -1, 1))  # K independent draws per x
    # exp(bound) is unbiased for p(x): the grid integral of its mean is 1 within 4 SE
    weights = bounds.exp() * (axis[1] - axis[0])
    mass, se = weights.mean(0).sum(), weights.std(0).sum() / math.sqrt(K)
    assert abs(mass - 1.0) < 4 * se + 0.005 and se < 0.05
    # a bound: its mean lies below the importance-weighted estimate with all K draws
    iw = torch.logsumexp(bounds, 0) - math.log(K)
    assert (bounds.mean(0) <= iw + 1e-12).all() and (iw - bounds.mean(0)).mean() > 1e-4
    # scoring the same tensor again reuses the draw; a clone draws again
    y = axis[:5, None].clone()
    first = flow.log_prob(y)
    torch.testing.assert_close(flow.log_prob(y), first)
    assert (flow.log_prob(y.clone()) - first).abs().max() > 0


# -- context ----------------------------------------------------------------------------------

def test_conditioned_cnf_log_det_and_context_gradient():
    layer = small_cnf(2, context_dim=3, **TIGHT).eval()
    c = torch.randn(3, dtype=F64, requires_grad=True)
    view = layer.condition(c)
    z = torch.randn(4, 2, dtype=F64)
    x, ladj = view.call_and_ladj(z)
    for i in range(4):
        jac = torch.autograd.functional.jacobian(lambda e: view.call_and_ladj(e[None])[0][0],
                                                 z[i])
        torch.testing.assert_close(ladj[i], torch.linalg.slogdet(jac)[1], rtol=1e-7, atol=1e-8)
    (g,) = torch.autograd.grad(ladj.sum() + x.sum(), c)
    assert torch.isfinite(g).all() and g.abs().max() > 0
    flow = pfe.Flow(None, [layer])
    cs = torch.randn(5, 3, dtype=F64)
    assert flow.condition(cs).log_prob(x[:1].detach()).shape == (5,)
    with pytest.raises(ValueError, match="context"):
        flow.log_prob(x.detach())


# -- training ---------------------------------------------------------------------------------

def moons(n, seed):
    return pfe.datasets.toy("moons", n, seed)


def test_ffjord_trains_with_fit_density():
    flow = pfe.flows.ffjord(2, hidden_dims=(32, 32), rtol=1e-4, atol=1e-4)
    hist = fit_density(flow, moons(2000, 0), num_steps=40, batch_size=256, progress=False,
                       optim=pyro.optim.Adam({"lr": 1e-2}), eval_every=20, val_data=moons(300, 1))
    start = hist["val_nll"][0]  # the Gaussian start
    assert hist["best_step"] > 0 and hist["best_val_nll"] < start - 0.05
    assert hist["best_val_nll"] > 1.6  # not below moons' entropy (1.68 nats)


def test_fit_density_adds_the_layers_penalties(monkeypatch):
    # the RNODE terms of each training solve enter the loss fit_density differentiates
    layer = CNF(2, hidden_dims=(8,), kinetic_weight=0.5, jacobian_weight=0.5, rtol=1e-3,
                atol=1e-3)
    flow = pfe.Flow(None, [layer])
    seen = []
    original = CNF.regularization

    def spy(self):
        value = original(self)
        seen.append((value.requires_grad, float(value)))
        return value

    monkeypatch.setattr(CNF, "regularization", spy)
    hist = fit_density(flow, moons(500, 0), num_steps=3, batch_size=64, progress=False,
                       eval_every=3, val_data=moons(100, 1))
    # zero-initialised dynamics have no kinetic energy at step 0; afterwards the terms are > 0
    assert len(seen) == 3 and all(grad for grad, _ in seen) and seen[0][1] == 0
    assert seen[1][1] > 0 and seen[2][1] > 0 and len(hist["loss"]) == 3
    assert all(math.isfinite(v) for v in hist["loss"])


def test_flow_matching_trains_ffjord():
    flow = pfe.flows.ffjord(2, hidden_dims=(32, 32), rtol=1e-4, atol=1e-4)
    hist = fit_flow_matching(flow, moons(4000, 0), num_steps=300, batch_size=256,
                             progress=False, optim=pyro.optim.Adam({"lr": 5e-3}),
                             val_data=moons(300, 1), eval_every=300)
    assert hist["best_step"] == 300 and hist["loss"][-1] < hist["loss"][0]
    test_nll = mean_nll(flow, moons(500, 2))
    assert 1.6 < test_nll < hist["val_nll"][0] - 0.2
    x = flow.sample((200,))  # sampling by the ODE lands on the data's scale
    assert x.shape == (200, 2) and x.abs().max() < 10


def _gaussian_fields(mu, s, t, x):
    """Marginal CFM field for x0 ~ N(0, I), x1 ~ N(mu, s^2 I): independent coupling (the
    exact minimiser of the loss) and the OT coupling x1 = mu + s x0 (straight lines)."""
    t = t[:, None]
    var = (1 - t) ** 2 + t ** 2 * s ** 2
    independent = mu + (t * s ** 2 - (1 - t)) / var * (x - t * mu)
    ot = mu + (s - 1) * (x - t * mu) / (1 - t + t * s)
    return independent, ot


@pytest.mark.parametrize("coupling", ["independent", "ot"])
def test_flow_matching_learns_the_gaussian_velocity_field(coupling):
    mu, s = torch.tensor([2.0, -1.0]), 0.5
    data = mu + s * torch.randn(8000, 2)
    layer = CNF(2, hidden_dims=(32, 32), rtol=1e-4, atol=1e-4)
    flow = pfe.Flow(None, [layer])
    steps = 800 if coupling == "independent" else 600
    fit_flow_matching(flow, data, num_steps=steps, batch_size=256, progress=False,
                      coupling=coupling, ot_block=64, optim=pyro.optim.Adam({"lr": 3e-3}),
                      val_data=data[:64], eval_every=steps, patience=None)
    t = torch.rand(2000) * 0.9 + 0.05
    x0 = torch.randn(2000, 2)
    x = (1 - t[:, None]) * x0 + t[:, None] * (mu + s * torch.randn(2000, 2))
    with torch.no_grad():
        v = layer.velocity(t, x)
    independent, ot = _gaussian_fields(mu, s, t, x)
    target, other = (independent, ot) if coupling == "independent" else (ot, independent)
    scale = target.var(0).sum()
    err = (v - target).square().sum(-1).mean() / scale
    err_other = (v - other).square().sum(-1).mean() / scale
    # the independent targets are noisy (the loss's minimum is far above 0), so the fit is
    # looser there; either way the field is far from the other coupling's
    assert err < (0.15 if coupling == "independent" else 0.08) and err_other > 3 * err
    # the learned flow is the target Gaussian: its NLL is that of N(mu, s^2 I)
    test = mu + s * torch.randn(1000, 2)
    truth = -dist.Normal(mu, s).to_event(1).log_prob(test).mean().item()
    assert abs(mean_nll(flow, test) - truth) < 0.08


def test_cnf_trains_inside_an_svi_guide():
    def model():
        pyro.sample("a", dist.Normal(0.0, 1.0))
        pyro.sample("b", dist.Normal(0.0, 2.0))
        pyro.sample("obs", dist.Normal(0.0, 1.0), obs=torch.tensor(0.5))

    guide = pfe.infer.AutoFlowGuide(model, flow="ffjord", hidden_dims=(16, 16), rtol=1e-3,
                                    atol=1e-3)
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 5e-2}), pyro.infer.Trace_ELBO())
    losses = [svi.step() for _ in range(60)]
    layer = next(t for t in guide.flow.transforms if isinstance(t, CNF))
    assert layer.nfe_forward is not None
    assert all(math.isfinite(v) for v in losses)
    # the exact log evidence: obs is independent of the latents, log N(0.5; 0, 1)
    log_z = dist.Normal(0.0, 1.0).log_prob(torch.tensor(0.5)).item()
    elbo, first = -sum(losses[-10:]) / 10, -sum(losses[:5]) / 5
    assert elbo > first + 0.5 and elbo <= log_z + 0.3  # improves; never above log Z (noise)


def test_regularization_sums_the_layers_terms():
    flow = pfe.Flow(None, [small_cnf(kinetic_weight=0.5, jacobian_weight=0.1, rtol=1e-5,
                                     atol=1e-5), OTFlow(2, width=8).double()])
    flow.train()
    flow.log_prob(torch.randn(8, 2, dtype=F64))
    cnf, ot = flow.transforms
    expected = cnf.regularization() + ot.regularization()
    torch.testing.assert_close(regularization(flow), expected)
    assert cnf.regularization() > 0 and ot.regularization() > 0
    regularization(flow).backward()
    assert all(p.grad is not None for p in ot.parameters())


@pytest.mark.slow
def test_rnode_regularisers_cut_the_number_of_function_evaluations():
    data = moons(3000, 0)
    nfes, nlls = {}, {}
    for weight in (0.0, 0.5):
        torch.manual_seed(0)
        flow = pfe.flows.ffjord(2, hidden_dims=(32, 32), kinetic_weight=weight,
                                jacobian_weight=weight)
        layer = flow.transforms[0]
        opt = torch.optim.Adam(flow.parameters(), 5e-3)
        pfe.transforms.preprocess.initialize_from_data(flow, data)
        start = mean_nll(flow, moons(500, 1))  # the Gaussian start (exact trace: no draws)
        flow.train()
        counts = []
        for _ in range(200):
            idx = torch.randint(0, len(data), (256,))
            loss = -flow.log_prob(data[idx]).mean() + regularization(flow)
            opt.zero_grad()
            loss.backward()
            opt.step()
            counts.append(layer.nfe_forward)
        nfes[weight] = sum(counts[100:]) / 100  # the second half of training
        nlls[weight] = mean_nll(flow, moons(500, 1))
    assert nfes[0.5] < 0.85 * nfes[0.0]
    # simpler dynamics at some cost in NLL (measured 2.80 vs 2.28 nats), still far better
    # than the Gaussian start (about 3.27)
    assert nlls[0.5] < start - 0.2 and nlls[0.0] < nlls[0.5]


def test_flow_matching_errors_are_fit_densitys():
    data = moons(200, 0)
    flow = pfe.flows.ffjord(2, hidden_dims=(8, 8))
    with pytest.raises(ValueError, match="num_steps"):
        fit_flow_matching(flow, data, num_steps=-1)
    with pytest.raises(ValueError, match="coupling"):
        fit_flow_matching(flow, data, coupling="sinkhorn")
    bad = data.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="row 3"):
        fit_flow_matching(flow, bad, num_steps=1, progress=False)
    with pytest.raises(TypeError, match="exactly one CNF"):
        fit_flow_matching(pfe.flows.realnvp(2, num_layers=1), data, num_steps=1)


def test_flow_matching_resume_matches_an_uninterrupted_run(tmp_path):
    data = moons(600, 0)
    kwargs = dict(batch_size=64, progress=False, eval_every=10, val_size=32, patience=None,
                  optim=pyro.optim.Adam({"lr": 1e-2}))

    def make():
        torch.manual_seed(3)
        return pfe.flows.ffjord(2, hidden_dims=(8, 8), rtol=1e-3, atol=1e-3)

    full = make()
    torch.manual_seed(4)
    fit_flow_matching(full, data, num_steps=20, checkpoint=tmp_path / "a.pt", **kwargs)
    part = make()
    torch.manual_seed(4)
    fit_flow_matching(part, data, num_steps=10, checkpoint=tmp_path / "b.pt", **kwargs)
    resumed = make()
    hist = fit_flow_matching(resumed, data, num_steps=20, checkpoint=tmp_path / "b.pt",
                             resume=True, **kwargs)
    assert hist["start_step"] == 10 and len(hist["loss"]) == 20
    current = torch.load(tmp_path / "a.pt", weights_only=False)["current_state"]
    for key, value in torch.load(tmp_path / "b.pt", weights_only=False)["current_state"].items():
        torch.testing.assert_close(value, current[key])
    loaded = pfe.load(tmp_path / "b.pt")  # the checkpoint is a loadable model
    assert isinstance(loaded.transforms[0], CNF)


def test_exact_trace_methods_agree_with_autograd():
    from pyro_flows_ext.continuous._trace import exact_divergence

    net = pfe.nn.TimeMLP(3, (16, 16), context_dim=2, zero_init=False).double()
    t = torch.tensor(0.4, dtype=F64)
    y, c = torch.randn(5, 3, dtype=F64, requires_grad=True), torch.randn(5, 2, dtype=F64)
    jac = torch.stack([torch.autograd.functional.jacobian(
        lambda r, ci=ci: net(t, r[None], ci[None])[0], yi.detach()) for yi, ci in zip(y, c)])
    for method in ("vjp", "jacrev"):
        dy, trace, frob = exact_divergence(lambda a, b: net(t, a, b), y, c, True, method)
        torch.testing.assert_close(dy, net(t, y, c))
        torch.testing.assert_close(trace, jac.diagonal(dim1=-2, dim2=-1).sum(-1))
        torch.testing.assert_close(frob, jac.square().sum((-2, -1)))
        assert trace.requires_grad and frob.requires_grad
