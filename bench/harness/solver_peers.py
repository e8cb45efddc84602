"""Our solvers beside diffusers' schedulers on exact models: each run's own error against the exact
probability-flow answer (diffusion_lab.diffusion.analytic), so that defaults can be compared with the peer's.

    case = Case("gaussian", "linear")                          # exact model, process, x_T (64 x 16 pixels)
    ours_error(case, "dpmpp_2m", steps=10, spacing="trailing")  # our method with our defaults (or options)
    peer_error(case, "dpmpp_2m", steps=10, timestep_spacing="trailing")   # diffusers' with its defaults

A run's error is the RMS difference between what it returns and the exact answer for the noise it started from:
`solution(x, t_first, 0)`, the exact probability flow from the state the model first saw, at the time it saw it,
down to t = 0, then the exact denoiser there (the best any sampler can return). Every run has the same target,
so a grid that stops early (diffusers' default `linspace` ends at t = 100 for 10 steps, `trailing` at t = 99, and
jumps to the x0 prediction from there) pays for the blur of that last jump, as it does on a real network. Used
by bench/solver_peers.py and tests/test_solver_peers.py (diffusers is in the `dev` extra).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from diffusion_lab.diffusion import GaussianData, GaussianDiffusion, PointMixture, Sampler
from diffusion_lab.diffusion.respace import AUTO_LOGSNR_FROM

F64 = torch.float64

# Our method -> (diffusers scheduler, the config that makes it that method; everything else is diffusers' default).
# diffusers has no iPNDM for a variance-preserving process: its peer is the published fixed Adams-Bashforth weights
# (k-diffusion's / ComfyUI's sample_ipndm formula: our ipndm with variable_step=False) on k-diffusion's usual
# Karras grid.
PEERS = {
    "ddim": ("DDIMScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_3m": ("DPMSolverMultistepScheduler", {"solver_order": 3}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
}
OWN_PEERS = {"ipndm": ({"variable_step": False}, "karras")}
# diffusers' options that put its grid on one of ours (for the same-grid columns); None: it has no such option.
PEER_GRIDS = {
    "trailing": {"timestep_spacing": "trailing"},
    "karras": {"use_karras_sigmas": True},
    "logsnr": {"use_lu_lambdas": True},  # DPMSolverMultistepScheduler only
}


def mixture() -> PointMixture:
    """Eight points in 16 dimensions (4x4 images in [-0.8, 0.8]) blurred by s = 0.05: a multimodal target."""
    g = torch.Generator().manual_seed(7)
    return PointMixture((torch.rand(8, 1, 4, 4, generator=g, dtype=F64) * 1.6 - 0.8), s=0.05)


DATA = {"gaussian": lambda: GaussianData(mu=0.1, s=0.5), "mixture": mixture}


@dataclass
class Case:
    """An exact model (`data`: gaussian | mixture) of a process (`schedule`, T = 1000), and x_T [64, 1, 4, 4]."""

    data_name: str
    schedule: str = "linear"
    batch: int = 64
    data: object = field(init=False)
    diffusion: GaussianDiffusion = field(init=False)
    x_T: torch.Tensor = field(init=False)

    def __post_init__(self):
        self.data = DATA[self.data_name]()
        self.diffusion = GaussianDiffusion.from_schedule(self.schedule, 1000)
        self.x_T = torch.randn((self.batch, 1, 4, 4), generator=torch.Generator().manual_seed(0), dtype=F64)

    def recording_model(self):
        """(model, calls): the exact eps model, recording each call's (x, t) in `calls`."""
        exact, calls = self.data.model(self.diffusion), []

        def model(x, t, **kw):
            t = torch.as_tensor(t, dtype=F64).reshape(-1).expand(x.shape[0])
            calls.append((x, float(t[0])))
            return exact(x, t, **kw)

        return model, calls

    def error(self, out: torch.Tensor, calls: list) -> float:
        """RMS of out - the exact answer for the state and time of the first model call, ending at t = 0."""
        x_first, t_first = calls[0]
        return (out - self.data.solution(self.diffusion, x_first, t_first, 0.0)).pow(2).mean().sqrt().item()


def ours_run(case: Case, method: str, steps: int, spacing: str | None = None, **options) -> tuple[torch.Tensor, list]:
    """(output, model calls) of `Sampler(method, steps, spacing, **options)` (clipping off) on the exact model."""
    model, calls = case.recording_model()
    sampler = Sampler(method, steps=steps, spacing=spacing, clip_denoised=False, **options)
    return sampler(case.diffusion, model, case.x_T), calls


