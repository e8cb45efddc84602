"""Continuous-time processes beside DDPM's discrete one: EDM (Karras et al. 2022) and rectified flow / flow matching
(Liu et al. 2023; Lipman et al. 2023; Esser et al. 2024).

    process = EDM()                                   # sigma in [0.002, 80], F precond., ln sigma ~ N(-1.2, 1.2^2)
    process = Flow(t_sampling="logit_normal")         # x_t = (1 - t) x0 + t eps, velocity target eps - x0
    losses = process.training_losses(model, x0)       # {"loss": [B], "mse": [B]}
    x0 = heun(process, model, x_T, sampling_times(process, "karras", 18))   # the fast solvers, unchanged

Both implement the Process interface (process.py) on solver times t in [0, T-1] (T = `steps`, a resolution,
1000 by default), each mapped to the process's own variable u (`u_at`):
- EDM: u = sigma, log-linear from sigma_min at t = 0 to sigma_max at t = T-1 (alpha = 1), so `spacing=karras`
  is EDM's rho = 7 grid (eq. 5) and `spacing=logsnr` the log-uniform one.
- Flow: u = t_f = (t + 1) / T, then the SD3 shift (Esser et al. 2024, eq. 23) when `shift` != 1, so the trailing
  N-step grid is t_f = 1, (N-1)/N, .., 1/N. t_f = 1 is pure noise (alpha = 0), visited first, as on a
  zero-terminal-SNR VP process: the data-prediction solvers start there, the VE ones (Euler, Heun) need t < T-1.
The network is called as model(network_input(x_t), network_time(u)): EDM's c_in x and c_noise = ln(sigma) / 4
(Table 1), flow's x_t and 1000 t_f (the U-Net's time scale). Training draws u from the process's own distribution
(`sample_u`), not from the solver grid.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..checks import check_choice, check_count, check_number
from .gaussian import _as_time  # float64 times, on the tensor's device
from .losses import mean_flat
from .parameterization import PARAMETERIZATIONS, EDMPrecond, Parameterization, parameterization

VELOCITY = PARAMETERIZATIONS["velocity"]


def _per_example(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """float64 [B] -> [B, 1, .., 1] in like's dtype/device."""
    return v.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


