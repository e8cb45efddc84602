"""Timestep samplers (improved-diffusion's "schedule samplers"): which t each training example gets, and its
importance weight. Not to be confused with the reverse-process samplers (sampler_spec.Sampler).

`sample(batch_size, device) -> (t int64 [B], weights float32 [B])` with weights = 1 / (T p_t), so
mean(weights * L_t) is an unbiased estimate of the uniform-t mean loss. The loss-aware sampler is
Improved DDPM's (Nichol & Dhariwal 2021, Sec. 3.3, eq. 18): p_t ~ sqrt(E[L_t^2]).
Sampling draws on the CPU (from `generator`, else the global RNG) so that every device is reproducible.
No torch.distributed here: the caller passes losses gathered from every rank to `update`.
"""

from __future__ import annotations

import warnings

import torch

from ..checks import check_count, check_number


class UniformTimestepSampler:
    """p_t = 1/T for every t; weights are all 1."""

    def __init__(self, num_timesteps: int):
        self.num_timesteps = int(num_timesteps)

    def probabilities(self) -> torch.Tensor:
        """float64 [T], sums to 1."""
        return torch.full((self.num_timesteps,), 1.0 / self.num_timesteps, dtype=torch.float64)

    def sample(self, batch_size: int, device=None, generator: torch.Generator | None = None):
        p = self.probabilities()
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        weights = 1.0 / (self.num_timesteps * p[t])
        return t.to(device), weights.float().to(device)

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Uniform sampling ignores losses."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class LossAwareTimestepSampler(UniformTimestepSampler):
    """IDDPM importance sampling: p_t proportional to sqrt(mean of the last `history_per_term` L_t^2).

    Uniform until every t has a full history; then mixed with `uniform_prob` of the uniform
    distribution so that no p_t is ever 0.
    """

    def __init__(self, num_timesteps: int, history_per_term: int = 10, uniform_prob: float = 0.001):
        super().__init__(num_timesteps)
        self.history_per_term = check_count("timesteps.history_per_term", history_per_term)
        self.uniform_prob = check_number("timesteps.uniform_prob", uniform_prob, maximum=1.0)
        self.history = torch.zeros(self.num_timesteps, self.history_per_term, dtype=torch.float64)
        self.counts = torch.zeros(self.num_timesteps, dtype=torch.long)

    def warmed_up(self) -> bool:
        return bool((self.counts == self.history_per_term).all())

    def probabilities(self) -> torch.Tensor:
        if not self.warmed_up():
            return super().probabilities()
        p = torch.sqrt((self.history**2).mean(dim=-1))
        p = p / p.sum()
        return p * (1 - self.uniform_prob) + self.uniform_prob / self.num_timesteps

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Append each (t, loss) pair in order; t and losses are [N] (all ranks' examples, unweighted).

        Row t of `history` keeps its last `history_per_term` losses, oldest first, in columns [0, counts[t]).
        Vectorised over the batch (a per-example Python loop cost 13 ms per step for 8 ranks x 128).
        """
        t = t.detach().cpu().long().reshape(-1)
        losses = losses.detach().cpu().double().reshape(-1)
        if t.numel() == 0:
            return
        K = self.history_per_term
        order = torch.sort(t, stable=True).indices  # group equal t, keeping arrival order within a group
        t, losses = t[order], losses[order]
        rows, inverse, n_new = torch.unique_consecutive(t, return_inverse=True, return_counts=True)
        first = torch.cumsum(n_new, 0) - n_new
        rank = torch.arange(t.numel()) - first[inverse]  # position of each loss among its t's new losses
        old_count = self.counts[rows]
        new_count = (old_count + n_new).clamp(max=K)
        dropped = old_count + n_new - new_count  # oldest entries pushed out of each row
        # Surviving old entries move left by `dropped`.
        src = torch.arange(K)[None, :] + dropped[:, None]  # [U, K] old column feeding each new column
        keep_old = src < old_count[:, None]
        block = torch.where(keep_old, self.history[rows].gather(1, src.clamp(max=K - 1)), 0.0)
        # New losses land after them; those pushed out within this same batch are skipped.
        pos = old_count[inverse] + rank - dropped[inverse]
        fits = pos >= 0
        block[inverse[fits], pos[fits]] = losses[fits]
        self.history[rows] = block
        self.counts[rows] = new_count

    def state_dict(self) -> dict:
        return {"history": self.history.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state: dict) -> None:
        if "history" not in state or "counts" not in state:
            raise ValueError(
                "timesteps: the saved timestep-sampler state has no loss history (it was a uniform sampler); "
                "resume with the run's own timesteps config"
            )
        if state["history"].shape != self.history.shape:
            raise ValueError(
                f"timestep sampler state has shape {tuple(state['history'].shape)}, "
                f"expected {tuple(self.history.shape)}"
            )
        self.history = state["history"].clone().double()
        self.counts = state["counts"].clone().long()


class UniformSampler(UniformTimestepSampler):
    """Deprecated name of UniformTimestepSampler (kept importable for one release)."""

    def __init__(self, *args, **kwargs):
        warnings.warn("UniformSampler is now UniformTimestepSampler", DeprecationWarning, stacklevel=2)
        super().__init__(*args, **kwargs)


class LossSecondMomentSampler(LossAwareTimestepSampler):
    """Deprecated name of LossAwareTimestepSampler (kept importable for one release)."""

    def __init__(self, *args, **kwargs):
        warnings.warn("LossSecondMomentSampler is now LossAwareTimestepSampler", DeprecationWarning, stacklevel=2)
        super().__init__(*args, **kwargs)


class ProcessTimeSampler:
    """The training times of a continuous process (diffusion/continuous.py: EDM's lognormal sigma, flow's uniform
    or logit-normal t), drawn by the process itself: `timesteps=own`. Weights are all 1; nothing to update or save.
    Built without a process from the config; the DiffusionModule binds it to its process."""

    def __init__(self, process=None):
        self.process = process
        self.num_timesteps = None if process is None else process.num_timesteps

    def sample(self, batch_size: int, device=None, generator: torch.Generator | None = None):
        """(u float64 [B] in the process's own variable, weights float32 [B] of ones)."""
        u = self.process.sample_u(batch_size, generator)
        return u.to(device), torch.ones(batch_size, device=device)

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """The process's distribution does not learn from losses."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

