"""GaussianDiffusion: the forward process, its posterior, the model's reverse step and the losses.

Plain PyTorch, no network inside (the model is an argument: `model(x_t, t, **model_kwargs)`).
Equations: DDPM = Ho et al. 2020, IDDPM = Nichol & Dhariwal 2021, DDIM = Song et al. 2021.
All schedule-derived tensors are float64 [T] and cast to the input's dtype/device at use.
Objectives: Min-SNR = Hang et al. 2023, P2 = Choi et al. 2022, zero terminal SNR = Lin et al. 2024.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence

import torch

from ..checks import check_choice
from .losses import discretized_gaussian_log_likelihood, mean_flat, normal_kl
from .parameterization import PARAMETERIZATIONS, parameterization
from .schedules import get_betas

MEAN_TYPES = tuple(PARAMETERIZATIONS)  # diffusion/parameterization.py
VAR_TYPES = ("fixed_small", "fixed_large", "learned", "learned_range")
LOSS_TYPES = ("mse", "rescaled_mse", "kl", "rescaled_kl")
LOSS_WEIGHTINGS = ("none", "min_snr", "p2")


def snr_loss_weight(
    snr: torch.Tensor,
    mean_type: str,
    loss_weighting: str,
    snr_gamma: float = 5.0,
    p2_k: float = 1.0,
    p2_gamma: float = 1.0,
) -> torch.Tensor:
    """Weight on the MSE of the model's target (eps, x0 or v) at SNR_t = alpha_bar_t / (1 - alpha_bar_t).

    Each weighting is a weight w(SNR) on the eps-MSE, as the papers define it, converted to the target's MSE
    with |eps - eps_hat|^2 = SNR |x0 - x0_hat|^2 = SNR / (SNR + 1) |v - v_hat|^2 (Hang et al. 2023, Sec. 3.4):
        min_snr (Min-SNR-gamma, Hang et al. 2023): w = min(SNR, gamma) / SNR on the eps-MSE, i.e.
            min(SNR, gamma) on the x0-MSE and min(SNR, gamma) / (SNR + 1) on the v-MSE.
        p2 (Choi et al. 2022, lambda'_t = lambda_t / (k + SNR_t)^gamma with L_simple's lambda_t = 1):
            w = (k + SNR)^-gamma on the eps-MSE, times SNR (x0) or SNR / (SNR + 1) (v).
        none: 1 at every t (the plain MSE of whichever target the model predicts).
    At SNR = 0 (a zero-terminal-SNR last step) every weight is finite: the eps forms are 1 (min_snr) and
    k^-gamma (p2); the x0 and v forms are 0, since an x0 or v model's eps-error is 0 there (eps = x_t).
    snr: float64 [T] -> float64 [T].
    """
    check_choice("diffusion.loss_weighting", loss_weighting, LOSS_WEIGHTINGS)
    if loss_weighting == "none":
        return torch.ones_like(snr)
    if loss_weighting == "min_snr":
        eps_weight = torch.clamp(snr_gamma / snr, max=1.0)  # min(SNR, gamma) / SNR; gamma / 0 = inf -> 1
    else:
        eps_weight = (p2_k + snr) ** -p2_gamma
    alpha, sigma = (snr / (snr + 1.0)).sqrt(), (1.0 / (snr + 1.0)).sqrt()  # the VP path at this SNR
    return parameterization(mean_type).weight_from_eps(eps_weight, alpha, sigma)


def extract(arr: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """arr[t] as a [B, 1, 1, 1] tensor (as many trailing 1s as like has dims) in like's dtype/device."""
    out = arr.to(like.device)[t].to(like.dtype)
    return out.reshape(t.shape[0], *([1] * (like.ndim - 1)))


def _as_timestep_map(timestep_map) -> torch.Tensor:
    """int64 when every entry is a whole number (as before), float64 for the fractional times of a
    continuous-time respacing (`respace` on a float grid)."""
    tm = torch.as_tensor(timestep_map)
    if tm.is_floating_point() and not torch.equal(tm, tm.round()):
        return tm.to(torch.float64)
    return tm.long()


def _as_time(t) -> torch.Tensor:
    """Times (a number or a tensor) as float64, on t's device when t is a tensor (a number stays on the CPU)."""
    if isinstance(t, torch.Tensor):
        return t.to(torch.float64)
    return torch.tensor(float(t), dtype=torch.float64)


