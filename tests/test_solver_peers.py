"""Our multistep solvers beside diffusers' schedulers on the exact Gaussian model (bench/harness/solver_peers.py):
the same update where the algorithm is the same, and our defaults never less accurate than diffusers' defaults,
except where bench/solver_defaults.py recorded an MNIST FID win for our choice (issue 33)."""

import pytest
import torch

from bench.harness.common import results_dir
from bench.harness.solver_peers import Case, cell_key, explained, load_cells, ours_error, ours_run, peer_error, peer_run
from diffusion_lab.diffusion.respace import sampling_times

LIMIT = 1.1
MULTISTEP = ["dpmpp_2m", "dpmpp_3m", "unipc", "ipndm"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def case():
    return Case("gaussian", "linear")  # the setting: linear betas, T = 1000, clipping off


@pytest.mark.parametrize("steps", [5, 10, 20])
def test_same_update_as_diffusers_on_the_same_grid(case, steps):
    """On diffusers' trailing grid, at diffusers' settings, our 2M, 3M (published weight) and UniPC-2/-3 return
    diffusers' outputs up to its float32 arithmetic, visiting the same times."""
    pairs = [("dpmpp_2m", {}, {}), ("dpmpp_3m", {}, {}), ("unipc", {}, {}),
             ("unipc", {"order": 3}, {"solver_order": 3})]  # fmt: skip
    for method, ours_opts, peer_opts in pairs:
        a, calls_a = ours_run(case, method, steps, "trailing", **ours_opts)
        b, calls_b = peer_run(case, method, steps, timestep_spacing="trailing", **peer_opts)
        assert [t for _, t in calls_a] == [t for _, t in calls_b], method
        assert (a - b).abs().max().item() < 1e-5, (method, ours_opts, (a - b).abs().max().item())


@pytest.mark.parametrize("steps,eta", [(10, 0.0), (10, 1.0), (50, 1.0)])
def test_ddim_equals_diffusers_ddim_scheduler(case, steps, eta):
    """The one DDIM (solvers.ddim) on its default "ddim" grid is diffusers' DDIMScheduler with leading spacing and
    alpha_bar = 1 after the last step: the same times visited and the same output up to diffusers' float32 tables;
    with eta = 1 both add the same noise (ours drawn from a generator, diffusers given it as variance_noise)."""
    import diffusers

    from diffusion_lab.diffusion import solvers

    sch = diffusers.DDIMScheduler(num_train_timesteps=1000, trained_betas=case.diffusion.betas.numpy(),
                                  clip_sample=False, set_alpha_to_one=True, timestep_spacing="leading")  # fmt: skip
    sch.set_timesteps(steps)
    theirs_model, theirs_calls = case.recording_model()
    x, draws = case.x_T, torch.Generator().manual_seed(3)
    for t in sch.timesteps:
        z = torch.randn(x.shape, generator=draws, dtype=x.dtype) if eta else None
        x = sch.step(theirs_model(x, t), t, x, eta=eta, variance_noise=z).prev_sample.to(x.dtype)
    ours_model, ours_calls = case.recording_model()
    ts = sorted(int(t) for t in sch.timesteps)
    ours = solvers.ddim(case.diffusion, ours_model, case.x_T, ts, eta=eta, clip_denoised=False,
                        generator=torch.Generator().manual_seed(3))  # fmt: skip
    assert [t for _, t in ours_calls] == [t for _, t in theirs_calls]
    assert ts == sampling_times(case.diffusion, "ddim", steps)
    assert (ours - x).abs().max().item() < 1e-5, (ours - x).abs().max().item()
    if eta:
        plain = solvers.ddim(case.diffusion, ours_model, case.x_T, ts, eta=0.0, clip_denoised=False)
        assert (ours - plain).abs().max().item() > 0.1  # the noise mattered


@pytest.mark.parametrize("method", MULTISTEP)
def test_default_is_at_least_as_accurate_as_the_peer_or_won_on_mnist(case, method):
    """At 10, 20 and 40 trailing steps and on our default grid at NFE 5-80 (against diffusers' defaults, its
    linspace grid) the error is at most 1.1x the peer's, or the cell is on the logsnr part of our `auto` grid where
    bench/results/solver_defaults.json records logsnr beating trailing on MNIST by more than two seeds' spread."""
    peer = (lambda n, **kw: peer_error(case, method, n, **kw))
    for n in (10, 20, 40):
        trailing = {"spacing": "trailing"} if method == "ipndm" else {"timestep_spacing": "trailing"}
        ours, theirs = ours_error(case, method, n, "trailing"), peer(n, **trailing)
        assert ours <= LIMIT * theirs, (method, "trailing", n, ours, theirs)
    cells = load_cells(results_dir() / "solver_defaults.json")
    for n in (5, 6, 8, 10, 12, 15, 20, 25, 30, 40, 50, 60, 80):
        ours, theirs = ours_error(case, method, n), peer(n)
        assert ours <= LIMIT * theirs or explained(method, n, cells), (method, n, ours, theirs)


def test_the_exception_needs_a_recorded_win():
    """explained() refuses a cell before the NFE where our choice differs, a method without records, and a gain
    inside the spread between the seeds."""
    fids = {("logsnr", 20): (30.0, 31.0), ("trailing", 20): (34.0, 35.0), ("logsnr", 50): (30.0, 33.0),
            ("trailing", 50): (31.0, 34.0)}  # fmt: skip
    cells = {cell_key("dpmpp_2m", {}, grid, n, seed): {"method": "dpmpp_2m", "nfe": n, "fid": f[seed]}
             for (grid, n), f in fids.items() for seed in (0, 1)}  # fmt: skip
    assert explained("dpmpp_2m", 25, cells).startswith("MNIST NFE 20: logsnr 30.0 / 31.0 vs trailing 34.0")
    assert explained("dpmpp_2m", 10, cells) is None and explained("unipc", 20, cells) is None
    assert explained("dpmpp_2m", 60, cells) is None  # nearest is NFE 50: gain 1.0 inside the spread 3.0
