"""Entry-point bodies: `train(cfg)` (and, from their own modules, evaluate/sample) build objects from the
composed Hydra config's `_target_` nodes, run, and return metrics."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import WeightAveraging
from omegaconf import DictConfig, OmegaConf, open_dict

from .config import validate_train_config
from .lit import DiffusionModule
from .lit.reliability import AtomicCheckpointIO
from .loggers import build_loggers, finish_loggers

log = logging.getLogger(__name__)


def build_module(cfg: DictConfig) -> DiffusionModule:
    """The DiffusionModule for a run config (also used to rebuild one from a checkpoint's saved config)."""
    return DiffusionModule(
        net=instantiate(cfg.net),
        diffusion=instantiate(cfg.diffusion),
        timestep_sampler=instantiate(cfg.timesteps),
        optimizer=instantiate(cfg.optim),
        lr_scheduler=instantiate(cfg.lr_scheduler) if cfg.get("lr_scheduler") else None,
        label_dropout=cfg.get("label_dropout", 0.0),
        sampler=instantiate(cfg.sampler),
        run_config=OmegaConf.to_container(cfg, resolve=True),
        channels_last=cfg.get("channels_last", True),
    )


def load_module(ckpt_path: str | Path, map_location: str = "cpu", ema: bool = True) -> DiffusionModule:
    """Rebuild a trained DiffusionModule from a checkpoint alone (its saved run config).

    ema=True loads the EMA weights (Lightning's WeightAveraging stores them as the checkpoint's
    state_dict); ema=False loads the raw training weights.
    """
    ckpt = torch.load(ckpt_path, map_location=map_location, weights_only=False)
    cfg = OmegaConf.create(ckpt["run_config"])
    module = build_module(cfg)
    state = ckpt["state_dict"] if ema or "current_model_state" not in ckpt else ckpt["current_model_state"]
    module.load_state_dict(state)
    if "timestep_sampler" in ckpt:
        module.timestep_sampler.load_state_dict(ckpt["timestep_sampler"])
    return module.eval()


def _callbacks(cfg: DictConfig) -> list[L.Callback]:
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    # EMA last, so any callback that runs in the same hook sees the weights before the EMA swap.
    return sorted(callbacks, key=lambda c: isinstance(c, WeightAveraging))


def _resolve_ckpt_path(cfg: DictConfig) -> str | None:
    """ckpt_path as given; "last" or auto_resume=true: <output_dir>/checkpoints/last.ckpt if it exists."""
    path = cfg.get("ckpt_path")
    if path == "last" or (path is None and cfg.get("auto_resume")):
        last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
        if last.exists():
            log.info("resuming from %s", last)
            return str(last)
        if path == "last":
            raise FileNotFoundError(f"ckpt_path=last but {last} does not exist (resume needs hydra.run.dir=<the run>)")
        return None
    if path is not None and not Path(path).exists():
        raise FileNotFoundError(f"ckpt_path={path!r} does not exist")
    return path


def train(cfg: DictConfig) -> dict[str, float]:
    """Validate, seed, build data/model/callbacks/loggers/trainer, fit, and return the final metrics."""
    validate_train_config(cfg)
    ckpt_path = _resolve_ckpt_path(cfg)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    module = build_module(cfg)
    loggers = build_loggers(cfg)
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=_callbacks(cfg), logger=loggers or False, plugins=[AtomicCheckpointIO()]
    )
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    finally:
        finish_loggers(loggers)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    log.info("final metrics: %s", metrics)
    log.info("outputs in %s", cfg.paths.output_dir)
    return metrics


def _load_for_eval(cfg: DictConfig):
    """(module on the configured device, its DataModule) from cfg.ckpt_path."""
    if not cfg.get("ckpt_path") or not Path(cfg.ckpt_path).exists():
        raise FileNotFoundError(f"ckpt_path={cfg.get('ckpt_path')!r} does not exist (a .ckpt written by train.py)")
    module = load_module(cfg.ckpt_path, ema=cfg.get("ema", True)).to(cfg.get("device", "cpu"))
    run_cfg = OmegaConf.create(module.run_config)
    with open_dict(cfg):  # so that e.g. sampler=ddpm's `steps: ${diffusion.steps}` is the checkpoint's T
        cfg.diffusion = run_cfg.diffusion
    return module, instantiate(run_cfg.data)


def _samplers(cfg: DictConfig) -> list:
    """The evaluation grid (DDIM steps x etas, DDPM steps), or the single `sampler` when grid is null."""
    from .diffusion import Sampler

    if not cfg.get("grid"):
        return [instantiate(cfg.sampler)]
    g = cfg.grid
    return [Sampler("ddim", s, eta=e, spacing=g.get("spacing", "ddim")) for e in g.etas for s in g.ddim_steps] + [
        Sampler("ddpm", s, spacing="even") for s in g.ddpm_steps
    ]


