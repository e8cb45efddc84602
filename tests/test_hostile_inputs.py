"""Hostile or broken inputs (issue 18): a checkpoint is data, bad input gets one line and exit status 2 before any
work, nothing written is lost, and no command exits 0 with a wrong result."""

import errno
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import FAST, ROOT, compose_train
from PIL import Image

from diffusion_lab.checkpoint import CheckpointError, load_module
from diffusion_lab.cli import run
from diffusion_lab.config import ConfigError
from diffusion_lab.data import FolderDataModule
from diffusion_lab.io import DiskFullError, atomic_write
from diffusion_lab.lit.checkpointing import AtomicCheckpointIO, NonFiniteCheckpointError
from diffusion_lab.tasks import evaluate, sample, train


class Payload:
    """A pickle payload: unpickling it (weights_only=False) creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _ckpt(tiny_ckpt) -> dict:
    return torch.load(tiny_ckpt, weights_only=True)


def _cli(script: str, args: list[str], tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, script, *args, f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _one_line(r: subprocess.CompletedProcess, *fragments: str) -> str:
    """The command failed with status 2 and one `error:` line holding the fragments, without a traceback."""
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, (r.returncode, r.stderr[-2000:])
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


# ------------------------------------------------------------------ 1. a checkpoint is data
def test_pickle_payload_checkpoint_is_refused_unread(tiny_ckpt, tmp_path):
    marker = tmp_path / "payload_ran"
    evil = _ckpt(tiny_ckpt) | {"extra": Payload(marker)}
    torch.save(evil, tmp_path / "evil.ckpt")
    assert torch.load(tmp_path / "evil.ckpt", weights_only=False) and marker.exists()  # the payload is real
    marker.unlink()
    r = _cli("sample.py", [f"ckpt_path={tmp_path / 'evil.ckpt'}", "num_samples=2"], tmp_path)
    _one_line(r, "evil.ckpt", "pickled Python objects", "refused unread")
    assert not marker.exists() and not (tmp_path / "run" / "grid.png").exists()


@pytest.mark.parametrize("where", ["net", "nested", "interpolation", "decode"])
def test_checkpoint_config_cannot_name_an_arbitrary_callable(tiny_ckpt, tmp_path, where):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    ckpt = _ckpt(tiny_ckpt)
    attack = {"_target_": "builtins.open", "_args_": [str(victim), "w"]}
    message = r"_target_='builtins.open' is not one of diffusion_lab's own classes"
    if where == "net":
        ckpt["run_config"]["net"] = attack
    elif where == "nested":  # deep inside a node that is built, where recursive instantiation would reach it
        ckpt["run_config"]["diffusion"]["schedule"] = attack
    elif where == "interpolation":  # a checked node pointing at an unchecked one
        ckpt["run_config"]["evil"] = attack
        ckpt["run_config"]["net"]["dropout"] = "${evil}"
        message = r"run_config.net.dropout holds an interpolation"
    else:  # a resolver that builds the node from a string
        ckpt["run_config"]["net"]["dropout"] = (
            "${oc.decode:'{_target_: builtins.open, _args_: [" + str(victim) + ", w]}'}"
        )
        message = r"run_config.net.dropout holds an interpolation"
    torch.save(ckpt, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match=message):
        load_module(tmp_path / "evil.ckpt")
    assert victim.read_text() == "precious"
    if where in ("net", "interpolation"):  # the CLI's one line for each of the two refusals (the same path after)
        r = _cli("evaluate.py", [f"ckpt_path={tmp_path / 'evil.ckpt'}", "num_samples=2"], tmp_path)
        _one_line(r, "builtins.open" if where == "net" else "holds an interpolation")
        assert victim.read_text() == "precious"


def test_the_allow_list_is_derived_from_what_the_project_builds(monkeypatch):
    import diffusion_lab.data
    from diffusion_lab.checkpoint import BUILT_NODES, allowed_target, buildable_targets

    # every class a config group can name is allowed, without a hand list
    conf_targets = {(f, t) for node in BUILT_NODES for f in (ROOT / "conf" / node).glob("*.yaml")
                    for t in re.findall(r"_target_: ([\w.]+)", f.read_text())}  # fmt: skip
    assert len(conf_targets) >= 15 and all(allowed_target(t) for _, t in conf_targets), conf_targets
    # a callable that is not a class of the buildable packages is refused: stdlib, our Lightning glue, our functions,
    # a torch scheduler that takes callables, a class reached through a module attribute
    for bad in ["builtins.open", "os.system", "diffusion_lab.lit.EMA", "diffusion_lab.diffusion.get_betas",
                "torch.optim.lr_scheduler.LambdaLR", "diffusion_lab.data.base.torch.nn.Module",
                "diffusion_lab.nets.UNet.__init__", "diffusion_lab.tasks.train"]:  # fmt: skip
        assert not allowed_target(bad), bad

    # a DataModule added to diffusion_lab.data is allowed with no edit to the checkpoint code
    class NewDataModule(diffusion_lab.data.ImageDataModule):
        pass

    NewDataModule.__module__ = "diffusion_lab.data"
    monkeypatch.setattr(diffusion_lab.data, "NewDataModule", NewDataModule, raising=False)
    buildable_targets.cache_clear()
    try:
        assert allowed_target("diffusion_lab.data.NewDataModule")
    finally:
        monkeypatch.undo()
        buildable_targets.cache_clear()
    assert not allowed_target("diffusion_lab.data.NewDataModule")


def test_nonfinite_checkpoint_is_refused_and_never_written(tiny_ckpt, tmp_path):
    ckpt = _ckpt(tiny_ckpt)
    name = next(iter(ckpt["state_dict"]))
    ckpt["state_dict"][name] = ckpt["state_dict"][name] * float("nan")
    torch.save(ckpt, tmp_path / "nan.ckpt")
    with pytest.raises(CheckpointError, match=r"1 weight tensors with NaN or inf \(first: state_dict/"):
        load_module(tmp_path / "nan.ckpt")
    good = tmp_path / "good.ckpt"
    good.write_bytes(tiny_ckpt.read_bytes())
    with pytest.raises(NonFiniteCheckpointError, match="refusing to write"):
        AtomicCheckpointIO().save_checkpoint(ckpt, good)
    assert good.read_bytes() == tiny_ckpt.read_bytes()


@pytest.mark.parametrize(
    "content,fragment",
    [
        (b"", "is empty (0 bytes"),
        (b"PK\x03\x04 truncated", "not a readable PyTorch checkpoint"),
        ("foreign", "not a diffusion_lab checkpoint"),
        ("truncated", "not a readable PyTorch checkpoint"),
    ],
)
def test_broken_checkpoint_files_get_one_line(tiny_ckpt, tmp_path, capsys, content, fragment):
    path = tmp_path / "bad.ckpt"
    if content == "foreign":
        torch.save({"model": torch.zeros(2)}, path)
    elif content == "truncated":
        path.write_bytes(tiny_ckpt.read_bytes()[:5000])
    else:
        path.write_bytes(content)
    cfg = compose_train([f"ckpt_path={path}", "num_samples=2"], tmp_path, "sample")
    with pytest.raises(SystemExit) as e:
        run(sample, cfg)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and fragment in err[0] and str(path) in err[0], err


def test_weights_that_do_not_fit_the_config_get_one_line(tiny_ckpt, tmp_path):
    ckpt = _ckpt(tiny_ckpt)
    ckpt["run_config"]["net"]["base_channels"] = 8  # trained with 16
    torch.save(ckpt, tmp_path / "edited.ckpt")
    with pytest.raises(CheckpointError, match=r"weights do not fit the network its config describes \(\d+ tensors"):
        load_module(tmp_path / "edited.ckpt")


# ------------------------------------------------------------------ 5. config errors: one line, exit 2, before work
BAD_RUNS = [
    (["optim.lr=abc"], "optim.lr='abc' must be a finite number in [0, 10]"),
    (["optim.lr=inf"], "optim.lr=inf must be a finite number in [0, 10]"),
    (["optim.lr=1e38"], "optim.lr=1e+38 must be a finite number in [0, 10]"),  # Adam's step would overflow float32
    (["net.base_channels=0"], "net.base_channels=0 must be an integer >= 1"),
    (["trainer.gradient_clip_val=-1"], "trainer.gradient_clip_val=-1 must be a finite number >= 0"),
    (["data.batch_size=5000"], "data.batch_size=5000 is larger than the training set (1617 images)"),
    (["callbacks=with_fid", "callbacks.fid.reference_split=tset"], "callbacks.fid.reference_split='tset' is unknown"),
    (["sampler.steps=5000"], "sampler.steps=5000 must be between 1 and diffusion.steps=1000"),
    (["lr_scheduler=warmup_cosine", "trainer.max_steps=-1"], "lr_scheduler.total_steps=-1 must be a positive step "
     "count; it follows trainer.max_steps"),  # OneCycleLR would fail after the data and model were built
    (["lr_scheduler=warmup_cosine", "+lr_scheduler.total_iters=200"], "lr_scheduler.total_iters is not an argument "
     "of torch.optim.lr_scheduler.OneCycleLR"),  # e.g. experiment=mnist_cpu's warmup setting under another schedule
    (["lr_scheduler=warmup_cosine", "lr_scheduler.pct_start=abc"], "lr_scheduler.pct_start='abc' must be a number"),
    (["lr_scheduler=warmup_cosine", "lr_scheduler.pct_start=2"], "lr_scheduler (torch.optim.lr_scheduler.OneCycleLR): "
     "Expected float between 0 and 1 pct_start, but got 2"),
    (["optim.fused=ture"], "optim.fused='ture' must be true, false or null"),
    (["optim.fused=true", "+trainer.precision=bf16-mixed"], "optim.fused=true cannot be combined with "
     "trainer.precision=bf16-mixed and trainer.gradient_clip_val=1.0"),
]


@pytest.mark.parametrize("overrides,message", BAD_RUNS, ids=[o[0][-1] for o in BAD_RUNS])
def test_bad_train_config_one_line_exit_2(tmp_path, capsys, overrides, message):
    with pytest.raises(SystemExit) as e:
        run(train, compose_train([*FAST, "logger=none", *overrides], tmp_path))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err == [f"error: {err[0][7:]}"] and message in err[0], err
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["num_samples=0"], "num_samples=0 must be an integer >= 1"),
        (["batch_size=0"], "batch_size=0 must be an integer >= 1"),
        (["fid.num_reference=2.5"], "fid.num_reference=2.5 must be an integer >= 2"),
        (["fid.reference_split=tset"], "fid.reference_split='tset' is unknown; allowed: train, val, test"),
    ],
)
def test_bad_evaluate_config_fails_before_sampling(tiny_ckpt, tmp_path, capsys, overrides, message):
    with pytest.raises(SystemExit) as e:
        run(evaluate, compose_train([f"ckpt_path={tiny_ckpt}", *overrides], tmp_path, "evaluate"))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and message in err[0], err
    assert not list(tmp_path.iterdir())  # nothing written


def test_real_cli_config_error_is_one_line():
    r = subprocess.run(
        [sys.executable, "train.py", "sampler.steps=5000", "logger=none", "hydra.run.dir=/tmp/_dl_cli_probe"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    _one_line(r, "sampler.steps=5000 must be between 1 and diffusion.steps=1000")


def test_full_disk_names_the_path_and_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    path.write_bytes(b"old")

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("os.fsync", no_space)
    with pytest.raises(DiskFullError, match=f"no space left on the device while writing {path}"):
        with atomic_write(path) as tmp:
            tmp.write_bytes(b"new")
    assert path.read_bytes() == b"old" and list(tmp_path.iterdir()) == [path]


# ------------------------------------------------------------------ 4. data that would give a wrong result
def test_16bit_png_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    (tmp_path / "imgs").mkdir()
    Image.fromarray(ramp).save(tmp_path / "imgs" / "ramp.png")
    assert Image.open(tmp_path / "imgs" / "ramp.png").mode == "I;16"
    dm = FolderDataModule(str(tmp_path / "imgs"), image_size=64, channels=1, val_fraction=0.0, hflip=False)
    x = dm.real_images("train")[0, 0].float()
    expected = torch.from_numpy(np.rint(ramp / 65535.0 * 255.0))
    assert (x - expected).abs().max() <= 1  # (PIL's convert("L") would make 94% of the ramp 255)
    assert (x == 255).float().mean() < 0.01


@pytest.mark.parametrize("folders", [3, 5])
def test_class_folders_must_match_net_num_classes(tmp_path, folders):
    for k in range(folders):
        (tmp_path / "imgs" / f"c{k}").mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((8, 8), 40 * k + i, np.uint8)).save(tmp_path / "imgs" / f"c{k}" / f"{i}.png")
    overrides = [
        *FAST,
        "logger=none",
        "data=folder",
        "net=unet_digits",
        f"data.path={tmp_path / 'imgs'}",
        "data.labels_from_subdirs=true",
        "data.image_size=8",
        "data.channels=1",
        "data.batch_size=4",
        "net.num_classes=4",
    ]
    with pytest.raises(ConfigError, match=f"net.num_classes=4 but the data has {folders} classes"):
        train(compose_train(overrides, tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_dataloader_workers_error_keeps_its_own_one_line():
    """torch re-raises a DataLoader worker's error with the worker's whole traceback in its message; the CLI's
    line is the worker's own message (a damaged remote chunk found in a worker, tests/test_stream.py), for an error
    type printed with its module too."""
    from torch._utils import ExceptionWrapper

    from diffusion_lab.cli import one_line
    from diffusion_lab.io import DiskFullError

    for kind in (ValueError, DiskFullError):
        try:
            raise kind("chunk x.bin does not match\nits sha256")
        except kind:
            wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
        with pytest.raises(kind) as caught:
            wrapped.reraise()
        assert "Original Traceback" in str(caught.value)
        assert one_line(caught.value) == "chunk x.bin does not match its sha256", kind


def test_check_count_takes_integers_only():
    import numpy as np

    from diffusion_lab.checks import check_count

    assert check_count("k", np.int64(3)) == 3 and type(check_count("k", np.int64(3))) is int
    assert check_count("k", 0, 0) == 0
    for value, minimum in ((0, 1), (2.0, 1), (True, 1), ("3", 1), (None, 1), (1, 2)):
        with pytest.raises(ValueError, match=rf"^k={value!r} must be an integer >= {minimum}$"):
            check_count("k", value, minimum)
    with pytest.raises(ValueError, match=r"^sampler.guide.step=0 must be an integer >= 1 \(a training step\)$"):
        check_count("sampler.guide.step", 0, why="(a training step)")


@pytest.mark.parametrize("value", [1, 2.5, True, "32"])
def test_a_bad_fid_callback_reference_count_is_refused_naming_the_key(value):
    from diffusion_lab.lit.fid_callback import FIDCallback

    with pytest.raises(ValueError, match=rf"callbacks.fid.num_reference={value!r} must be an integer >= 2"):
        FIDCallback(num_reference=value)
