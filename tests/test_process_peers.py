"""Our flow process against Meta's `flow_matching` package (dev extra): the same path, velocity and Euler ODE
solution on the exact model of Gaussian data. Conventions differ only in direction: flow_matching's t runs from
noise (0) to data (1) with x_t = t x1 + (1 - t) x0, x0 the noise; ours t_f = 1 - t, and our velocity target is
eps - x0, the negative of its dx_t."""

import pytest
import torch

from diffusion_lab.diffusion import solvers as S
from diffusion_lab.diffusion.analytic import GaussianData
from diffusion_lab.diffusion.continuous import Flow
from diffusion_lab.diffusion.respace import sampling_times

fm_path = pytest.importorskip("flow_matching.path")
fm_solver = pytest.importorskip("flow_matching.solver")
fm_utils = pytest.importorskip("flow_matching.utils")

F64 = torch.float64
DATA = GaussianData(mu=0.1, s=0.5)


def _randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def test_path_and_velocity_equal_flow_matchings_cond_ot_path():
    data, noise = _randn(6, 1, 4, 4, seed=1), _randn(6, 1, 4, 4, seed=2)
    t_theirs = torch.tensor([0.0, 0.1, 0.35, 0.5, 0.9, 1.0], dtype=F64)
    theirs = fm_path.CondOTProbPath().sample(x_0=noise, x_1=data, t=t_theirs)
    flow, u = Flow(), 1 - t_theirs
    torch.testing.assert_close(flow.q_sample(data, u, noise), theirs.x_t, rtol=0, atol=1e-15)
    alpha, sigma = (v.reshape(-1, 1, 1, 1) for v in flow.path(u))
    torch.testing.assert_close(flow.param.target(data, noise, alpha, sigma), -theirs.dx_t, rtol=0, atol=1e-15)

    def net(x_in, model_t):  # any network: the loss is its MSE against the path's velocity
        return torch.sin(x_in) * (model_t / 1000).reshape(-1, 1, 1, 1)

    losses = flow.training_losses(net, data, u, noise)
    out = net(theirs.x_t, 1000 * u)
    torch.testing.assert_close(losses["loss"], (out + theirs.dx_t).pow(2).mean((1, 2, 3)), rtol=1e-14, atol=0)


class _TheirVelocity(fm_utils.ModelWrapper):
    """The exact velocity in flow_matching's time: dx/dt = -(our velocity at t_f = 1 - t)."""

    def __init__(self, flow):
        super().__init__(DATA.model(flow))
        self.flow = flow

    def forward(self, x, t, **extras):
        t_f = (1 - t).to(F64).expand(x.shape[0])
        return -self.model(x, self.flow.network_time(t_f))


@pytest.mark.parametrize("steps", [4, 10, 25])
def test_euler_equals_flow_matchings_ode_solver(steps):
    """N Euler steps from pure noise on the uniform grid: our `euler` (trailing grid, t_f = 1 .. 1/N, then the
    jump to the x0 prediction) and flow_matching's ODESolver(method="euler", step_size=1/N) give the same x1."""
    flow, z = Flow(), _randn(16, 1, 4, 4, seed=3)
    ours = S.euler(flow, DATA.model(flow), z, sampling_times(flow, "trailing", steps), clip_denoised=False)
    solver = fm_solver.ODESolver(velocity_model=_TheirVelocity(flow))
    grid = torch.tensor([0.0, 1.0], dtype=F64)
    theirs = solver.sample(x_init=z, step_size=1.0 / steps, method="euler", time_grid=grid)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
