"""The bodies of train.py, evaluate.py and sample.py: validate, build from the composed Hydra config, run.

Each reads top to bottom; the library pieces they use live in checkpoint/ (building and loading models),
eval/scoring.py (the one sample-and-score path), config.py (cross-field validation), loggers.py and lit/
(Lightning glue).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig, OmegaConf, open_dict

from .checkpoint import (
    CheckpointError,
    build_module,
    check_finite,
    init_weights,
    load_guide,
    load_module,
    load_teacher,
    newest_valid_checkpoint,
    read_checkpoint,
    resume_changes,
)
from .config import (
    ConfigError,
    _choice,
    _count,
    build,
    validate_data_against_net,
    validate_eval_config,
    validate_sampler,
    validate_train_config,
)
from .lit import EMA, FIDCallback
from .lit.checkpointing import AlignLoggingStep, ApplyChangedHyperparameters, AtomicCheckpointIO, RequeueStop
from .loggers import build_loggers, finish_loggers

log = logging.getLogger(__name__)
__all__ = ["train", "evaluate", "sample", "load_guide", "build_module", "load_module"]  # the last two: compat


def _callbacks(cfg: DictConfig, has_logger: bool) -> list[L.Callback]:
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    if not has_logger:  # Lightning refuses a LearningRateMonitor in a run without a logger (logger=none)
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    for c in callbacks:
        if isinstance(c, FIDCallback):  # it reads an autoguided row's guide checkpoint as every checkpoint is read
            c.guide_loader = load_guide
    # EMA after the others, so the non-finite guard runs before the EMA update of a step; the logging step
    # aligned before any of them logs.
    return [AlignLoggingStep(), *sorted(callbacks, key=lambda c: isinstance(c, EMA))]


def _remove_stale_temp_files(ckpt_dir: Path) -> None:
    """Temp files of checkpoint writes that a kill interrupted (io.atomic_write names them .<name>.*.tmp)."""
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)))  # set by DDP launchers for other ranks
    if rank == 0 and ckpt_dir.is_dir():
        for tmp in ckpt_dir.glob(".*.ckpt.*.tmp"):
            log.info("removing %s, left by an interrupted checkpoint write", tmp)
            tmp.unlink(missing_ok=True)


def _resolve_ckpt_path(cfg: DictConfig) -> Path | None:
    """The checkpoint to resume from: ckpt_path as given (checked), or with "last" / auto_resume=true the run's
    last.ckpt, falling back to the newest valid checkpoint of the run when last.ckpt is unusable."""
    path = cfg.get("ckpt_path")
    ckpt_dir = Path(cfg.paths.output_dir) / "checkpoints"
    _remove_stale_temp_files(ckpt_dir)
    requeued = int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0  # SLURM reran this job (lit.Requeue, preemption)
    if requeued and (ckpt_dir / "last.ckpt").exists():
        path = "last"  # the job's own progress, not the checkpoint it started from (ckpt_path=<init.ckpt>)
    elif requeued:
        log.warning("requeued job (SLURM_RESTART_COUNT=%s) but %s has no last.ckpt: starting again (give "
                    "hydra.run.dir a fixed path so a requeued job finds its run)", os.environ["SLURM_RESTART_COUNT"],
                    ckpt_dir)  # fmt: skip
    if path == "last" or (path is None and cfg.get("auto_resume")):
        last = ckpt_dir / "last.ckpt"
        if not last.exists():
            if path == "last":
                raise ConfigError(f"ckpt_path=last but {last} does not exist (resume needs hydra.run.dir=<the run>)")
            return None
        try:
            check_finite(read_checkpoint(last), last)
            return last
        except CheckpointError as e:
            fallback = newest_valid_checkpoint(ckpt_dir, skip=last)
            if fallback is None:
                raise CheckpointError(f"{e}; no other valid checkpoint in {ckpt_dir} to resume from") from None
            log.warning("resume: %s is unusable (%s); resuming from %s, the newest valid checkpoint", last, e, fallback)
            return fallback
    if path is None:
        return None
    check_finite(read_checkpoint(path), path)
    return Path(path)


def _resume_plan(cfg: DictConfig, ckpt_path: Path) -> tuple[dict, dict]:
    """(optimizer argument -> (old, new) to apply, what the loggers need from the checkpoint) for a resume;
    ConfigError naming every key that cannot change."""
    ckpt = read_checkpoint(ckpt_path)
    applied, refused = resume_changes(OmegaConf.to_container(cfg, resolve=True), ckpt["run_config"])
    optim = {k.split(".", 1)[1]: v for k, v in applied.items() if k.startswith("optim.")}
    if "lr" in optim and cfg.get("lr_scheduler"):  # e.g. OneCycleLR's max_lr: ${optim.lr}, rescaled with the lr
        raw = OmegaConf.to_container(cfg.lr_scheduler, resolve=False)
        refused = {k: v for k, v in refused.items() if raw.get(k.removeprefix("lr_scheduler.")) != "${optim.lr}"}
    if optim:  # only the optimizer's own arguments can be put into its restored param groups
        takes = build(cfg.optim, "optim")([torch.zeros(1, requires_grad=True)]).defaults
        refused |= {f"optim.{k}": v for k, v in optim.items() if k not in takes}
    if refused:
        listed = ", ".join(f"{k} ({a!r} -> {b!r})" for k, (a, b) in refused.items())
        raise ConfigError(
            f"resume from {ckpt_path}: the run config differs from the checkpoint's in {listed}; these cannot change "
            "within a run: resume with the checkpoint's values, or start a new run (another hydra.run.dir)"
        )
    if applied:
        log.warning("resume: applying the changed values %s", {k: f"{a} -> {b}" for k, (a, b) in applied.items()})
    run = ckpt["run_config"]
    if _world(run) != _world(OmegaConf.to_container(cfg, resolve=True)):
        log.warning("resume: the number of devices changed; the data order will differ from an uninterrupted run")
    return optim, {"global_step": ckpt["global_step"], "wandb_run_id": ckpt.get("wandb_run_id")}


def _world(run: dict) -> tuple:
    t = run.get("trainer") or {}
    return t.get("devices"), t.get("num_nodes", 1)


INIT_WEIGHTS = ("ema", "raw")  # init_from_weights


def _teacher_and_init(cfg: DictConfig, module, resuming: bool) -> None:
    """The objective's teacher (teacher=<ckpt>, frozen) and a new run's start from another run's weights
    (init_from=<ckpt>; a resumed run takes its weights from its own checkpoint), both read as untrusted data and
    refused in one line when their net or process does not fit this run."""
    if cfg.get("teacher") and not module.objective.needs_teacher:
        raise ConfigError(f"teacher={cfg.teacher} is set, but objective={module.objective.name} learns from none "
                          "(objective=ect objective.pair=teacher does): drop teacher=")  # fmt: skip
    if cfg.get("teacher"):
        module.attach_teacher(load_teacher(cfg.teacher, module))
        log.info("teacher: %s (EMA weights, frozen; not saved with this run)", cfg.teacher)
    elif module.objective.needs_teacher:
        raise ConfigError(f"objective={module.objective.name} with these options learns from a teacher: set "
                          "teacher=<checkpoint of a trained run>")  # fmt: skip
    if not cfg.get("init_from"):
        if module.objective.tunes:
            log.warning("objective=%s tunes a trained model, but init_from is not set: training from random weights "
                        "(init_from=<a run's checkpoints/last.ckpt> starts from one)", module.objective.name)
        return
    _choice("init_from_weights", cfg.get("init_from_weights", "ema"), INIT_WEIGHTS)
    if resuming:
        log.info("init_from=%s: not used, the run resumes from its own checkpoint", cfg.init_from)
        return
    init_weights(module, cfg.init_from, cfg.get("init_from_weights", "ema"))
    log.info("init_from: %s (%s weights); a new run from step 0", cfg.init_from, cfg.get("init_from_weights", "ema"))


def train(cfg: DictConfig) -> dict[str, float]:
    """Validate, seed, build data/model/callbacks/loggers/trainer, fit, and return the final metrics."""
    validate_train_config(cfg)
    ckpt_path = _resolve_ckpt_path(cfg)
    optim_changes, ckpt = _resume_plan(cfg, ckpt_path) if ckpt_path else ({}, {})
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    module = build_module(cfg)
    _teacher_and_init(cfg, module, resuming=ckpt_path is not None)
    datamodule.check_batch_size()  # data problems (a batch larger than the set, class counts) before any work
    validate_data_against_net(datamodule, module.net)
    loggers = build_loggers(cfg, resume_step=ckpt.get("global_step"), wandb_run_id=ckpt.get("wandb_run_id"))
    callbacks = _callbacks(cfg, bool(loggers)) + ([ApplyChangedHyperparameters(optim_changes)] if optim_changes else [])
    # on SLURM, lit.Requeue checkpoints and requeues at a step's end; Lightning's own handler (mid-step) stays off
    slurm = [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO(), *slurm]
    )
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except RequeueStop as stop:
        log.warning("%s: the requeued job resumes from it", stop)
    finally:
        finish_loggers(loggers)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    log.info("final metrics: %s", metrics)
    log.info("outputs in %s", cfg.paths.output_dir)
    return metrics


def _load_for_eval(cfg: DictConfig):
    """(module on the configured device, its DataModule) from cfg.ckpt_path; the data is read from this
    machine's paths.data_dir, not the directory the checkpoint was trained with."""
    module = load_module(cfg.ckpt_path, ema=_ema_weights(cfg) == "ema").to(cfg.get("device", "cpu"))
    run_cfg = OmegaConf.create(module.run_config)
    with open_dict(cfg):  # so that e.g. sampler=ddpm's `steps: ${diffusion.steps}` is the checkpoint's T
        cfg.diffusion = run_cfg.diffusion
        if cfg.sampler.get("method") is None:  # sampler=run (the default)
            cfg.sampler = _run_sampler(run_cfg, module.diffusion, cfg.sampler, under_grid=bool(cfg.get("grid")))
    with open_dict(run_cfg):
        if "data_dir" in run_cfg.data:
            run_cfg.data.data_dir = cfg.paths.data_dir
        if "cache_dir" in run_cfg.data:  # a streamed set's downloads: this machine's default, never the file's
            run_cfg.data.cache_dir = None
    return module, instantiate(run_cfg.data)


