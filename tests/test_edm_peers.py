"""Our EDM samplers against k-diffusion's (Crowson; the reference implementation of Karras et al. 2022's samplers)
on the same sigmas and the same exact denoiser: Heun (Alg. 1), Heun with churn (Alg. 2), Euler and
DPM-Solver++(2M). On EDM alpha = 1, so our state and k-diffusion's x are the same variable, and its denoiser
D(x; sigma) is our process's x0 prediction at t_at_sigma(sigma).

k-diffusion is installed without its requirements (Makefile): they pull numpy<2 and its training stack (clean-fid,
CLIP, kornia, scikit-image), which its package __init__ imports but sampling.py does not, so sampling.py is loaded
without the __init__ (_kdiffusion_sampling)."""

import importlib
import importlib.util
import math
import sys
import types

import pytest
import torch

from diffusion_lab.diffusion import solvers as S
from diffusion_lab.diffusion.analytic import PointMixture
from diffusion_lab.diffusion.continuous import EDM
from diffusion_lab.diffusion.respace import sampling_times
from diffusion_lab.diffusion.seeding import noise_like

F64 = torch.float64
POINTS = torch.tensor([[-0.6, 0.2, 0.9, -0.1], [0.5, -0.4, 0.1, 0.7], [0.0, 0.8, -0.8, 0.3]], dtype=F64)
DATA = PointMixture(POINTS.reshape(3, 1, 2, 2), s=0.2)  # a denoiser far from linear: samplers that differ, differ

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def kd():
    """k-diffusion's sampling module (k_diffusion/sampling.py and the utils.py it imports)."""
    spec = importlib.util.find_spec("k_diffusion")  # finds the package without running its __init__
    if spec is None:
        pytest.skip("k-diffusion is not installed (make install puts it in .venv with --no-deps)")
    saved = {k: v for k, v in sys.modules.items() if k == "k_diffusion" or k.startswith("k_diffusion.")}
    package = types.ModuleType("k_diffusion")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["k_diffusion"] = package
    try:
        yield importlib.import_module("k_diffusion.sampling")
    finally:
        for k in [k for k in sys.modules if k == "k_diffusion" or k.startswith("k_diffusion.")]:
            del sys.modules[k]
        sys.modules.update(saved)


def _setup(steps: int, drop_top: int = 0):
    """(process, exact model, our solver times, their sigmas, x at the first sigma): EDM's rho = 7 grid (eq. 5)."""
    edm = EDM()
    model = DATA.model(edm)
    ts = sampling_times(edm, "karras", steps + drop_top)
    ts = ts[: len(ts) - drop_top]  # ascending: the top `drop_top` levels left out
    sigmas = torch.tensor([float(edm.sigma_at(t)) for t in reversed(ts)] + [0.0], dtype=F64)
    x = sigmas[0] * torch.randn(8, 1, 2, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    return edm, model, ts, sigmas, x


def _denoiser(edm, model):
    """k-diffusion's model(x, sigma) -> D(x; sigma) from our process (sigma: [B])."""

    def denoise(x, sigma):
        t = edm.t_at_sigma(sigma.to(F64))
        return edm.denoise(model, x, t, None, False)[0]

    return denoise


@pytest.mark.parametrize("steps", [5, 18, 40])
@pytest.mark.parametrize("method", ["heun", "euler", "dpmpp_2m"])
def test_deterministic_samplers_equal_k_diffusions(kd, method, steps):
    edm, model, ts, sigmas, x = _setup(steps)
    assert float(sigmas[0]) == pytest.approx(80.0) and float(sigmas[-2]) == pytest.approx(0.002)
    theirs = getattr(kd, f"sample_{method}")(_denoiser(edm, model), x.clone(), sigmas, disable=True)
    ours = getattr(S, method)(edm, model, x.clone(), ts, clip_denoised=False)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-10)


@pytest.mark.parametrize("method", ["heun", "euler"])
def test_churn_equals_k_diffusions_algorithm_2(kd, method, monkeypatch):
    """S_churn > 0 on every level (S_tmin = 0, S_tmax = inf), the same noise drawn in the same order: the grid's top
    level is left out so that sigma_hat = (1 + gamma) sigma stays below sigma_max = 80 (ours caps it there, the
    model knows no higher level; k-diffusion does not)."""
    edm, model, ts, sigmas, x = _setup(12, drop_top=1)
    churn = dict(s_churn=2.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.003)
    gamma = min(churn["s_churn"] / (len(sigmas) - 1), math.sqrt(2) - 1)
    assert float(sigmas[0]) * (1 + gamma) < 80.0 and gamma > 0
    theirs_noise = torch.Generator().manual_seed(7)
    monkeypatch.setattr(kd.torch, "randn_like", lambda t: noise_like(t, theirs_noise))
    theirs = getattr(kd, f"sample_{method}")(_denoiser(edm, model), x.clone(), sigmas, disable=True, **churn)
    monkeypatch.undo()
    ours = getattr(S, method)(edm, model, x.clone(), ts, clip_denoised=False,
                              generator=torch.Generator().manual_seed(7), **churn)  # fmt: skip
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-10)
    plain = getattr(S, method)(edm, model, x.clone(), ts, clip_denoised=False)
    assert (ours - plain).abs().max() > 1e-3  # the churn did something


def test_karras_grid_equals_k_diffusions(kd):
    """get_sigmas_karras(n, 0.002, 80, rho=7) is our spacing=karras on EDM (then a 0 appended)."""
    _, _, _, sigmas, _ = _setup(18)
    theirs = kd.get_sigmas_karras(18, 0.002, 80.0, rho=7.0).to(F64)
    torch.testing.assert_close(sigmas, theirs, rtol=1e-6, atol=0)  # theirs is float32
