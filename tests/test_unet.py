import pytest
import torch

from diffusion_lab.nets import UNet, count_parameters


@pytest.mark.parametrize(
    "kw,in_ch,size,out_ch",
    [
        (dict(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,)), 1, 8, 1),
        (dict(base_channels=16, channel_mult=(1, 2, 2), attention_resolutions=(8,), learn_sigma=True), 3, 16, 6),
        (dict(base_channels=8, channel_mult=(1,), attention_resolutions=(), num_classes=10), 1, 8, 1),
        (dict(base_channels=32, channel_mult=(1, 2), attention_resolutions=(16,), num_heads=4), 3, 16, 3),
    ],
)
def test_output_shapes(kw, in_ch, size, out_ch):
    net = UNet(image_size=size, in_channels=in_ch, **kw)
    y = torch.tensor([1, 2]) if kw.get("num_classes") else None
    out = net(torch.randn(2, in_ch, size, size), torch.tensor([0, 999]), y=y)
    assert out.shape == (2, out_ch, size, size)


def test_ddpm_cifar10_param_count():
    net = UNet(
        image_size=32,
        in_channels=3,
        base_channels=128,
        channel_mult=(1, 2, 2, 2),
        num_res_blocks=2,
        attention_resolutions=(16,),
        dropout=0.1,
    )
    assert abs(count_parameters(net) - 35.7e6) / 35.7e6 < 0.01


def test_small_grey_32_param_count():
    net = UNet(
        image_size=32,
        in_channels=1,
        base_channels=32,
        channel_mult=(1, 2, 2, 2),
        num_res_blocks=1,
        attention_resolutions=(16,),
    )
    assert 1.4e6 < count_parameters(net) < 1.8e6


def _perturbed(net):
    # the last conv is zero-initialised (output 0 at init); give it weights so the test sees the network
    torch.manual_seed(0)
    for p in net.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    return net.eval()


def test_time_conditioning_changes_output():
    net = _perturbed(
        UNet(image_size=8, in_channels=1, base_channels=16, channel_mult=(1, 2), attention_resolutions=(4,))
    )
    x = torch.randn(1, 1, 8, 8)
    a, b = net(x, torch.tensor([10])), net(x, torch.tensor([900]))
    assert (a - b).abs().max().item() > 1e-3


def test_class_conditioning_and_null_label():
    net = _perturbed(
        UNet(image_size=8, in_channels=1, base_channels=16, channel_mult=(1,), attention_resolutions=(), num_classes=3)
    )
    x, t = torch.randn(1, 1, 8, 8), torch.tensor([100])
    outs = [net(x, t, y=torch.tensor([k])) for k in range(4)]
    assert (outs[0] - outs[1]).abs().max().item() > 1e-3
    torch.testing.assert_close(net(x, t), outs[3])  # no label = the null label 3


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(image_size=12, channel_mult=(1, 2, 2, 2)), "cannot be halved"),
        (dict(image_size=8, channel_mult=(1, 2), attention_resolutions=(2,)), "never reached"),
    ],
)
def test_bad_geometry_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        UNet(in_channels=1, base_channels=8, **kw)


def test_channels_last_weights_compute_the_same_function():
    """DiffusionModule(channels_last=True) only changes the weights' memory layout: outputs agree to fp32 noise."""
    from diffusion_lab.diffusion import GaussianDiffusion
    from diffusion_lab.lit import DiffusionModule

    torch.manual_seed(0)
    net = UNet(image_size=8, in_channels=1, base_channels=16, channel_mult=(1, 2), attention_resolutions=(4,))
    for p in net.parameters():  # un-zero the zero-initialised layers so every path contributes
        torch.nn.init.normal_(p, std=0.05)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0, 400, 999])
    expected = net.eval()(x, t)
    module = DiffusionModule(net, GaussianDiffusion.from_schedule("linear", 1000), channels_last=True)
    assert module.net.stem.weight.is_contiguous(memory_format=torch.channels_last)
    got = module.net(x, t)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert expected.abs().max() > 1e-3  # a non-trivial output was compared (atol is 1e-5)