EMA_WEIGHTS = ("ema", "raw")  # ema.weights


def _ema_weights(cfg: DictConfig) -> str:
    """ema.weights (older configs: `ema: true|false`)."""
    ema = cfg.get("ema", True)
    if isinstance(ema, bool):
        return "ema" if ema else "raw"
    _choice("ema.weights", ema.get("weights", "ema"), EMA_WEIGHTS)
    return ema.get("weights", "ema")


def _post_hoc_states(cfg: DictConfig) -> dict[float, dict]:
    """{sigma_rel: state_dict} of the post-hoc EMAs asked for by ema.sigma_rel (one value or a list), rebuilt from
    <run>/ema_snapshots before any sampling; ConfigError naming the range the snapshots can represent."""
    from .lit.ema import read_snapshots
    from .phema import reconstruct

    ema = cfg.get("ema")
    rels = None if isinstance(ema, bool) or ema is None else ema.get("sigma_rel")
    if rels is None:
        return {}
    rels = list(rels) if OmegaConf.is_list(rels) or isinstance(rels, list | tuple) else [rels]
    snaps = read_snapshots(Path(cfg.ckpt_path).parent.parent / "ema_snapshots")
    states = {}
    for r in rels:
        if isinstance(r, bool) or not isinstance(r, int | float):
            raise ConfigError(f"ema.sigma_rel has {r!r}: each entry must be a number in (0, 0.2887)")
        try:
            states[float(r)] = reconstruct(snaps, float(r), ema.get("step"))
        except ValueError as e:
            raise ConfigError(str(e) if str(e).startswith("ema.") else f"ema.sigma_rel={r}: {e}") from None
    log.info("post-hoc EMA: sigma_rel %s rebuilt from %d snapshots (steps %d..%d)", list(states), len(snaps),
             snaps[0]["step"], snaps[-1]["step"])  # fmt: skip
    return states