class ContinuousProcess:
    """The shared part: the Process interface built on a subclass's path(u), u_at(t), t_at_u(u), network_time(u),
    sample_u(n) and loss_weight(u) (all float64 tensors)."""

    def __init__(self, param: Parameterization, num_timesteps: int = 1000):
        num_timesteps = check_count("diffusion.steps", num_timesteps, 2, why="(the solver time resolution)")
        self.param, self.num_timesteps = param, num_timesteps

    # ------------------------------------------------------------------ the Process interface
    def alpha_sigma_at(self, t) -> tuple[torch.Tensor, torch.Tensor]:
        return self.path(self.u_at(_as_time(t)))

    def log_snr_at(self, t) -> torch.Tensor:
        alpha, sigma = self.alpha_sigma_at(t)
        return 2 * (alpha.log() - sigma.log())

    def sigma_at(self, t) -> torch.Tensor:
        """VE noise level sigma / alpha (inf where alpha = 0)."""
        alpha, sigma = self.alpha_sigma_at(t)
        return sigma / alpha

    @property
    def sigmas(self) -> torch.Tensor:
        """float64 [T]: sigma_at at the whole times (respace.sampling_times reads the ends)."""
        return self.sigma_at(torch.arange(self.num_timesteps, dtype=torch.float64))

    def model_time(self, t) -> torch.Tensor:
        return self.network_time(self.u_at(_as_time(t)))

    def t_at_model_time(self, model_t) -> torch.Tensor:
        """The inverse of model_time (the exact models of analytic.py use it)."""
        return self.t_at_u(self.u_at_network_time(_as_time(model_t)))

    def denoise(
        self,
        model: Callable[..., torch.Tensor],
        x_t: torch.Tensor,
        t,
        model_kwargs: dict | None = None,
        clip_denoised: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0_hat, eps_hat), each [B, C, H, W], from one model call at x_t [B, C, H, W] and time t (number or [B])."""
        return self.denoise_u(model, x_t, self.u_at(_as_time(t)), model_kwargs, clip_denoised)

    def denoise_u(
        self,
        model: Callable[..., torch.Tensor],
        x_t: torch.Tensor,
        u,
        model_kwargs: dict | None = None,
        clip_denoised: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """denoise at u in the process's own variable (EDM's sigma, flow's t_f; a number or float64 [B]), not
        clamped to the solver range: the objectives call the network at the noise level they drew."""
        u = _as_time(u)
        alpha, sigma = self.path(u)
        B = x_t.shape[0]
        time_dtype = torch.float64 if x_t.dtype == torch.float64 else torch.float32
        if u.ndim == 0:  # the solvers' case: scalars, no device sync
            alpha, sigma = float(alpha), float(sigma)
            model_t = torch.full((B,), float(self.network_time(u)), device=x_t.device, dtype=time_dtype)
        else:
            model_t = self.network_time(u).to(device=x_t.device, dtype=time_dtype)
            alpha, sigma = _per_example(alpha, x_t), _per_example(sigma, x_t)
        out = model(self.param.network_input(x_t, alpha, sigma), model_t, **(model_kwargs or {}))
        return self.param.predict(out, x_t, alpha, sigma, clip_denoised)

    # ------------------------------------------------------------------ training
    def q_sample(self, x0: torch.Tensor, u: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_u = alpha(u) x0 + sigma(u) noise; x0, noise [B, C, H, W], u float64 [B] in the process's variable."""
        alpha, sigma = self.path(_as_time(u))
        return _per_example(alpha, x0) * x0 + _per_example(sigma, x0) * noise

    def training_losses(
        self,
        model: Callable[..., torch.Tensor],
        x0: torch.Tensor,
        u: torch.Tensor,
        noise: torch.Tensor | None = None,
        model_kwargs: dict | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-example losses [B] for x0 [B, C, H, W] at u (float64 [B] in the process's variable, from sample_u:
        timesteps.ProcessTimeSampler): "mse" = |target - output|^2 averaged over pixels, "loss" = loss_weight(u) mse.
        The same call as GaussianDiffusion.training_losses(model, x0, t, noise, model_kwargs)."""
        if noise is None:
            noise = torch.randn_like(x0)
        u = _as_time(u).to(x0.device)
        alpha, sigma = (_per_example(v, x0) for v in self.path(u))
        x_t = alpha * x0 + sigma * noise
        time_dtype = torch.float64 if x0.dtype == torch.float64 else torch.float32
        x_in, model_t = self.param.network_input(x_t, alpha, sigma), self.network_time(u).to(time_dtype)
        out = model(x_in, model_t, **(model_kwargs or {}))
        mse = mean_flat((self.param.target(x0, noise, alpha, sigma) - out) ** 2)
        return {"loss": self.loss_weight(u).to(mse) * mse, "mse": mse}

    discrete = False  # continuous time: no ancestral DDPM step, learned variance, VLB or respacing
    linear_path = False  # see Flow

    @property
    def network_view(self) -> str:
        """What the network's input and output mean (see GaussianDiffusion.network_view)."""
        return f"diffusion={type(self).__name__.lower()} (mean_type={self.param.name}{self._view_extra()})"

    def _view_extra(self) -> str:
        return ""

    def u_at_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """The process's own variable at the VE noise level sigma = sigma(u) / alpha(u) (exact, not clamped)."""
        raise NotImplementedError

    def noise_std(self, t) -> float:
        """The std of the noise a sampler starting at time t draws: sigma(t), the data part ignored (EDM Alg. 1
        line 2: sigma_max at the top; flow: 1 at t_f = 1, exact there)."""
        return float(self.alpha_sigma_at(t)[1])

    @property
    def learns_sigma(self) -> bool:
        """A continuous process has no learned variance: the network outputs C channels."""
        return False

    def solver_time(self, u: torch.Tensor) -> torch.Tensor:
        """Where a training time u sits on the solver's axis [0, T-1] (for per-quartile loss curves)."""
        return self.t_at_u(_as_time(u))

    def _check_param(self, key: str) -> None:
        if not self.param.defined_at_zero_snr and math.isinf(float(self.sigmas[-1])):
            raise ValueError(
                f"{key}={self.param.name!r} cannot recover x0 from pure noise, where this process starts; "
                "use velocity, x0 or v"
            )


class EDM(ContinuousProcess):
    """Karras et al. 2022 (EDM), Table 1: x = x0 + sigma eps, D = c_skip x + c_out F(c_in x; c_noise), training
    ln sigma ~ N(P_mean, P_std^2) with weight lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 on |D - x0|^2, and
    the sampling range [sigma_min, sigma_max] = [0.002, 80]. mean_type: any parameterization ("edm" is F).
    The formulas are NVlabs/edm's (training/loss.py EDMLoss, training/networks.py EDMPrecond, commit 008a4e5; read
    with the project's `fetch`), except that our "loss" averages over pixels where EDMLoss returns per-pixel terms
    that its training loop sums: a constant factor C*H*W, which Adam does not see (up to its eps)."""

    def __init__(
        self,
        mean_type: str = "edm",
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
        p_mean: float = -1.2,
        p_std: float = 1.2,
        steps: int = 1000,
    ):
        self.precond = EDMPrecond(sigma_data)  # validates diffusion.sigma_data; Table 1's lambda lives there
        param = parameterization(mean_type)
        super().__init__(self.precond if isinstance(param, EDMPrecond) else param, steps)
        self.sigma_min = check_number("diffusion.sigma_min", sigma_min, minimum=1e-12, finite=True)
        self.sigma_max = check_number("diffusion.sigma_max", sigma_max, minimum=1e-12, finite=True)
        if not self.sigma_max > self.sigma_min:
            raise ValueError(f"diffusion.sigma_max={sigma_max} must be > diffusion.sigma_min={sigma_min}")
        self.sigma_data = self.precond.sigma_data
        self.p_mean = check_number("diffusion.p_mean", p_mean, minimum=-math.inf, finite=True)
        self.p_std = check_number("diffusion.p_std", p_std, minimum=0.0, finite=True)
        self._log_lo, self._log_hi = math.log(self.sigma_min), math.log(self.sigma_max)

    def u_at(self, t: torch.Tensor) -> torch.Tensor:
        w = t.clamp(0, self.num_timesteps - 1) / (self.num_timesteps - 1)
        return (self._log_lo + w * (self._log_hi - self._log_lo)).exp()

    default_method = "heun"  # Alg. 1

    def _view_extra(self) -> str:
        return f", sigma_data={self.sigma_data:g}"  # c_in, c_skip, c_out scale with it


    def t_at_u(self, sigma: torch.Tensor) -> torch.Tensor:
        w = (sigma.log() - self._log_lo) / (self._log_hi - self._log_lo)
        return (w * (self.num_timesteps - 1)).clamp(0, self.num_timesteps - 1)

    def t_at_sigma(self, sigma) -> torch.Tensor:
        return self.t_at_u(_as_time(sigma))

    def u_at_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        return _as_time(sigma)

    def path(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ones_like(sigma), sigma

    def network_time(self, sigma: torch.Tensor) -> torch.Tensor:
        """c_noise = ln(sigma) / 4 (Table 1)."""
        return sigma.log() / 4

    def u_at_network_time(self, c_noise: torch.Tensor) -> torch.Tensor:
        return (4 * c_noise).exp()

    def sample_u(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """ln sigma ~ N(P_mean, P_std^2): float64 [n]."""
        return (self.p_mean + self.p_std * torch.randn(n, generator=generator, dtype=torch.float64)).exp()

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """lambda(sigma) on |D - x0|^2 as a weight on the target's MSE: lambda |x0 err|^2 / |target err|^2, which
        is error_gain / SNR (1 for F: lambda c_out^2 = 1)."""
        alpha, s = self.path(sigma)
        return self.precond.loss_weight(sigma) * self.param.error_gain(alpha, s) * s**2 / alpha**2


T_SAMPLINGS = ("uniform", "logit_normal")


def logit_normal_pdf(t: torch.Tensor, m: float = 0.0, s: float = 1.0) -> torch.Tensor:
    """Density of t = sigmoid(x), x ~ N(m, s^2) on (0, 1) (Esser et al. 2024, eq. 19)."""
    logit = torch.log(t) - torch.log1p(-t)
    return torch.exp(-((logit - m) ** 2) / (2 * s**2)) / (s * math.sqrt(2 * math.pi) * t * (1 - t))


def sd3_shift(t: torch.Tensor, shift: float) -> torch.Tensor:
    """The timestep shift of Esser et al. 2024 (eq. 23): t' = shift t / (1 + (shift - 1) t); 1 is no shift."""
    return shift * t / (1 + (shift - 1) * t)


class Flow(ContinuousProcess):
    """Rectified flow / conditional flow matching on the linear path x_t = (1 - t) x0 + t eps (Liu et al. 2023;
    Lipman et al. 2023), target the velocity eps - x0 with weight 1, t ~ U(0, 1) or logit-normal(m, s) (Esser et al.
    2024, Sec. 3.1); `shift` moves the sampling grid toward the noise (SD3: 3.0 at 1024^2; 1 = none)."""

    def __init__(
        self,
        mean_type: str = "velocity",
        t_sampling: str = "uniform",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        shift: float = 1.0,
        steps: int = 1000,
    ):
        super().__init__(parameterization(mean_type), steps)
        check_choice("diffusion.t_sampling", t_sampling, T_SAMPLINGS)
        self.t_sampling = t_sampling
        self.logit_mean = check_number("diffusion.logit_mean", logit_mean, minimum=-math.inf, finite=True)
        self.logit_std = check_number("diffusion.logit_std", logit_std, minimum=1e-12, finite=True)
        self.shift = check_number("diffusion.shift", shift, minimum=1e-12, finite=True)
        self._check_param("diffusion.mean_type")

    default_method = "euler"
    linear_path = True  # alpha = 1 - u, sigma = u: Heun steps in u (the flow's own time), finite at u = 1

    def u_at(self, t: torch.Tensor) -> torch.Tensor:
        return sd3_shift((t.clamp(0, self.num_timesteps - 1) + 1) / self.num_timesteps, self.shift)

    def t_at_u(self, u: torch.Tensor) -> torch.Tensor:
        u0 = u / (self.shift - (self.shift - 1) * u)  # the inverse shift
        return (u0 * self.num_timesteps - 1).clamp(0, self.num_timesteps - 1)

    def t_at_sigma(self, sigma) -> torch.Tensor:
        s = _as_time(sigma)
        return self.t_at_u(torch.where(torch.isinf(s), torch.ones_like(s), s / (1 + s)))

    def u_at_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """t_f = sigma / (1 + sigma): (1 - t_f) (x0 + sigma eps) = (1 - t_f) x0 + t_f eps."""
        s = _as_time(sigma)
        return torch.where(torch.isinf(s), torch.ones_like(s), s / (1 + s))

    def path(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return 1 - u, u

    @property
    def averages_velocity(self) -> bool:
        """Whether the network's output is a velocity, which MeanFlow's two-time network averages over [r, t]."""
        return self.param.name == VELOCITY.name  # by name: a deep copy (the EMA's module) has its own object

    def average_velocity(self, model: Callable[..., torch.Tensor], z: torch.Tensor, t, r,
                         model_kwargs: dict | None = None) -> torch.Tensor:  # fmt: skip
        """u(z, r, t) [B, C, H, W]: the average velocity over [r, t] (MeanFlow, Geng et al. 2025, eq. 3) from one
        call of a two-time network, model(z, 1000 t, h=1000 (t - r)); t, r [B] tensors in z's dtype (or numbers)
        in flow time (t = 1 noise). With r = t it is the instantaneous velocity v(z, t). Differentiable in z, t, r
        (MeanFlow's JVP)."""
        B = z.shape[0]
        t, r = (torch.full((B,), float(v), device=z.device, dtype=z.dtype) if not torch.is_tensor(v) else v
                for v in (t, r))  # fmt: skip
        return model(z, self.network_time(t), h=self.network_time(t) - self.network_time(r), **(model_kwargs or {}))

    def network_time(self, u: torch.Tensor) -> torch.Tensor:
        return 1000 * u

    def u_at_network_time(self, model_t: torch.Tensor) -> torch.Tensor:
        return model_t / 1000

    def sample_u(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.t_sampling == "uniform":
            return torch.rand(n, generator=generator, dtype=torch.float64)
        x = self.logit_mean + self.logit_std * torch.randn(n, generator=generator, dtype=torch.float64)
        return torch.sigmoid(x)

    def loss_weight(self, u: torch.Tensor) -> torch.Tensor:
        """1 on the velocity MSE; another target's MSE is weighted so that the objective stays the velocity MSE:
        |u err|^2 = |eps err|^2 / alpha^2 = error_gain / alpha^2 |target err|^2 (x0: 1 / t^2)."""
        alpha, sigma = self.path(u)
        alpha = alpha.clamp(min=1e-12)  # both gains carry alpha^2; the ratio is continuous at t = 1 (alpha = 0)
        return self.param.error_gain(alpha, sigma) / VELOCITY.error_gain(alpha, sigma)  # 1 for the velocity

    def solver_time(self, u: torch.Tensor) -> torch.Tensor:
        """Where a training time u sits on [0, T-1], unshifted (SD3's shift moves only the sampling grid)."""
        return (_as_time(u) * self.num_timesteps - 1).clamp(0, self.num_timesteps - 1)