def test_compiled_training_forward_keeps_the_module_and_its_loss(monkeypatch):
    """DiffusionModule(compile=True) trains through torch.compile(net) but keeps the plain net in its tree: the
    same state_dict keys, a deep copy (the EMA's AveragedModel) works, and the training forward gives the same losses.
    Dynamo's eager backend stands in for inductor (no C++ build in the test); the plumbing is what is tested."""
    import copy
    import functools

    from diffusion_lab.diffusion import GaussianDiffusion
    from diffusion_lab.lit import DiffusionModule

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    make = lambda c: DiffusionModule(  # noqa: E731
        UNet(image_size=8, in_channels=1, base_channels=16, channel_mult=(1, 2), attention_resolutions=(4,)),
        GaussianDiffusion.from_schedule("linear", 100), compile=c, seed=3)
    plain, compiled = make(False), make(True)
    compiled.load_state_dict(plain.state_dict())
    assert plain.state_dict().keys() == compiled.state_dict().keys()
    assert type(compiled._train_fn["net"]).__name__ == "OptimizedModule"
    copy.deepcopy(compiled)  # EMAWeightAveraging deep-copies the LightningModule
    x0, t = torch.rand(4, 1, 8, 8) * 2 - 1, torch.tensor([0, 10, 50, 99])
    losses = []
    for m in (plain, compiled):
        m.train()
        torch.manual_seed(0)  # the same noise (and dropout) for both
        losses.append(m.diffusion.training_losses(m._train_fn["net"], x0, t)["loss"])
    torch.testing.assert_close(losses[0], losses[1])
    assert losses[0].abs().min() > 0


@pytest.mark.parametrize("p", [0.1, 0.3])
def test_cpu_dropout_has_nn_dropouts_law(p):
    """Dropout's packed 16-bit mask: keep rate q = 1 - round(p * 2^16) / 2^16 within 5 binomial standard errors
    over 10^6 elements (an odd count: the last 64-bit draw is cut), kept elements scaled by exactly 1/q so the
    mean of out / x is 1 in expectation; the gradient is the same mask; eval mode and p = 0 are the identity."""
    from diffusion_lab.nets.layers import Dropout

    torch.manual_seed(0)
    n = 1_000_003
    q = 1 - round(p * 65536) / 65536
    x = torch.full((n,), 2.0, requires_grad=True)
    out = Dropout(p).train()(x)
    kept = out != 0
    assert kept.float().mean().item() == pytest.approx(q, abs=5 * (q * (1 - q) / n) ** 0.5)
    assert torch.equal(out[kept], torch.full_like(out[kept], 2.0 / q))
    out.sum().backward()
    assert torch.equal(x.grad, kept.float() / q)
    # Each of the four 16-bit lanes of a draw is its own uniform: neighbours are not correlated.
    k = kept[: n - n % 4].view(-1, 4).float()
    assert all(abs(k[:, i].mean().item() - q) < 5 * (q * (1 - q) / k.shape[0]) ** 0.5 for i in range(4))
    assert abs(torch.corrcoef(k.T)[0, 1:].abs().max().item()) < 0.01
    y = torch.randn(3, 4, 5, 5)
    assert torch.equal(Dropout(p).eval()(y), y) and torch.equal(Dropout(0.0).train()(y), y)
    assert Dropout(p).train()(y.bfloat16()).dtype == torch.bfloat16
    # p that rounds to 65,536/65,536 (no lane kept) is nn.Dropout's, not a division by zero.
    torch.manual_seed(1)
    near_one = Dropout(1 - 2**-18).train()(y)
    torch.manual_seed(1)
    assert torch.equal(near_one, torch.nn.Dropout(1 - 2**-18).train()(y))
