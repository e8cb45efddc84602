"""The MNIST / Fashion-MNIST CPU test bed: each data choice brings its net, shrunk runs of data=mnist,
data=fashion_mnist and their presets, Fashion-MNIST's offline files and missing-data error, the classifier
score's closed forms and a small trained classifier, and the data package's import layering."""

from __future__ import annotations

import gzip
import math
import re
from pathlib import Path

import pytest
import torch
from conftest import FAST, ROOT, compose_train
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from diffusion_lab.config import validate_train_config
from diffusion_lab.data import FashionMNISTDataModule, MNISTDataModule
from diffusion_lab.data.base import resize_uint8
from diffusion_lab.data.raw_files import RAW_FILES, fashion_debian_files, write_fashion_raw
from diffusion_lab.eval.classifier import (
    accuracy,
    cache_path,
    classifier_score,
    crop_or_pad,
    load_or_train,
    predict_probs,
    score_images,
)
from diffusion_lab.tasks import train

HAS_FASHION = fashion_debian_files() is not None
needs_fashion = pytest.mark.skipif(
    not HAS_FASHION, reason="Fashion-MNIST's Debian files are absent (run `make data-fashion`)"
)


@pytest.fixture(scope="session")
def fashion_dir(tmp_path_factory) -> Path:
    """A data_dir with FashionMNIST/raw/ decompressed once from the Debian files (not the repo's data/)."""
    d = tmp_path_factory.mktemp("fashion_data")
    write_fashion_raw(d)
    return d