def _run_sampler(run_cfg: DictConfig, diffusion, given: DictConfig, under_grid: bool) -> DictConfig:
    """sampler=run: the checkpoint's own `sampler` node (its process's default sampler if it has none), with the
    keys the user set (non-null in `given`) on top; under an evaluate grid without a user-set budget the run's
    steps/nfe are left out (grid.nfe sets each row's)."""
    if run_cfg.get("sampler"):
        own = OmegaConf.to_container(run_cfg.sampler)
    else:  # a config from before the sampler node: the process's default, at no more steps than its T
        from .diffusion import Sampler

        own = {k: v for k, v in Sampler.default_for(diffusion).config().items() if v is not None}
    mine = {k: v for k, v in OmegaConf.to_container(given, resolve=True).items() if v is not None}
    if under_grid or {"steps", "nfe"} & mine.keys():  # one budget: the user's or grid.nfe replaces the run's
        own.pop("steps", None), own.pop("nfe", None)
    merged = {**own, **mine}
    log.info("sampler: the run's own, %s (sampler=<method> picks another)",
             ", ".join(f"{k}={v}" for k, v in merged.items() if v is not None and not k.startswith("_")))
    return OmegaConf.create(merged)


def _samplers(cfg: DictConfig, module) -> list[tuple]:
    """(sampler, role) pairs, each built by Sampler.from_config from the configured `sampler` and checked against
    the checkpoint's process before any sampling: with grid=null that sampler alone ("curve"); else the grid, which
    varies only its method (grid.methods, default: the sampler's own), NFE (grid.nfe) and, for methods with one, eta
    (grid.etas), and keeps every other key (spacing, options, clipping, guidance), plus DDPM at grid.ddpm_steps
    (the "reference")."""
    from .diffusion import METHODS, get_method
    from .diffusion.sampler_spec import BASE_KEYS

    if not cfg.get("grid"):
        trained_by = module.objective.name
        return [(validate_sampler(cfg.sampler, "sampler", module.diffusion, module.conditional, trained_by,
                                  cfg.ckpt_path), "curve")]  # fmt: skip
    g, base = cfg.grid, OmegaConf.to_container(cfg.sampler, resolve=True)
    methods = list(g.get("methods") or [base.get("method", "ddim")])
    nfes = list(g.get("ddim_steps") or g.nfe)  # ddim_steps: the grid's older name for the NFE list
    for name in methods:
        _choice("grid.methods", name, METHODS)
    for i, n in enumerate(nfes):
        _count(f"grid.nfe[{i}]", n)
    for key in ("steps", "nfe"):
        if base.get(key) is not None:
            raise ConfigError(f"sampler.{key}={base[key]} is set, but the grid sets the NFE of each row (grid.nfe="
                              f"{nfes}): drop sampler.{key}, or score that one sampler with grid=null")
    options = {k for k, v in base.items() if v is not None and not k.startswith("_")} - set(BASE_KEYS)
    for k in sorted(options):
        if not any(k in get_method(m).options for m in methods):
            raise ConfigError(f"sampler.{k}={base[k]} is not an option of any grid method (grid.methods={methods}):"
                              f" drop it, or add a method that takes it")
    if (base.get("guidance_scale") is not None and base.get("guidance") != "autoguidance"
            and not module.conditional):  # fmt: skip
        raise ConfigError(f"sampler.guidance_scale={base['guidance_scale']} guides every grid row, but "
                          f"{cfg.ckpt_path} is not class-conditional: drop sampler.guidance_scale (or guide by "
                          "sampler.guidance=autoguidance)")  # fmt: skip
    guidances = _grid_guidance(g)
    pairs = []
    for name in methods:
        etas = g.etas if g.get("etas") and "eta" in get_method(name).options else [None]  # None: the sampler's
        pairs += [(_grid_row(base, dict(method=name, nfe=n, eta=e), guided), "curve")
                  for e in etas for n in nfes for guided in guidances]  # fmt: skip
    # the reference is DDPM on its own grid (sampler.spacing shapes the curves), with the sampler's guidance
    discrete = module.diffusion.discrete
    if g.get("ddpm_steps") and not discrete:
        log.info("grid.ddpm_steps: DDPM's ancestral sampler needs the discrete process; no reference row here")
    pairs += [(_grid_row(base, dict(method="ddpm", steps=s, spacing=None)), "reference")
              for s in (g.get("ddpm_steps") or []) if discrete]
    unique = {(s.name, role): (s, role) for s, role in pairs}  # e.g. Heun at NFE 9 and 10 is one sampler
    return [(validate_sampler(s, f"grid row {s.name}", module.diffusion, module.conditional, module.objective.name,
                              cfg.ckpt_path), role)
            for s, role in unique.values()]


