"""iw_dreg_loss: its value is the IWAE bound and its mean gradient the unbiased IWAE gradient
(Pyro's RenyiELBO(alpha=0) with the full reparameterised gradient), on a conjugate model."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, RenyiELBO

from pyro_flows_ext.infer import AutoFlowGuide, iw_dreg_loss

X = torch.tensor([0.8, 1.4, 0.3])


def model():
    z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    with pyro.plate("data", 3):
        pyro.sample("x", dist.Normal(z.sum(-1), 0.7), obs=X)


def _guide(stl, seed=0):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = AutoFlowGuide(model, stl=stl, clip=False, init_scale=0.6)
    guide()
    return guide


def _grads(guide, step, reps):
    out = []
    for _ in range(reps):
        for p in guide.parameters():
            p.grad = None
        step()
        out.append(torch.cat([p.grad.reshape(-1) for p in guide.parameters()]))
    g = torch.stack(out).double()
    return g.mean(0), g.std(0) / math.sqrt(reps)


def test_dreg_gradient_is_the_unbiased_iwae_gradient():
    k, reps = 8, 1000
    reference = _guide(stl=False)
    state = {n: v.detach().clone() for n, v in reference.state_dict().items()}
    renyi = RenyiELBO(alpha=0, num_particles=k, vectorize_particles=True, max_plate_nesting=1)
    pyro.set_rng_seed(1)
    mean_ref, se_ref = _grads(reference, lambda: renyi.loss_and_grads(model, reference), reps)
    guide = _guide(stl=True)
    guide.load_state_dict(state)
    loss = iw_dreg_loss(k)
    pyro.set_rng_seed(2)
    mean, se = _grads(guide, lambda: loss(model, guide).backward(), reps)
    used = se_ref > 0  # the strictly lower triangle's unused entries have no gradient
    assert (mean[~used] == 0).all()
    assert (mean_ref[used].abs() > 4 * se_ref[used]).any()  # a gradient worth comparing
    t = (mean - mean_ref)[used].abs() / (se.square() + se_ref.square())[used].sqrt()
    assert t.max() < 4.5, t


def test_dreg_value_is_the_iwae_bound_and_training_reaches_the_evidence():
    # exact log evidence: x ~ N(0, 2 * 1 + 0.7^2 I) jointly (z1 + z2 ~ N(0, 2))
    cov = 2.0 * torch.ones(3, 3) + 0.49 * torch.eye(3)
    exact = dist.MultivariateNormal(torch.zeros(3), cov).log_prob(X).item()
    guide = _guide(stl=True)
    loss = iw_dreg_loss(16)
    values = torch.stack([-loss(model, guide).detach() for _ in range(200)])
    assert values.mean() < exact + 4 * values.std() / math.sqrt(200)  # a lower bound
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.02}), loss=loss)
    for _ in range(600):
        svi.step()
    values = torch.stack([-loss(model, guide).detach() for _ in range(200)])
    assert exact - 0.02 < values.mean() + 4 * values.std() / math.sqrt(200)
    assert values.mean() < exact + 4 * values.std() / math.sqrt(200)


def test_dreg_refuses_a_full_gradient_guide_and_a_model_with_parameters():
    guide = _guide(stl=False)
    with pytest.raises(ValueError, match="stl=True"):
        iw_dreg_loss(4)(model, guide)

    def model_with_param():
        loc = pyro.param("loc", torch.zeros(2))
        pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))

    pyro.clear_param_store()
    guide = AutoFlowGuide(model_with_param, stl=True)
    with pytest.raises(NotImplementedError, match="parameters"):
        iw_dreg_loss(4)(model_with_param, guide)
    with pytest.raises(ValueError, match="positive integer"):
        iw_dreg_loss(0)


def test_readme_mass_covering_snippet_runs():
    """The README's mass-covering snippet as written: both (guide, loss) pairs train."""
    import os
    import re

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = open(os.path.join(root, "README.md")).read()
    section = text.split("## Flows as guides, NeuTra and diagnostics", 1)[1]
    code = re.findall(r"```python\n(.*?)```", section, re.S)[1]
    assert "iw_dreg_loss(16)" in code and "RenyiELBO(alpha=0.5" in code
    lines = code.strip().splitlines()
    pairs = [lines[i:i + 2] for i, line in enumerate(lines) if line.startswith("guide =")]
    assert len(pairs) == 2
    header = "\n".join(line for line in lines if line.startswith("from "))
    for pair in pairs:
        namespace = {"model": model, "AutoFlowGuide": AutoFlowGuide}
        pyro.clear_param_store()
        exec(compile(header + "\n" + "\n".join(pair), "README.md", "exec"), namespace)
        svi = SVI(model, namespace["guide"], pyro.optim.Adam({"lr": 0.01}), namespace["loss"])
        assert all(math.isfinite(svi.step()) for _ in range(5))
