"""The diffusion math: plain PyTorch, no network, no Lightning (see ARCHITECTURE.md, rule 1)."""

from .analytic import GaussianData, PointMixture
from .continuous import EDM, Flow
from .gaussian import LOSS_TYPES, LOSS_WEIGHTINGS, MEAN_TYPES, VAR_TYPES, GaussianDiffusion, snr_loss_weight
from .inpaint import paint
from .losses import discretized_gaussian_log_likelihood, mean_flat, normal_kl
from .parameterization import PARAMETERIZATIONS, Parameterization, parameterization
from .process import Process
from .registry import METHODS, Method, get_method
from .respace import sampling_times, space_timesteps
from .sampler_spec import Sampler
from .samplers import ClassifierFreeGuidance, ddim_invert, ddim_sample, ddpm_sample, sample_loop, slerp
from .schedules import SCHEDULES, get_betas, rescale_zero_terminal_snr
from .seeding import ImageGenerators, draw, image_seed, noise_like
from .solvers import dpmpp_2m, dpmpp_3m, euler, euler_ancestral, heun, ipndm, ode_invert, unipc
from .timesteps import LossAwareTimestepSampler, LossSecondMomentSampler, UniformSampler, UniformTimestepSampler

__all__ = [
    "GaussianDiffusion",
    "EDM",
    "Flow",
    "get_betas",
    "rescale_zero_terminal_snr",
    "snr_loss_weight",
    "space_timesteps",
    "sampling_times",
    "dpmpp_2m",
    "dpmpp_3m",
    "unipc",
    "ipndm",
    "euler",
    "heun",
    "euler_ancestral",
    "ode_invert",
    "GaussianData",
    "PointMixture",
    "Method",
    "get_method",
    "ddpm_sample",
    "ddim_sample",
    "ddim_invert",
    "paint",
    "slerp",
    "sample_loop",
    "ImageGenerators",
    "image_seed",
    "noise_like",
    "draw",
    "ClassifierFreeGuidance",
    "Sampler",
    "UniformTimestepSampler",
    "LossAwareTimestepSampler",
    "UniformSampler",  # deprecated names of the two above
    "LossSecondMomentSampler",
    "normal_kl",
    "discretized_gaussian_log_likelihood",
    "mean_flat",
    "SCHEDULES",
    "MEAN_TYPES",
    "PARAMETERIZATIONS",
    "Process",
    "Parameterization",
    "parameterization",
    "VAR_TYPES",
    "LOSS_TYPES",
    "LOSS_WEIGHTINGS",
    "METHODS",
]