def _with_guides(cfg: DictConfig, module, samplers: list[tuple]) -> list[tuple]:
    """Each autoguided sampler with its guide network (sampler.guide) loaded once, read as data like every
    checkpoint and checked against the guided model before any sampling."""
    guides, out = {}, []
    for s, role in samplers:
        if s.guidance is not None and s.guidance.rule == "autoguidance":
            key = tuple(sorted(s.guide.items())) if s.guide else None
            if key not in guides:
                guides[key] = load_guide(module, s.guide, cfg.ckpt_path, ema=_ema_weights(cfg) == "ema")
            s = s.with_guide(guides[key])
        out.append((s, role))
    return out


def _grid_guidance(g) -> list[dict | None]:
    """grid.guidance: one row per entry, each a mapping of guidance keys (guidance, guidance_scale,
    guidance_interval, apg_*, guide) that replaces the sampler's own, or "none" (unguided); crossed with
    grid.guidance_scales for the entries that set no scale. null: [None], the sampler's own guidance."""
    from .diffusion.sampler_spec import GUIDANCE_KEYS

    entries = g.get("guidance")
    scales = list(g.get("guidance_scales") or [])
    if not entries:
        if scales:
            raise ConfigError("grid.guidance_scales needs grid.guidance (e.g. grid.guidance=[none,{guidance: cfg}])")
        return [None]
    out = []
    for entry in entries:
        entry = OmegaConf.to_container(entry, resolve=True) if OmegaConf.is_config(entry) else entry
        if entry == "none":
            out.append({k: None for k in GUIDANCE_KEYS})
            continue
        if not isinstance(entry, dict):
            raise ConfigError(f"grid.guidance has {entry!r}: each entry is 'none' or a mapping of guidance keys, "
                              "e.g. {guidance: apg, guidance_scale: 4}")  # fmt: skip
        if unknown := sorted(set(entry) - set(GUIDANCE_KEYS)):
            raise ConfigError(f"grid.guidance entry {entry}: {unknown[0]} is not a guidance key (it takes: "
                              f"{', '.join(GUIDANCE_KEYS)})")  # fmt: skip
        row = {k: entry.get(k) for k in GUIDANCE_KEYS}
        if row["guidance_scale"] is None and scales:
            out += [{**row, "guidance_scale": w} for w in scales]
        else:
            out.append(row)
    return out