def peer_run(case: Case, method: str, steps: int, **config) -> tuple[torch.Tensor, list]:
    """(output, model calls) of diffusers' scheduler for `method` (PEERS) with its defaults updated by `config`, run
    as diffusers' pipelines run it: x_T scaled by init_noise_sigma, scale_model_input before each call, step()
    after. The scheduler gets our process's betas (float64 -> its float32)."""
    if method in OWN_PEERS:
        options, grid = OWN_PEERS[method]
        return ours_run(case, method, steps, config.pop("spacing", grid), **options, **config)
    import diffusers

    name, base = PEERS[method]
    sch = getattr(diffusers, name)(num_train_timesteps=case.diffusion.num_timesteps,
                                   trained_betas=case.diffusion.betas.numpy(), **{**base, **config})
    sch.set_timesteps(steps)
    model, calls = case.recording_model()
    x = case.x_T * sch.init_noise_sigma
    for t in sch.timesteps:
        eps = model(sch.scale_model_input(x, t).to(F64), t)
        x = sch.step(eps, t, x).prev_sample.to(F64)
    return x, calls


def ours_error(case: Case, method: str, steps: int, spacing: str | None = None, **options) -> float:
    return case.error(*ours_run(case, method, steps, spacing, **options))


def peer_error(case: Case, method: str, steps: int, **config) -> float:
    return case.error(*peer_run(case, method, steps, **config))


# Where our default differs from the peer's, the MNIST cells (bench/solver_defaults.py) that compare the two
# choices, with everything else equal: method -> (NFE from which it applies, our cell, the peer-like cell), a cell
# being (options, grid). 2M / 3M / UniPC: the logsnr half of our auto grid against diffusers' kind of grid
# (trailing); iPNDM: our trailing grid against k-diffusion's Karras grid, both with the published weights.
EVIDENCE = {
    "dpmpp_2m": (AUTO_LOGSNR_FROM, ({}, "logsnr"), ({}, "trailing")),
    "dpmpp_3m": (AUTO_LOGSNR_FROM, ({}, "logsnr"), ({}, "trailing")),
    "unipc": (AUTO_LOGSNR_FROM, ({"order": 2}, "logsnr"), ({"order": 2}, "trailing")),
    "ipndm": (0, ({"variable_step": False}, "trailing"), ({"variable_step": False}, "karras")),
}


def cell_key(method: str, options: dict, spacing: str, nfe: int, seed: int) -> str:
    """bench/solver_defaults.py's cache key of one MNIST cell."""
    opts = ",".join(f"{k}={v}" for k, v in sorted(options.items()))
    return f"{method}[{opts}]@{spacing}/nfe{nfe}/seed{seed}"


def load_cells(path) -> dict:
    import json

    return json.loads(path.read_text())["cells"] if path.exists() else {}


def explained(method: str, nfe: int, cells: dict, seeds=(0, 1)) -> str | None:
    """The MNIST evidence for a cell where our default is less accurate than the peer's on the exact model: at the
    measured NFE nearest to `nfe` (from EVIDENCE's first NFE on), our choice beat the peer-like one by more than
    the spread between the two seeds of either. None when there is no such record."""
    if method not in EVIDENCE:
        return None
    start, (ours_opts, ours_grid), (peer_opts, peer_grid) = EVIDENCE[method]

    def fids(opts, grid, n):
        return [cells.get(cell_key(method, opts, grid, n, s), {}).get("fid") for s in seeds]

    nfes = sorted({c["nfe"] for c in cells.values() if c["method"] == method and c["nfe"] >= start})
    measured = [n for n in nfes if None not in fids(ours_opts, ours_grid, n) + fids(peer_opts, peer_grid, n)]
    if nfe < start or not measured:
        return None
    k = min(measured, key=lambda m: (abs(m - nfe), m))
    a, b = fids(ours_opts, ours_grid, k), fids(peer_opts, peer_grid, k)
    gain, spread = min(y - x for x, y in zip(a, b)), max(abs(a[0] - a[1]), abs(b[0] - b[1]))
    if gain <= spread:
        return None
    return (f"MNIST NFE {k}: {ours_grid} {a[0]:.1f} / {a[1]:.1f} vs {peer_grid} {b[0]:.1f} / {b[1]:.1f} "
            f"(gain {gain:.1f} > seed spread {spread:.1f})")


def peer_nfe(method: str, steps: int) -> int:
    """Network evaluations of the peer's run at `steps` (diffusers' Heun: 2 steps - 1, as ours)."""
    return 2 * steps - 1 if method == "heun" else steps


def ratio(ours: float, peer: float) -> float:
    return ours / peer if peer > 0 else math.inf