class GaussianDiffusion:
    """A T-step Gaussian diffusion q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I).

    Args:
        betas: float64 [T] in (0, 1); the last may be 1 (zero terminal SNR, alpha_bar_{T-1} = 0, see
            schedules.rescale_zero_terminal_snr), which needs mean_type x0 or v.
        mean_type: what the model predicts: "eps" (noise), "x0", or "v" (v = sqrt(a) eps - sqrt(1-a) x0).
        var_type: "fixed_small" (beta-tilde), "fixed_large" (beta, with beta-tilde_1 at t=0),
            "learned" (log variance), "learned_range" (IDDPM eq. 15 interpolation).
        loss_type: "mse" / "rescaled_mse" (L_simple, plus L_vlb for learned variance: the hybrid loss
            when rescaled, i.e. lambda = 0.001 on L_vlb = T * L_t) or "kl" / "rescaled_kl" (pure L_vlb).
        timestep_map: int64 [T]; the timestep passed to the model at index t (identity unless respaced).
        loss_weighting: "none", "min_snr" or "p2": a per-timestep weight on the MSE term (see snr_loss_weight),
            applied inside training_losses; the VLB term of a learned variance stays unweighted.
        snr_gamma: min_snr's gamma (5 in Hang et al. 2023). p2_k, p2_gamma: P2's k and gamma (1 and 0.5 or 1).

    At a zero-terminal-SNR last step sqrt_recip_alphas_cumprod and sqrt_recipm1_alphas_cumprod are inf; they
    are used only to derive x0 from an eps prediction, which such a process refuses. Every other quantity
    (posterior, SNR, weights, prior) is finite there, and eps derived from x0 is x_t.
    """

    def __init__(
        self,
        betas: torch.Tensor,
        mean_type: str = "eps",
        var_type: str = "fixed_small",
        loss_type: str = "mse",
        timestep_map: torch.Tensor | None = None,
        loss_weighting: str = "none",
        snr_gamma: float = 5.0,
        p2_k: float = 1.0,
        p2_gamma: float = 1.0,
    ):
        self.param = parameterization(mean_type)
        check_choice("diffusion.var_type", var_type, VAR_TYPES)
        check_choice("diffusion.loss_type", loss_type, LOSS_TYPES)
        check_choice("diffusion.loss_weighting", loss_weighting, LOSS_WEIGHTINGS)
        if loss_weighting != "none" and loss_type in ("kl", "rescaled_kl"):
            raise ValueError(
                f"diffusion.loss_weighting={loss_weighting!r} needs diffusion.loss_type mse or rescaled_mse "
                f"(loss_type={loss_type!r} is the pure VLB, which has no MSE term to weight)"
            )
        if not float(snr_gamma) > 0:
            raise ValueError(f"diffusion.snr_gamma={snr_gamma} must be > 0")
        if not float(p2_k) > 0:
            raise ValueError(f"diffusion.p2_k={p2_k} must be > 0")
        if not float(p2_gamma) >= 0:
            raise ValueError(f"diffusion.p2_gamma={p2_gamma} must be >= 0")
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a 1-D tensor with values in (0, 1]")
        if (betas[:-1] == 1).any():
            raise ValueError("betas: only the last may be 1 (zero terminal SNR); an earlier 1 ends the process early")
        self.zero_terminal_snr = bool(betas[-1] == 1)
        if self.zero_terminal_snr and not self.param.defined_at_zero_snr:
            raise ValueError(
                "diffusion.zero_terminal_snr=true needs a diffusion.mean_type defined at pure noise (x0, v, "
                "velocity or edm; eps cannot be predicted from pure noise)"
            )
        self.mean_type, self.var_type, self.loss_type = mean_type, var_type, loss_type
        self.loss_weighting, self.snr_gamma = loss_weighting, float(snr_gamma)
        self.p2_k, self.p2_gamma = float(p2_k), float(p2_gamma)
        self.num_timesteps = T = betas.shape[0]
        self.timestep_map = torch.arange(T) if timestep_map is None else _as_timestep_map(timestep_map)

        self.betas = betas
        alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(alphas, 0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.alphas_cumprod_next = torch.cat([self.alphas_cumprod[1:], torch.zeros(1, dtype=torch.float64)])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1.0).sqrt()
        # DDPM eq. 7: beta-tilde_t and the posterior mean coefficients.
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # beta-tilde_0 = 0; the log is clipped to beta-tilde_1 there (IDDPM).
        pv1 = self.posterior_variance[1] if T > 1 else self.betas[0]
        self.posterior_log_variance_clipped = torch.log(torch.cat([pv1.reshape(1), self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * alphas.sqrt() / (1.0 - self.alphas_cumprod)
        # SNR_t = alpha_bar_t / (1 - alpha_bar_t) (0 at a zero terminal SNR) and the MSE term's weight [T].
        self.snr = self.alphas_cumprod / (1.0 - self.alphas_cumprod)
        self.mse_weights = snr_loss_weight(self.snr, mean_type, loss_weighting, snr_gamma, p2_k, p2_gamma)

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_schedule(
        cls, schedule: str = "linear", steps: int = 1000, zero_terminal_snr: bool = False, **kwargs
    ) -> GaussianDiffusion:
        """Build from a named schedule: `GaussianDiffusion.from_schedule("cosine", 4000, var_type=...)`.

        zero_terminal_snr: rescale the betas so alpha_bar_{T-1} = 0 (Lin et al. 2024, Alg. 1; needs mean_type
        v or x0, and sample with sampler.spacing=trailing so that sampling starts at that step).
        """
        if not isinstance(zero_terminal_snr, bool):
            raise ValueError(f"diffusion.zero_terminal_snr={zero_terminal_snr!r} must be true or false")
        return cls(get_betas(schedule, steps, zero_terminal_snr=zero_terminal_snr), **kwargs)

    @property
    def objective_kwargs(self) -> dict:
        """The loss-weighting options, to build a process with the same objective (respace)."""
        return {
            "loss_weighting": self.loss_weighting,
            "snr_gamma": self.snr_gamma,
            "p2_k": self.p2_k,
            "p2_gamma": self.p2_gamma,
        }

    default_method = "ddim"  # the sampler a model of this process uses when none is given (Process interface)
    discrete = True  # T integer steps with their own tables (ancestral DDPM, learned variance, the VLB, respacing)
    linear_path = False  # alpha^2 + sigma^2 = 1

    @property
    def network_view(self) -> str:
        """What the network's input and output mean here (its time axis, schedule and parameterization): two
        processes with the same view can share weights (init_from, teacher)."""
        digest = hashlib.sha256(self.alphas_cumprod.numpy().tobytes()).hexdigest()[:8]
        variance = ", learned variance" if self.learns_sigma else ""
        return f"diffusion=ddpm/iddpm (T={self.num_timesteps}, schedule {digest}, mean_type={self.mean_type}{variance})"

    def sample_u(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n uniform integer steps in [0, T-1], int64 (the process's own training times, as the validation loss
        draws them; training draws from the configured timestep sampler)."""
        return torch.randint(0, self.num_timesteps, (n,), generator=generator)

    def noise_std(self, t) -> float:
        """The std of the noise x_T a sampler starting at time t draws: 1 at every t (DDPM/DDIM's convention;
        Process interface)."""
        return 1.0

    @property
    def learns_sigma(self) -> bool:
        """True when the model must output 2C channels (mean part, variance part)."""
        return self.var_type in ("learned", "learned_range")

    def respace(self, timesteps: Sequence[float]) -> GaussianDiffusion:
        """The process restricted to the kept steps s_0 < ... < s_{K-1} (IDDPM Sec. 4).

        beta'_i = 1 - alpha_bar_{s_i} / alpha_bar_{s_{i-1}} (alpha_bar_{s_{-1}} = 1), so alpha_bar at the
        kept steps is unchanged; the model is still called with the original timesteps s_i.
        Fractional steps (a continuous-time grid, `respace.sampling_times`) take alpha_bar from
        `alpha_bar_at` and the model's time from `model_time`; whole numbers give the integer result.
        """
        values = [float(s) for s in timesteps]
        T = self.num_timesteps
        integer = all(math.isfinite(v) and v == int(v) for v in values)
        kept = sorted(int(v) for v in values) if integer else sorted(values)
        if not kept or not all(0 <= v <= T - 1 for v in kept) or len(set(kept)) != len(kept):
            raise ValueError(f"respaced timesteps must be distinct times in [0, {T - 1}], got {kept[:8]}...")
        if integer:
            acp, timestep_map = self.alphas_cumprod[kept], self.timestep_map[kept]
        else:
            tt = torch.tensor(kept, dtype=torch.float64)
            acp, timestep_map = self.alpha_bar_at(tt), self.model_time(tt)
        acp_prev = torch.cat([torch.ones(1, dtype=torch.float64), acp[:-1]])
        return GaussianDiffusion(
            1.0 - acp / acp_prev,
            self.mean_type,
            self.var_type,
            self.loss_type,
            timestep_map=timestep_map,
            **self.objective_kwargs,
        )

    # ----------------------------------------------------------------- forward process
    def q_mean_variance(self, x0: torch.Tensor, t: torch.Tensor):
        """q(x_t | x_0) (DDPM eq. 4): mean sqrt(alpha_bar_t) x0, variance and log variance 1 - alpha_bar_t."""
        mean = extract(self.sqrt_alphas_cumprod, t, x0) * x0
        var = extract(1.0 - self.alphas_cumprod, t, x0)
        return mean, var, torch.log(var)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps. x0: [B, C, H, W], t: int64 [B]."""
        if noise is None:
            noise = torch.randn_like(x0)
        return (
            extract(self.sqrt_alphas_cumprod, t, x0) * x0 + extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise
        )

    def q_posterior_mean_variance(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """q(x_{t-1} | x_t, x_0) = N(mu-tilde, beta-tilde) (DDPM eq. 6-7): (mean, variance, clipped log variance)."""
        mean = extract(self.posterior_mean_coef1, t, x_t) * x0 + extract(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, extract(self.posterior_variance, t, x_t), extract(self.posterior_log_variance_clipped, t, x_t)

    # ----------------------------------------------------------------- conversions between parameterizations
    def predict_eps_from_x0(self, x_t, t, x0):
        """eps = (x_t - sqrt(a) x0) / sqrt(1 - a); at a = 0 (zero terminal SNR) x_t is the noise: eps = x_t."""
        if self.zero_terminal_snr:  # this form is finite at a = 0; the other divides inf by inf there
            return (x_t - extract(self.sqrt_alphas_cumprod, t, x_t) * x0) / extract(
                self.sqrt_one_minus_alphas_cumprod, t, x_t
            )
        return (extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x0) / extract(
            self.sqrt_recipm1_alphas_cumprod, t, x_t
        )

    # ----------------------------------------------------------------- reverse process
    def model_log_variance(self, var_output: torch.Tensor | None, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """log Sigma_theta(x_t, t) for the configured var_type; var_output is the model's extra C channels.

        learned_range (IDDPM eq. 15): frac = (v + 1) / 2, log var = frac log beta_t + (1 - frac) log beta-tilde_t.
        """
        if self.var_type == "fixed_small":
            return extract(self.posterior_log_variance_clipped, t, like).expand_as(like)
        if self.var_type == "fixed_large":
            large = torch.cat([self.posterior_variance[1:2], self.betas[1:]]) if self.num_timesteps > 1 else self.betas
            return extract(torch.log(large), t, like).expand_as(like)
        if self.var_type == "learned":
            return var_output
        min_log = extract(self.posterior_log_variance_clipped, t, like)
        max_log = extract(torch.log(self.betas), t, like)
        frac = (var_output + 1) / 2
        return frac * max_log + (1 - frac) * min_log

    def split_model_output(self, out: torch.Tensor, x_t: torch.Tensor):
        """[B, C or 2C, H, W] -> (mean part [B, C, H, W], variance part or None)."""
        if self.learns_sigma:
            if out.shape[1] != 2 * x_t.shape[1]:
                raise ValueError(
                    f"diffusion.var_type={self.var_type!r} needs a model with {2 * x_t.shape[1]} output channels "
                    f"(set net.learn_sigma=true), got {out.shape[1]}"
                )
            return out.split(x_t.shape[1], dim=1)
        return out, None

    def p_mean_variance(
        self,
        model: Callable[..., torch.Tensor],
        x_t: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        model_kwargs: dict | None = None,
        model_output: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """p_theta(x_{t-1} | x_t) = N(mean, exp(log_variance)) (DDPM eq. 1, IDDPM eq. 15).

        x_t: [B, C, H, W]; t: int64 [B] indices into this process (the model sees timestep_map[t]).
        Returns mean, variance, log_variance, pred_x0 (clipped to [-1, 1] when clip_denoised), eps
        (re-derived from the clipped pred_x0, as DDIM needs), and the raw model output.
        """
        alpha, sigma = self._alpha_sigma(t, x_t)
        if model_output is None:
            x_in = self.param.network_input(x_t, alpha, sigma)
            model_output = model(x_in, self.timestep_map.to(t.device)[t], **(model_kwargs or {}))
        mean_out, var_out = self.split_model_output(model_output, x_t)
        log_variance = self.model_log_variance(var_out, t, x_t)
        pred_x0, eps = self.param.to_x0_eps(mean_out, x_t, alpha, sigma)
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1, 1)
            eps = self.predict_eps_from_x0(x_t, t, pred_x0)
        mean, _, _ = self.q_posterior_mean_variance(pred_x0, x_t, t)
        return {
            "mean": mean,
            "variance": torch.exp(log_variance),
            "log_variance": log_variance,
            "pred_x0": pred_x0,
            "eps": eps,
            "model_output": model_output,
        }

    # ----------------------------------------------------------------- continuous time (for the fast solvers)
    # The discrete process seen as a continuous one, as k-diffusion's DiscreteSchedule does: the VE noise level
    # sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) of x_t / sqrt(alpha_bar_t), with log sigma linear in t
    # between whole-number steps. lambda_t = log(alpha_t / sigma_t) = -log sigma_t is DPM-Solver's half log-SNR.
    # Times are float64 in [0, T-1] (clamped); at whole numbers every function returns the table value exactly.
    # With zero terminal SNR (alpha_bar_{T-1} = 0) sigma_{T-1} = inf and sigma is inf on (T-2, T-1].

    @property
    def sigmas(self) -> torch.Tensor:
        """float64 [T]: sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), increasing in t."""
        return ((1.0 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()

    def _interp(self, table: torch.Tensor, t: torch.Tensor, log: bool = False) -> torch.Tensor:
        """table (float64 [T]) linearly interpolated at times t (in log space when `log`); exact at whole t."""
        T = self.num_timesteps
        table = table.to(device=t.device, dtype=torch.float64)
        t = t.clamp(0, T - 1)
        whole = t.round()
        exact = table[whole.long()]
        if T == 1:
            return exact
        lo = t.floor().long().clamp(max=T - 2)
        w = t - lo
        ends = table.log() if log else table
        a, b = ends[lo], ends[lo + 1]
        mid = a + w * (b - a)
        return torch.where(t == whole, exact, mid.exp() if log else mid)

    def sigma_at(self, t) -> torch.Tensor:
        """sigma at float times t (tensor of any shape, or a number): log sigma interpolated linearly in t."""
        t = _as_time(t)
        return self._interp(self.sigmas, t, log=True)

    def alpha_bar_at(self, t) -> torch.Tensor:
        """alpha_bar at float times t: 1 / (1 + sigma_at(t)^2), the table value at whole t (0 where sigma = inf)."""
        t = _as_time(t)
        t = t.clamp(0, self.num_timesteps - 1)
        whole = t.round()
        exact = self.alphas_cumprod.to(t.device)[whole.long()]
        return torch.where(t == whole, exact, 1.0 / (1.0 + self.sigma_at(t) ** 2))

    def alpha_sigma_at(self, t) -> tuple[torch.Tensor, torch.Tensor]:
        """The path's coefficients at float times t (x_t = alpha x0 + sigma eps): (sqrt(a), sqrt(1 - a)), float64,
        a = alpha_bar_at(t). The Process interface (process.py) the solvers read instead of alpha_bar."""
        a = self.alpha_bar_at(t)
        return a.sqrt(), (1.0 - a).sqrt()

    def log_snr_at(self, t) -> torch.Tensor:
        """log(alpha^2 / sigma^2) = log a - log(1 - a) at float times t, float64 (-inf at a zero terminal SNR)."""
        a = self.alpha_bar_at(t)
        return a.log() - torch.log1p(-a)

    def t_at_sigma(self, sigma) -> torch.Tensor:
        """The inverse of sigma_at: float64 times in [0, T-1] (clamped outside [sigma_0, sigma_{T-1}])."""
        sigma = _as_time(sigma)
        T = self.num_timesteps
        log_s = sigma.log()
        table = self.sigmas.to(sigma.device).log()
        if T == 1:
            return torch.zeros_like(log_s)
        lo = (torch.searchsorted(table, log_s.reshape(-1), right=True).reshape(log_s.shape) - 1).clamp(0, T - 2)
        a, b = table[lo], table[lo + 1]
        t = lo + ((log_s - a) / (b - a)).clamp(0, 1)
        t = torch.where(log_s >= table[-1], torch.full_like(t, T - 1), t)
        return torch.where(log_s <= table[0], torch.zeros_like(t), t)

    def solver_time(self, t: torch.Tensor) -> torch.Tensor:
        """Where a training time sits on [0, T-1] (per-quartile loss curves): the step itself."""
        return t

    def t_at_model_time(self, model_t) -> torch.Tensor:
        """The process time of a network time: the identity (float64), exact for a process that was not respaced
        (the exact models of analytic.py use it; a respaced process maps many-to-one through timestep_map)."""
        return _as_time(model_t)

    def model_time(self, t) -> torch.Tensor:
        """The time the network is called with at process time t: timestep_map interpolated linearly (float64)."""
        t = _as_time(t)
        return self._interp(self.timestep_map.to(torch.float64), t)

    def denoise(
        self,
        model: Callable[..., torch.Tensor],
        x_t: torch.Tensor,
        t,
        model_kwargs: dict | None = None,
        clip_denoised: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One model call at the (possibly fractional) time t: (x0_hat, eps_hat), each [B, C, H, W].

        x_t: [B, C, H, W], the VP state at t; t: a number (the solvers' case: no device sync) or a [B] tensor.
        The model sees model_time(t) as [B] int64 when it is a whole number (exactly what p_mean_variance passes)
        and as float (float64 for float64 x_t, else float32) otherwise. Any mean_type; of a learned-variance
        model's 2C output channels only the first C are used. With a = alpha_bar_at(t):
            eps: x0 = (x_t - sqrt(1-a) eps) / sqrt(a);   x0: eps = (x_t - sqrt(a) x0) / sqrt(1-a);
            v:   x0 = sqrt(a) x_t - sqrt(1-a) v,  eps = sqrt(a) v + sqrt(1-a) x_t   (finite at a = 0).
        clip_denoised clamps x0 to [-1, 1] and re-derives eps from it, as p_mean_variance does.
        """
        tt = _as_time(t)
        B = x_t.shape[0]
        time_dtype = torch.float64 if x_t.dtype == torch.float64 else torch.float32
        a, mt = self.alpha_bar_at(tt), self.model_time(tt)
        if tt.ndim == 0:
            a, mt = float(a), float(mt)
            whole = mt == round(mt)
            model_t = torch.full(
                (B,), round(mt) if whole else mt, device=x_t.device, dtype=torch.long if whole else time_dtype
            )
            sa, s1a = math.sqrt(a), math.sqrt(1.0 - a)
        else:
            whole = torch.equal(mt, mt.round())
            model_t = (mt.round().long() if whole else mt.to(time_dtype)).to(x_t.device)
            shape = (B, *([1] * (x_t.ndim - 1)))
            sa, s1a = (v.to(device=x_t.device, dtype=x_t.dtype).reshape(shape) for v in (a.sqrt(), (1.0 - a).sqrt()))
        x_in = self.param.network_input(x_t, sa, s1a)
        out, _ = self.split_model_output(model(x_in, model_t, **(model_kwargs or {})), x_t)
        return self.param.predict(out, x_t, sa, s1a, clip_denoised)

    # ----------------------------------------------------------------- variational bound
    def vb_terms_bpd(self, model, x0, x_t, t, clip_denoised=False, model_kwargs=None, model_output=None):
        """L_t in bits/dim per example [B] (DDPM eq. 5): KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) for t > 0,
        and the discretized Gaussian decoder NLL -log p(x0|x1) at t = 0. Also returns pred_x0."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x0, x_t, t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised, model_kwargs, model_output)
        kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(x0, out["mean"], 0.5 * out["log_variance"])) / math.log(
            2.0
        )
        return torch.where(t == 0, nll, kl), out["pred_x0"]

    def prior_bpd(self, x0: torch.Tensor) -> torch.Tensor:
        """KL(q(x_T | x0) || N(0, I)) in bits/dim, [B] (L_T of DDPM eq. 5)."""
        t = torch.full((x0.shape[0],), self.num_timesteps - 1, device=x0.device, dtype=torch.long)
        mean, _, log_var = self.q_mean_variance(x0, t)
        return mean_flat(normal_kl(mean, log_var, torch.zeros_like(mean), torch.zeros_like(mean))) / math.log(2.0)

    @torch.no_grad()
    def calc_bpd_loop(
        self, model, x0, clip_denoised=True, model_kwargs=None, generator=None
    ) -> dict[str, torch.Tensor]:
        """The full bound in bits/dim: total_bpd [B] = sum_t L_t + L_T (one x_t sample per t).

        Returns total_bpd [B], prior_bpd [B], vb [B, T], mse [B, T] (of eps) and x0_mse [B, T].
        """
        B, T = x0.shape[0], self.num_timesteps
        vb, x0_mse, mse = (torch.zeros(B, T, device=x0.device) for _ in range(3))
        for i in reversed(range(T)):
            t = torch.full((B,), i, device=x0.device, dtype=torch.long)
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            x_t = self.q_sample(x0, t, noise)
            terms, pred_x0 = self.vb_terms_bpd(model, x0, x_t, t, clip_denoised, model_kwargs)
            vb[:, i] = terms
            x0_mse[:, i] = mean_flat((pred_x0 - x0) ** 2)
            mse[:, i] = mean_flat((self.predict_eps_from_x0(x_t, t, pred_x0) - noise) ** 2)
        prior = self.prior_bpd(x0)
        return {"total_bpd": vb.sum(1) + prior, "prior_bpd": prior, "vb": vb, "mse": mse, "x0_mse": x0_mse}

    # ----------------------------------------------------------------- training objective
    def training_losses(self, model, x0, t, noise=None, model_kwargs=None) -> dict[str, torch.Tensor]:
        """Per-example losses [B] for x0: [B, C, H, W] in [-1, 1] and t: int64 [B].

        "mse": |target - output|^2 averaged over pixels (L_simple, DDPM eq. 14; target eps, x0 or v).
        "vb": L_t in bits/dim with the model's mean detached (IDDPM Sec. 3.1 stop-gradient), so it only
            trains the variance; for fixed variance it is reported without gradient.
        "loss": w_t * mse (+ vb * T/1000 for rescaled_mse = L_hybrid with lambda=0.001, + vb for mse) when the
            variance is learned; for kl / rescaled_kl the full L_t (times T when rescaled) with gradients.
            w_t = mse_weights[t] is diffusion.loss_weighting's weight (snr_loss_weight; 1 for none); "mse"
            is reported unweighted and the VLB term is never weighted.
        """
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.q_sample(x0, t, noise)
        x_in = self.param.network_input(x_t, *self._alpha_sigma(t, x_t))
        out = model(x_in, self.timestep_map.to(t.device)[t], **(model_kwargs or {}))
        if self.loss_type in ("kl", "rescaled_kl"):
            vb, _ = self.vb_terms_bpd(model, x0, x_t, t, model_output=out)
            scale = self.num_timesteps if self.loss_type == "rescaled_kl" else 1.0
            target = self._mse_target(x0, t, noise)
            mse = mean_flat((target - self.split_model_output(out, x_t)[0].detach()) ** 2)
            return {"loss": vb * scale, "mse": mse, "vb": vb}
        mean_out, var_out = self.split_model_output(out, x_t)
        mse = mean_flat((self._mse_target(x0, t, noise) - mean_out) ** 2)
        weighted = mse if self.loss_weighting == "none" else extract(self.mse_weights, t, mse) * mse
        # Stop-gradient on the mean: the VLB term sees a frozen mean, trainable variance (if any).
        frozen = mean_out.detach() if var_out is None else torch.cat([mean_out.detach(), var_out], dim=1)
        if var_out is None:
            with torch.no_grad():
                vb, _ = self.vb_terms_bpd(model, x0, x_t, t, model_output=frozen)
            return {"loss": weighted, "mse": mse, "vb": vb}
        vb, _ = self.vb_terms_bpd(model, x0, x_t, t, model_output=frozen)
        scale = self.num_timesteps / 1000.0 if self.loss_type == "rescaled_mse" else 1.0
        return {"loss": weighted + scale * vb, "mse": mse, "vb": vb}

    def _mse_target(self, x0, t, noise):
        return self.param.target(x0, noise, *self._alpha_sigma(t, x0))

    def _alpha_sigma(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t) = (sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)) at int64 t [B], as [B, 1, 1, 1]."""
        return extract(self.sqrt_alphas_cumprod, t, like), extract(self.sqrt_one_minus_alphas_cumprod, t, like)