def _grid_row(base: dict, changes: dict, guided: dict | None = None):
    from .diffusion import Sampler

    changes = {k: v for k, v in changes.items() if v is not None or k != "eta"}  # eta None: the sampler's own
    try:
        return Sampler.from_config(base, **changes, **(guided or {}))
    except ValueError as e:
        raise ConfigError(f"grid row {({**changes, **{k: v for k, v in (guided or {}).items() if v is not None}})}: "
                          f"{e}") from None


def evaluate(cfg: DictConfig) -> dict:
    """FID/KID, precision/recall (and the classifier score on MNIST-like data) for each sampler of a checkpoint,
    and bits/dim; writes results.csv/.md and fid_vs_nfe.png into the run directory."""
    from .eval.bpd import bits_per_dim
    from .eval.fid import FIDEvaluator
    from .eval.inception import inception_weights
    from .eval.report import plot_fid_vs_ema, plot_fid_vs_nfe, row, write_csv, write_markdown
    from .eval.scoring import sample_and_score

    validate_eval_config(cfg)
    module, dm = _load_for_eval(cfg)
    samplers = _with_guides(cfg, module, _samplers(cfg, module))
    post_hoc = _post_hoc_states(cfg)
    # the weights to score: the configured ones; with ema.sigma_rel each post-hoc EMA, the run's EMA and the raw ones
    weights = [(None, None)]
    if post_hoc:
        raw = load_module(cfg.ckpt_path, ema=False).state_dict()
        own = {k: v.detach().clone() for k, v in module.state_dict().items()} if _ema_weights(cfg) == "ema" else None
        weights = [(f"{r:g}", st) for r, st in post_hoc.items()] + ([("run", own)] if own else []) + [("raw", raw)]
    real = dm.real_images(cfg.fid.reference_split)[: cfg.fid.get("num_reference")]
    ev = FIDEvaluator(
        inception_weights(cfg.fid.inception_weights, cfg.paths.cache_dir), cfg.paths.cache_dir, device=module.device
    )
    ref_name = f"{type(dm).__name__}-{cfg.fid.reference_split}"
    ref = ev.reference_features(ref_name, real)
    classifier = _classifier(cfg, dm)
    rows = []
    for tag, state in weights:
        if state is not None:
            module.load_state_dict(state)
        for s, role in samplers:
            scores, _ = sample_and_score(module, s, num_samples=cfg.num_samples, seed=cfg.seed,
                                         batch_size=cfg.batch_size, evaluator=ev, reference=ref, classifier=classifier,
                                         progress=True)  # fmt: skip
            rows.append({**row(s, scores, ref_name, scores["sample_seconds"], role), **({"ema": tag} if tag else {})})
            log.info(
                "%s (%d NFE%s): FID %.3f KID %.5f precision %.3f recall %.3f (N=%d vs %s N=%d) in %.1fs",
                s.name, s.nfe, f", EMA {tag}" if tag else "", scores["fid"], scores["kid"], scores["precision"],
                scores["recall"], scores["n"], ref_name, scores["n_ref"], scores["sample_seconds"],
            )  # fmt: skip
    extra, result = "", {"rows": rows}
    if cfg.get("bpd_num_images") and not module.diffusion.discrete:
        log.info("bits/dim: the variational bound is the discrete process's (diffusion=ddpm/iddpm); skipped")
    elif cfg.get("bpd_num_images"):
        held_out = dm.real_images("val")[: cfg.bpd_num_images]
        result["bpd"] = bits_per_dim(
            module.diffusion, module.net, held_out, seed=cfg.seed, null_label=module.null_label, device=module.device
        )
        extra = f"Bits/dim on {result['bpd']['n']} held-out images: {result['bpd']['bpd']:.4f}"
        log.info(extra)
    out_dir = Path(cfg.paths.output_dir)
    write_csv(rows, out_dir / "results.csv")
    write_markdown(rows, out_dir / "results.md", extra)
    if post_hoc:
        plot_fid_vs_ema(rows, out_dir / "fid_vs_ema.png", title=str(Path(cfg.ckpt_path).name))
    else:
        plot_fid_vs_nfe(rows, out_dir / "fid_vs_nfe.png", title=str(Path(cfg.ckpt_path).name))
    _log_eval_to_wandb(cfg, rows, out_dir)
    return result