def choices(overrides: list[str]) -> tuple[str, str, int]:
    """(data choice, net choice, data.image_size) of train.yaml composed with `overrides`."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    c = cfg.hydra.runtime.choices
    return c.data, c.net, cfg.data.image_size


# --- each data config brings its net; the command line and experiments win ------------------------------------


@pytest.mark.parametrize(
    "data, net, size",
    [
        ("digits", "unet_digits", 8),
        ("mnist", "unet_mnist", 28),
        ("fashion_mnist", "unet_mnist", 28),
        ("cifar10", "unet_cifar10", 32),
        ("folder", "unet_small", 32),
    ],
)
def test_data_choice_brings_a_net_that_validates(tmp_path, data, net, size):
    extra = ["data.path=/x"] if data == "folder" else []
    assert choices([f"data={data}", *extra]) == (data, net, size)
    validate_train_config(compose_train([f"data={data}", *extra], tmp_path))  # resolutions fit, no second override


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["data=mnist", "net=unet_small"], ("mnist", "unet_small", 28)),  # the user's net wins, in either order
        (["net=unet_small", "data=mnist"], ("mnist", "unet_small", 28)),
        (["experiment=cfg_mnist"], ("mnist", "unet_small", 32)),  # the preset's net and padded size win
        (["experiment=cfg_mnist", "net=unet_mnist", "data.image_size=28"], ("mnist", "unet_mnist", 28)),
        (["experiment=cfg_digits", "data=mnist"], ("mnist", "unet_mnist", 28)),  # preset without a net override
        (["experiment=mnist_cpu"], ("mnist", "unet_mnist", 28)),
        ([], ("digits", "unet_digits", 8)),
    ],
)
def test_net_choice_precedence(overrides, expected):
    assert choices(overrides) == expected


def test_unet_mnist_resolutions(tmp_path):
    from hydra.utils import instantiate

    cfg = compose_train(["data=mnist"], tmp_path)
    net = instantiate(cfg.net)
    assert list(cfg.net.channel_mult) == [1, 2, 2] and list(cfg.net.attention_resolutions) == [7]  # 28 -> 14 -> 7
    x = torch.randn(2, 1, 28, 28)
    assert net(x, torch.tensor([0, 999])).shape == (2, 1, 28, 28)
    assert sum(p.numel() for p in net.parameters()) == 1_112_801  # the count in conf/net/unet_mnist.yaml


# --- shrunk training runs ---------------------------------------------------------------------------------------


def _run(tmp_path, overrides):
    """FAST, with the epoch cut at 3 batches so that validation runs too."""
    cfg = compose_train([*overrides, *FAST, "trainer.limit_train_batches=3", "logger=none"], tmp_path)
    metrics = train(cfg)
    assert (tmp_path / "checkpoints" / "last.ckpt").exists() and math.isfinite(metrics["val/loss"])
    return cfg


def test_data_mnist_runs_as_typed(tmp_path):
    cfg = _run(tmp_path, ["data=mnist"])
    assert cfg.data.image_size == 28 and cfg.net.image_size == 28


@needs_fashion
def test_data_fashion_mnist_runs_as_typed(tmp_path, fashion_dir):
    cfg = _run(tmp_path, ["data=fashion_mnist", f"data.data_dir={fashion_dir}"])
    assert cfg.data.image_size == 28 and cfg.net.image_size == 28


@pytest.mark.parametrize(
    "name",
    ["mnist_cpu", "mnist_cpu_cfg", pytest.param("fashion_mnist_cpu", marks=needs_fashion)],
)
def test_cpu_presets_compose_and_run(tmp_path, request, name):
    extra = [f"data.data_dir={request.getfixturevalue('fashion_dir')}"] if "fashion" in name else []
    cfg = _run(tmp_path, [f"experiment={name}", *extra])
    recipe = OmegaConf.load(ROOT / "conf" / "experiment" / "mnist_cpu.yaml")
    assert cfg.data._target_.endswith("FashionMNISTDataModule" if "fashion" in name else ".MNISTDataModule")
    assert cfg.data.image_size == 28 and list(cfg.net.channel_mult) == [1, 2, 2]
    assert cfg.diffusion.mean_type == "v" and cfg.diffusion.schedule in ("linear", "cosine")
    assert cfg.callbacks.ema.decay == recipe.callbacks.ema.decay and cfg.optim.lr == recipe.optim.lr
    assert cfg.trainer.max_steps == 3  # FAST shrank the preset's budget
    assert recipe.trainer.max_steps > 1000  # the preset itself is a real training budget
    if name == "mnist_cpu_cfg":  # one grid per guidance scale, a row per class
        assert cfg.net.num_classes == 10 and cfg.label_dropout > 0
        for s in cfg.callbacks.sample_grid.guidance_scales:
            assert (tmp_path / "samples" / f"final_cfg{s:g}.png").exists()


# The variants of the MNIST recipe change only their own keys (their headers say "value for value").
RECIPE_VARIANTS = {
    "fashion_mnist_cpu": {"data", "tags"},
    "mnist_cpu_cfg": {"net.num_classes", "label_dropout", "callbacks.sample_grid.guidance_scales", "tags"},
}


@pytest.mark.parametrize("name", sorted(RECIPE_VARIANTS))
def test_recipe_variants_change_only_their_own_keys(tmp_path, name):
    from diffusion_lab.checkpoint.resume import _flatten, _under  # the dotted-key helpers of the resume check

    def composed(experiment):
        return _flatten(OmegaConf.to_container(compose_train([f"experiment={experiment}"], tmp_path)))

    recipe, this = composed("mnist_cpu"), composed(name)
    changed = {k for k in recipe.keys() | this.keys() if recipe.get(k) != this.get(k)}
    own = tuple(RECIPE_VARIANTS[name])
    assert {k for k in changed if not _under(k, own)} == set()
    assert all(any(_under(k, (o,)) for k in changed) for o in own)  # each of its keys does change


# --- Fashion-MNIST files and the missing-data error -------------------------------------------------------------


def test_missing_fashion_fails_before_any_work_naming_the_command(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError) as e:
        FashionMNISTDataModule(data_dir=str(empty), debian_dir=str(empty))
    msg = str(e.value)
    assert "make data-fashion" in msg and "data.data_dir=" in msg and "\n" not in msg
    # Through train.py's path: the error comes at instantiate(cfg.data), before the model, trainer or any output.
    cfg = compose_train(["data=fashion_mnist", f"data.data_dir={empty}", f"data.debian_dir={empty}"], tmp_path / "r")
    with pytest.raises(Exception, match="make data-fashion"):
        train(cfg)
    assert not (tmp_path / "r").exists() and list(empty.iterdir()) == []


@needs_fashion
def test_fashion_raw_files_and_reader(fashion_dir):
    raw = fashion_dir / "FashionMNIST" / "raw"
    for name in RAW_FILES:  # decompressed byte for byte from Debian's gzipped files
        assert (raw / name).read_bytes() == gzip.open(Path(fashion_debian_files()[0]).parent / f"{name}.gz").read()
    mtime = (raw / RAW_FILES[0]).stat().st_mtime_ns
    assert write_fashion_raw(fashion_dir) == raw and (raw / RAW_FILES[0]).stat().st_mtime_ns == mtime  # no-op
    dm = FashionMNISTDataModule(data_dir=str(fashion_dir), image_size=32, val_fraction=0.0)
    (x, y), (xt, yt) = dm.load_images(), dm.test_images()
    assert x.shape == (60000, 1, 32, 32) and xt.shape == (10000, 1, 32, 32) and x.dtype == torch.uint8
    assert y[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5] and yt[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]
    assert torch.bincount(y).tolist() == [6000] * 10 and torch.bincount(yt).tolist() == [1000] * 10
    assert x[:, :, :2].max() == 0 and x.max() == 255  # padded border


# --- the classifier score ---------------------------------------------------------------------------------------


def test_classifier_score_closed_forms():
    one_hot = torch.eye(10).repeat(7, 1)  # perfectly confident, class-balanced: exp(log 10)
    assert classifier_score(one_hot) == {"cls_score": pytest.approx(10.0, abs=1e-12), "confident": 1.0, "n": 70}
    same = torch.zeros(50, 10)
    same[:, 3] = 1.0  # always one class: p(y|x) = p(y), KL 0
    assert classifier_score(same)["cls_score"] == 1.0
    soft = torch.full((20, 10), 0.1)  # uniform predictions: also KL 0, never confident
    assert classifier_score(soft) == {"cls_score": pytest.approx(1.0, abs=1e-12), "confident": 0.0, "n": 20}
    a = 0.8  # two classes, p(y|x) = (a, 1-a) or (1-a, a), balanced: exp(log 2 - H(a)) = 2 a^a (1-a)^(1-a)
    two = torch.tensor([[a, 1 - a], [1 - a, a]], dtype=torch.float64).repeat(3, 1)
    assert classifier_score(two)["cls_score"] == pytest.approx(2 * a**a * (1 - a) ** (1 - a), rel=1e-12)
    perm = one_hot[torch.randperm(70)][:, torch.randperm(10)]  # order of samples and of classes is irrelevant
    assert classifier_score(perm)["cls_score"] == pytest.approx(10.0, abs=1e-12)


def test_confident_share():
    probs = torch.tensor([[0.95, 0.05], [0.9, 0.1], [0.89, 0.11], [0.5, 0.5]])  # 0.9 counts (>=), in float32
    assert classifier_score(probs)["confident"] == 0.5
    assert classifier_score(probs, threshold=0.5)["confident"] == 1.0
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        classifier_score(torch.ones(10))


def test_crop_or_pad_round_trips_the_32_padding():
    x = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8)
    assert torch.equal(crop_or_pad(resize_uint8(x, 32)), x)
    small = crop_or_pad(x[:, :, 2:26, 2:26])
    assert small.shape == (5, 1, 28, 28) and torch.equal(small[:, :, 2:26, 2:26], x[:, :, 2:26, 2:26])
    assert small[:, :, :2].max() == 0
    with pytest.raises(ValueError, match="uint8"):
        crop_or_pad(x.float())


def test_small_classifier_trains_caches_and_scores(tmp_path):
    """2,000 MNIST training images, 5 epochs (3 s on one core): 0.920 accuracy on the first 2,000 test
    images as measured; asserted >= 0.88. The full classifier (60,000 images, 6 epochs) measured 0.9863."""
    dm = MNISTDataModule(data_dir=str(ROOT / "data"))
    (x, y), (xt, yt) = dm.load_images(), dm.test_images()
    train_set, test_set = (x[:2000], y[:2000]), (xt[:2000], yt[:2000])
    model, info = load_or_train("mnist-small", train_set, test_set, tmp_path, epochs=5)
    assert info["test_accuracy"] >= 0.88 and info["n_train"] == 2000
    assert info["test_accuracy"] == pytest.approx(accuracy(model, *test_set))
    path = cache_path(tmp_path, "mnist-small", *train_set, epochs=5)
    assert path.exists() and path.parent == tmp_path / "classifier"
    # Second call: a cache hit (same weights and stored accuracy), also for the same images padded to 32x32.
    padded = (resize_uint8(train_set[0], 32), train_set[1])
    assert cache_path(tmp_path, "mnist-small", *padded, epochs=5) == path
    again, info2 = load_or_train("mnist-small", padded, test_set, tmp_path, epochs=5)
    assert info2["test_accuracy"] == info["test_accuracy"] and "train_seconds" in info2
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert cache_path(tmp_path, "mnist-small", x[:1999], y[:1999], epochs=5) != path  # changed data misses
    assert cache_path(tmp_path, "mnist-small", *train_set, epochs=6) != path  # so does a changed training length
    # Real held-out digits score high (measured 7.31), and the 32x32 padding does not change any probability.
    scores = score_images(model, xt[:2000])
    assert scores["cls_score"] > 6.5 and scores["confident"] > 0.6
    assert torch.equal(predict_probs(model, resize_uint8(xt[:100], 32)), predict_probs(model, xt[:100]))


def test_damaged_classifier_cache_is_one_clear_error(tmp_path):
    """A damaged classifier cache entry (truncated bytes) is a ValueError naming the file and saying to delete it."""
    x = torch.zeros(10, 1, 28, 28, dtype=torch.uint8)
    y = torch.arange(10)
    path = cache_path(tmp_path, "k", x, y, epochs=1)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match=rf"cache file {re.escape(str(path))} cannot be read.*delete it"):
        load_or_train("k", (x, y), (x, y), tmp_path, epochs=1)