def evaluate(cfg: DictConfig) -> dict:
    """FID/KID for each sampler (and bits/dim) of a checkpoint; writes results.csv/.md and fid_vs_steps.png."""
    from .config import validate_sampler
    from .eval.bpd import bits_per_dim
    from .eval.fid import FIDEvaluator
    from .eval.inception import inception_weights
    from .eval.report import plot_fid_vs_steps, write_csv, write_markdown

    module, dm = _load_for_eval(cfg)
    samplers = _samplers(cfg)
    for i, s in enumerate(samplers):  # fail before any sampling
        validate_sampler(
            OmegaConf.create(vars(s)), f"samplers[{i}]", module.diffusion.num_timesteps, module.conditional
        )
    out_dir = Path(cfg.paths.output_dir)
    ev = FIDEvaluator(
        inception_weights(cfg.fid.inception_weights, cfg.paths.cache_dir), cfg.paths.cache_dir, device=module.device
    )
    real = dm.real_images(cfg.fid.reference_split)
    if cfg.fid.get("num_reference"):
        real = real[: cfg.fid.num_reference]
    ref_name = f"{type(dm).__name__}-{cfg.fid.reference_split}"
    ref = ev.reference_features(ref_name, real)
    rows = []
    for s in samplers:
        t0 = time.perf_counter()
        fake = sample_uint8(module, s, cfg.num_samples, cfg.batch_size, torch.Generator().manual_seed(cfg.seed))
        seconds = time.perf_counter() - t0
        scores = ev.score(fake, ref)
        rows.append(
            {
                "sampler": s.name,
                "method": s.method,
                "steps": s.steps,
                "eta": s.eta,
                **scores,
                "reference": ref_name,
                "sample_seconds": seconds,
            }
        )
        log.info(
            "%s: FID %.3f KID %.5f (N=%d vs %s N=%d) in %.1fs",
            s.name,
            scores["fid"],
            scores["kid"],
            scores["n"],
            ref_name,
            scores["n_ref"],
            seconds,
        )
    extra = ""
    result = {"rows": rows}
    if cfg.get("bpd_num_images"):
        held_out = dm.real_images("val")[: cfg.bpd_num_images]
        result["bpd"] = bits_per_dim(module, held_out, seed=cfg.seed)
        extra = f"Bits/dim on {result['bpd']['n']} held-out images: {result['bpd']['bpd']:.4f}"
        log.info(extra)
    write_csv(rows, out_dir / "results.csv")
    write_markdown(rows, out_dir / "results.md", extra)
    plot_fid_vs_steps(rows, out_dir / "fid_vs_steps.png", title=str(Path(cfg.ckpt_path).name))
    _log_eval_to_wandb(cfg, rows, out_dir)
    return result


def _random_labels(module, n: int, g: torch.Generator):
    return torch.randint(0, module.net.num_classes, (n,), generator=g) if module.conditional else None


def sample_uint8(module, sampler, n: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """n samples as uint8 [n, C, H, W] on the CPU, drawn in batches (random labels for a conditional net);
    x_T and labels come from `generator`, so equal seeds give equal starting noise for every sampler."""
    from .data import to_uint8

    batches = []
    for i in range(0, n, batch_size):
        b = min(batch_size, n - i)
        y = _random_labels(module, b, generator)
        batches.append(to_uint8(module.sample(b, sampler, generator=generator, y=y)).cpu())
    return torch.cat(batches)


def _log_eval_to_wandb(cfg: DictConfig, rows: list[dict], out_dir: Path) -> None:
    if not cfg.get("logger"):
        return
    logger = instantiate(cfg.logger)
    if hasattr(logger, "log_table"):
        cols = list(rows[0].keys())
        logger.log_table("eval/fid_table", columns=cols, data=[[r[c] for c in cols] for r in rows])
        logger.log_image("eval/fid_vs_steps", [str(out_dir / "fid_vs_steps.png")])
    logger.log_metrics({f"eval/fid/{r['sampler']}": r["fid"] for r in rows})
    logger.finalize("success")


def sample(cfg: DictConfig) -> Path:
    """Write `<mode>.png` (and samples.npz for mode=grid) from a checkpoint; returns the PNG path."""
    import numpy as np

    from . import sample_modes
    from .config import validate_sampler
    from .data import to_uint8
    from .io import atomic_write
    from .lit.callbacks import save_grid

    if cfg.mode not in sample_modes.MODES:
        raise ValueError(f"mode={cfg.mode!r} is unknown; allowed: {', '.join(sample_modes.MODES)}")
    module, dm = _load_for_eval(cfg)
    validate_sampler(cfg.sampler, "sampler", module.diffusion.num_timesteps, module.conditional)
    sampler = instantiate(cfg.sampler)
    g = torch.Generator().manual_seed(cfg.seed)
    out_dir = Path(cfg.paths.output_dir)
    if cfg.mode == "grid":
        images, nrow = sample_modes.grid(module, sampler, cfg.num_samples, g, cfg.get("class_label"))
        with atomic_write(out_dir / "samples.npz") as tmp, open(tmp, "wb") as f:
            np.savez(f, images=to_uint8(images).permute(0, 2, 3, 1).cpu().numpy())
    else:
        val = dm.real_images("val")
        pick = torch.randperm(val.shape[0], generator=g)[: max(2, cfg.num_images)]
        originals = val[pick].float() / 127.5 - 1
        if cfg.mode == "inpaint":
            images, nrow = sample_modes.inpaint(module, sampler, originals, cfg.mask, g)
        elif cfg.mode == "interpolate":
            images, nrow = sample_modes.interpolation(module, sampler, originals[0], originals[1], cfg.points)
        else:
            images, nrow = sample_modes.progression(module, sampler, cfg.num_images, g, cfg.points)
    path = out_dir / f"{cfg.mode}.png"
    save_grid(images, path, nrow)
    log.info("wrote %s", path)
    return path