def _classifier(cfg: DictConfig, dm):
    """The dataset's classifier (eval/classifier.py) when cfg.classifier_score allows and the data has a labelled
    test set of 1-channel images (MNIST, Fashion-MNIST); None otherwise."""
    if not cfg.get("classifier_score", True) or not hasattr(dm, "test_images") or dm.channels != 1:
        return None
    from .eval.classifier import classifier_for

    model, info = classifier_for(dm, cfg.paths.cache_dir)
    log.info("classifier score: %s classifier, test accuracy %.4f", type(dm).__name__, info["test_accuracy"])
    return model


def _log_eval_to_wandb(cfg: DictConfig, rows: list[dict], out_dir: Path) -> None:
    if not cfg.get("logger"):
        return
    logger = instantiate(cfg.logger)
    if hasattr(logger, "log_table"):
        cols = list(rows[0].keys())
        logger.log_table("eval/fid_table", columns=cols, data=[[r[c] for c in cols] for r in rows])
        logger.log_image("eval/fid_vs_nfe", [str(out_dir / "fid_vs_nfe.png")])
    logger.log_metrics({f"eval/fid/{r['sampler']}" + (f"@ema{r['ema']}" if r.get("ema") else ""): r["fid"]
                        for r in rows})  # fmt: skip
    logger.finalize("success")


