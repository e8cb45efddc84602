"""Same seed, same samples: an image depends on (seed, its index) only, never on the batch size, which other
images are drawn with it, or what was sampled before (diffusion/seeding.py, eval/scoring.py). The DDP side (1 vs
2 ranks) is in tests/test_ddp.py."""

import pytest
import torch

from diffusion_lab.data import to_uint8
from diffusion_lab.diffusion import GaussianDiffusion, ImageGenerators, Sampler, image_seed, noise_like
from diffusion_lab.lit import DiffusionModule
from diffusion_lab.nets import UNet

pytestmark = pytest.mark.usefixtures("one_thread")


def _module(conditional: bool) -> DiffusionModule:
    """A small U-Net with random (not zero-initialised) weights on a 100-step process."""
    torch.manual_seed(0)
    net = UNet(image_size=8, in_channels=1, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
               attention_resolutions=(4,), num_classes=3 if conditional else None)  # fmt: skip
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return DiffusionModule(net, GaussianDiffusion.from_schedule("linear", 100))


STOCHASTIC = [Sampler("ddpm", 10), Sampler("euler_ancestral", 6), Sampler("ddim", 6, eta=1.0),
              Sampler("heun", 3, s_churn=1.0)]  # Karras Alg. 2's churn noise, drawn per image too


@pytest.mark.parametrize("conditional", [False, True], ids=["unconditional", "class-conditional"])
def test_images_do_not_depend_on_the_batch_size(conditional):
    """Bit-identical uint8 images for batch_size 1, 7 and 64, for a deterministic solver and the stochastic ones
    (and, class-conditional, with random labels and guidance); a slice of indices drawn alone is the same slice.
    (Without seeding.PaddedModel, batch 1 differed in the last float bits and flipped a pixel under guidance.)"""
    module = _module(conditional)
    samplers = [Sampler("dpmpp_2m", 6), *STOCHASTIC]
    if conditional:
        samplers += [s.replace(guidance_scale=2.0) for s in samplers]
    for s in samplers:
        ref = to_uint8(module.sample(64, s, seed=3, batch_size=64))
        assert torch.equal(to_uint8(module.sample(64, s, seed=3, batch_size=7)), ref), s.name
        assert torch.equal(to_uint8(module.sample(6, s, seed=3, batch_size=1)), ref[:6]), s.name
        assert torch.equal(to_uint8(module.sample(10, s, seed=3, start=20, batch_size=4)), ref[20:30]), s.name
        assert not torch.equal(to_uint8(module.sample(10, s, seed=4, start=20)), ref[20:30]), s.name


def test_labels_x_T_and_noise_come_from_the_image_generator():
    """Image i's label, x_T and noise are the draws of generator image_seed(seed, i), in that order."""
    module = _module(True)
    seen = {}

    def spy(diffusion, model, x_T, model_kwargs=None, generator=None, **_):
        seen.update(x_T=x_T, y=model_kwargs["y"], z=noise_like(x_T, generator))
        return x_T.clamp(-1, 1)

    from diffusion_lab.diffusion import draw

    draw(module.diffusion, module.net, spy, (1, 8, 8), seed=5, indices=[2, 9], num_classes=3)
    for k, i in enumerate([2, 9]):
        g = torch.Generator().manual_seed(image_seed(5, i))
        y = torch.randint(0, 3, (1,), generator=g)
        x_T, z = torch.randn((1, 8, 8), generator=g), torch.randn((1, 8, 8), generator=g)
        assert seen["y"][k] == y[0] and torch.equal(seen["x_T"][k], x_T) and torch.equal(seen["z"][k], z)
    assert image_seed(0, 1) != image_seed(1, 0)


def test_what_was_sampled_before_changes_nothing():
    """The order of a grid changes no image: each sampler starts from fresh per-image generators."""
    module = _module(False)
    a, b = Sampler("ddim", 6, eta=1.0), Sampler("euler_ancestral", 6)
    first = [to_uint8(module.sample(8, s, seed=1)) for s in (a, b)]
    second = [to_uint8(module.sample(8, s, seed=1)) for s in (b, a)]
    assert torch.equal(first[0], second[1]) and torch.equal(first[1], second[0])


def test_image_generators_refuse_a_batch_of_another_size():
    with pytest.raises(ValueError, match="2 image generators for a batch of 3"):
        noise_like(torch.zeros(3, 1, 2, 2), ImageGenerators.for_images(0, [0, 1]))


def test_a_progress_bar_counts_the_images_and_changes_none(monkeypatch):
    """Issue 45: evaluate.py's sampling shows one bar counting images over its batches (a terminal only: tqdm's
    disable=None), and drawing with it gives the same images."""
    from diffusion_lab.diffusion import seeding

    counts = []

    class Bar:
        def __init__(self, total, **kw):
            counts.append(["total", total, kw.get("unit"), kw.get("disable", False)])

        def update(self, n):
            counts.append(n)

        def close(self):
            counts.append("closed")

    monkeypatch.setattr(seeding, "tqdm", Bar)
    module, s = _module(False), Sampler("ddim", 4, eta=1.0)
    quiet = to_uint8(module.sample(10, s, seed=5, batch_size=4))
    assert counts == []
    assert torch.equal(to_uint8(module.sample(10, s, seed=5, batch_size=4, progress=True)), quiet)
    assert counts == [["total", 10, "img", None], 4, 4, 2, "closed"]