def sample(cfg: DictConfig) -> Path:
    """Write `<mode>.png` (and samples.npz for mode=grid) from a checkpoint; returns the PNG path."""
    import numpy as np

    from . import sample_modes
    from .data import to_uint8
    from .images import save_grid
    from .io import atomic_write

    if cfg.mode not in sample_modes.MODES:
        raise ConfigError(f"mode={cfg.mode!r} is unknown; allowed: {', '.join(sample_modes.MODES)}")
    validate_eval_config(cfg)
    module, dm = _load_for_eval(cfg)
    sampler = validate_sampler(cfg.sampler, "sampler", module.diffusion, module.conditional, module.objective.name,
                               cfg.ckpt_path)  # fmt: skip
    [(sampler, _)] = _with_guides(cfg, module, [(sampler, "curve")])
    if post_hoc := _post_hoc_states(cfg):
        if len(post_hoc) > 1:
            raise ConfigError(f"ema.sigma_rel={list(post_hoc)}: sample.py draws with one (evaluate.py compares many)")
        module.load_state_dict(next(iter(post_hoc.values())))
    out_dir = Path(cfg.paths.output_dir)
    if cfg.mode == "grid":
        images, nrow = sample_modes.grid(module, sampler, cfg.num_samples, cfg.seed, cfg.get("class_label"))
        with atomic_write(out_dir / "samples.npz") as tmp, open(tmp, "wb") as f:
            np.savez(f, images=to_uint8(images).permute(0, 2, 3, 1).cpu().numpy())
    else:
        val = dm.real_images("val")
        pick = torch.randperm(val.shape[0], generator=torch.Generator().manual_seed(cfg.seed))[: max(2, cfg.num_images)]
        originals = val[pick].float() / 127.5 - 1
        if cfg.mode == "inpaint":
            images, nrow = sample_modes.inpaint(module, sampler, originals, cfg.mask, cfg.seed)
        elif cfg.mode == "interpolate":
            images, nrow = sample_modes.interpolation(module, sampler, originals[0], originals[1], cfg.points)
        else:
            images, nrow = sample_modes.progression(module, sampler, cfg.num_images, cfg.seed, cfg.points)
    path = out_dir / f"{cfg.mode}.png"
    save_grid(images, path, nrow)
    log.info("wrote %s", path)
    return path


def learn_schedule(cfg: DictConfig) -> Path:
    """Learn the time grid of cfg.sampler for cfg.ckpt_path (learned_grid.learn_times on teacher trajectories drawn
    by cfg.teacher) and write it as a schedule file; returns its path."""
    import json
    import time

    from .diffusion import Sampler
    from .diffusion.learned_grid import FIXED_STARTS, LOWEST, SCHEDULE_FORMAT, grid_loss, learn_times
    from .diffusion.sampler_spec import LEARNED
    from .io import atomic_write, file_sha256

    validate_eval_config(cfg)
    for key in ("trajectories", "validation", "max_evals"):
        _count(key, cfg.get(key))
    _choice("lowest", cfg.get("lowest"), LOWEST)
    module, _ = _load_for_eval(cfg)
    d, trained_by = module.diffusion, module.objective.name
    sampler = validate_sampler(cfg.sampler, "sampler", d, module.conditional, trained_by)
    if sampler.spacing == LEARNED or not sampler.deterministic:
        raise ConfigError(f"sampler={sampler.name}: learn_schedule learns the grid of a deterministic solver on a "
                          "fixed spacing (drop sampler.schedule / sampler.spacing=learned; eta=0)")  # fmt: skip
    teacher = Sampler.from_config(OmegaConf.to_container(cfg.teacher, resolve=True),
                                  guidance_scale=sampler.guidance_scale)  # fmt: skip
    teacher = validate_sampler(teacher, "teacher", d, module.conditional, trained_by)

    def draw(start: int, count: int):
        return lambda s: module.sample(count, s, seed=cfg.seed, start=start, batch_size=cfg.batch_size)

    n, v = cfg.trajectories, cfg.validation
    t0 = time.perf_counter()
    log.info("learn_schedule: %d + %d teacher trajectories with %s (NFE %d)", n, v, teacher.label, teacher.nfe)
    target, held_out = draw(0, n)(teacher), draw(n, v)(teacher)
    teacher_seconds = time.perf_counter() - t0
    out = learn_times(d, sampler, draw(0, n), target, max_evals=cfg.max_evals, lowest=cfg.lowest, log=log.info)
    val = {sp: grid_loss(draw(n, v), sampler, held_out, sampler.replace(spacing=sp).timesteps(d))
           for sp in out["fixed"]}  # fmt: skip
    val["learned"] = grid_loss(draw(n, v), sampler, held_out, out["times"])
    record = {
        "format": SCHEDULE_FORMAT,
        "method": sampler.method.name,
        "options": sampler.options,
        "steps": sampler.steps,
        "nfe": sampler.nfe,
        "times": out["times"],
        "process": d.network_view,
        "num_timesteps": d.num_timesteps,
        "checkpoint": {"path": str(cfg.ckpt_path), "sha256": file_sha256(cfg.ckpt_path),
                       "weights": _ema_weights(cfg)},  # fmt: skip
        "teacher": teacher.config(),
        "trajectories": n,
        "validation": v,
        "seed": cfg.seed,
        "objective": "LD3 (hard): mean squared distance to the teacher's samples from the same noise",
        "lowest": cfg.lowest,
        "start": out["start"],
        "loss": {"train": {**out["fixed"], "learned": out["loss"]}, "validation": val, "curve": out["curve"]},
        "evals": out["evals"],
        "seconds": {"teacher": teacher_seconds, "search": out["seconds"], "total": time.perf_counter() - t0},
    }
    path = Path(cfg.out) if cfg.get("out") else Path(cfg.paths.output_dir) / f"schedule_{sampler.name}.json"
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(record, indent=1))
    best = min(FIXED_STARTS, key=lambda k: val.get(k, float("inf")))
    log.info("learn_schedule: wrote %s in %.1f min: held-out loss %.4g learned vs %.4g %s (the best fixed grid); "
             "times %s", path, record["seconds"]["total"] / 60, val["learned"], val[best], best,
             [round(t, 1) for t in out["times"]])  # fmt: skip
    return path
