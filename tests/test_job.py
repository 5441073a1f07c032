"""A run as a job script drives it: streamed shards resumed mid-epoch, --resume at any point
of a killed run, SIGTERM, a loss that is not a number, and evaluation shared by processes."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import TINY_IMAGE_TEXT, run_mmkit
from mmkit.data.shapes import SyntheticShapes
from mmkit.data.shards import write_shards
from mmkit.engine.checkpoint import latest_checkpoint
from mmkit.engine.loop import optimizer_step
from mmkit.tasks.base import Task
from mmkit.errors import MMKitError
from mmkit.specs import TrainSpec


@pytest.fixture
def shard_recipe(tmp_path: Path) -> Path:
    """The tiny recipe on webdataset shards: 6 train shards of 16 samples, 2 val shards."""
    train, val = SyntheticShapes(96, "train", 32), SyntheticShapes(32, "val", 32, seed=0)
    write_shards((train[i] for i in range(96)), tmp_path / "train-%06d.tar", per_shard=16)
    write_shards((val[i] for i in range(32)), tmp_path / "val-%06d.tar", per_shard=16)
    text = textwrap.dedent(TINY_IMAGE_TEXT.format(runs=tmp_path / "runs"))
    start, end = text.index("[data]"), text.index("[model.image]")
    data = f'[data]\nname = "webdataset"\nurls = "{tmp_path}/train-{{000000..000005}}.tar"\n\n' \
           f'[data.val]\nurls = "{tmp_path}/val-{{000000..000001}}.tar"\n\n'
    path = tmp_path / "shards.toml"
    path.write_text(text[:start] + data + text[end:])
    return path


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# 2 workers, 3 shards each of 16 samples, batch 16: an epoch is 6 batches. The checkpoint at
# step 5 is mid-epoch, with the second worker's share next; step 9 is in the second epoch.
STREAM = ["train.max_steps=9", "train.checkpoint_every=5", "train.num_workers=2", "eval.every=0"]


def test_a_stream_resumed_mid_epoch_ends_with_the_weights_of_an_uninterrupted_run(shard_recipe):
    runs = shard_recipe.parent / "runs"
    assert (done := run_mmkit("run", shard_recipe, *STREAM)).returncode == 0, done.stderr
    straight = runs / "tiny"
    resumed = runs / "resumed"
    shutil.copytree(straight, resumed)
    for path in [resumed / "checkpoints" / "step_00000009", resumed / "summary.json", resumed / "model.safetensors"]:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    assert latest_checkpoint(resumed / "checkpoints").name == "step_00000005"
    again = run_mmkit("run", shard_recipe, *STREAM, "run.name=resumed", "--resume")
    assert again.returncode == 0, again.stderr
    assert same(weights(straight), weights(resumed))
    changed = run_mmkit("run", shard_recipe, *STREAM[:2], "eval.every=0", "train.num_workers=1",
                        "run.name=resumed", "--resume")
    assert changed.returncode == 2 and "num_workers 2 -> 1" in changed.stderr


def test_resume_after_the_last_checkpoint_writes_the_final_files(shard_recipe):
    runs = shard_recipe.parent / "runs"
    assert run_mmkit("run", shard_recipe, *STREAM).returncode == 0
    straight = runs / "tiny"
    expected = json.loads((straight / "summary.json").read_text())
    killed = runs / "killed"
    shutil.copytree(straight, killed)  # as a kill -9 between the last checkpoint and the final files leaves it
    for name in ["summary.json", "model.safetensors", "report.html"]:
        (killed / name).unlink()
    again = run_mmkit("run", shard_recipe, *STREAM, "run.name=killed", "--resume")
    assert again.returncode == 0, again.stderr
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["metrics"] == expected["metrics"] and summary["steps"] == 9
    assert summary["train_seconds"] == expected["train_seconds"]  # training was not run again
    assert summary["mfu"] == expected["mfu"] and summary["mfu"] > 0  # the count the checkpoint kept
    assert same(weights(straight), weights(killed)) and (killed / "report.html").exists()
    finished = run_mmkit("run", shard_recipe, *STREAM, "run.name=killed", "--resume")
    assert finished.returncode == 0 and "is finished (summary.json written); nothing to resume" in finished.stdout


def test_sigterm_writes_a_checkpoint_and_exits_cleanly(tiny_recipe):
    folder = tiny_recipe.parent / "runs" / "tiny"
    steps = ["train.max_steps=80", "train.checkpoint_every=1000", "train.log_every=1", "eval.every=0",
             "train.num_workers=1"]
    process = subprocess.Popen([sys.executable, "-m", "mmkit", "run", str(tiny_recipe), *steps],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (folder / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert "Traceback" not in stderr and "stopped by SIGTERM at step " in stderr
    step = int(stderr.split("stopped by SIGTERM at step ")[1].split()[0])
    assert latest_checkpoint(folder / "checkpoints").name == f"step_{step:08d}" and 0 < step < 80
    resumed = run_mmkit("run", tiny_recipe, *steps, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((folder / "summary.json").read_text())["steps"] == 80


def test_sigterm_to_one_of_two_processes_stops_both_at_one_step_with_a_checkpoint(tiny_recipe):
    """Under torchrun a signal reaches one process (a preempted node): every process stops
    after the same step, and that step's checkpoint holds each process's data position."""
    import psutil

    folder = tiny_recipe.parent / "runs" / "tiny"
    torchrun = Path(sys.executable).with_name("torchrun")
    launcher = subprocess.Popen([str(torchrun), "--nproc_per_node", "2", "-m", "mmkit", "run", str(tiny_recipe),
                                 "run.device=cpu", "train.max_steps=400", "train.checkpoint_every=1000",
                                 "train.log_every=1", "eval.every=0"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not (folder / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.05)
    workers = [p for p in psutil.Process(launcher.pid).children(recursive=True) if "mmkit" in " ".join(p.cmdline())]
    second = next(p for p in workers if p.environ().get("RANK") == "1")
    second.send_signal(signal.SIGTERM)
    try:
        _, stderr = launcher.communicate(timeout=120)
    finally:  # processes that stopped at different steps wait for each other forever
        for process in [*workers, psutil.Process(launcher.pid)] if launcher.poll() is None else ():
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
    stops = [int(part.split()[0]) for part in stderr.split("stopped by SIGTERM at step ")[1:]]
    assert len(stops) == 2 and stops[0] == stops[1] and 0 < stops[0] < 400, stderr[-3000:]  # both, the same step
    checkpoint = latest_checkpoint(folder / "checkpoints")
    assert checkpoint.name == f"step_{stops[0]:08d}"
    assert (checkpoint / "data_0.json").exists() and (checkpoint / "data_1.json").exists()


class Scaled(Task):
    """A one-weight model whose loss is weight x the batch's value: a NaN batch gives a NaN loss."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1))

    def training_step(self, batch):
        return {"loss/scaled": (self.weight * batch["x"]).sum()}


def test_a_step_whose_loss_is_not_a_number_leaves_weights_and_optimizer_as_they_were():
    from accelerate import Accelerator

    from mmkit.engine.schedule import adamw

    model = Scaled()
    optimizer = adamw(model, lr=0.1, weight_decay=0.0)
    spec = TrainSpec(grad_accum=2)
    nan = [{"x": torch.tensor([1.0])}, {"x": torch.tensor([float("nan")])}]
    losses, finite = optimizer_step(model, optimizer, nan, spec, Accelerator(cpu=True))
    assert losses["loss"].isnan() and not finite.item()
    assert model.weight.item() == 1.0 and model.weight.grad is None  # no update, nothing left to leak
    assert optimizer.state[model.weight]["step"].item() == 0  # Adam's bias correction starts again at step 1
    losses, finite = optimizer_step(model, optimizer, [{"x": torch.tensor([1.0])}, {"x": torch.tensor([3.0])}],
                                    spec, Accelerator(cpu=True))
    assert finite.item() and losses["loss"].item() == 2.0
    # Adam's first step moves by lr whatever the gradient (m / sqrt(v) = 1); counted as a second
    # step it would move by 0.1 * 0.526 / 0.707 = 0.074
    assert model.weight.item() == pytest.approx(1.0 - 0.1, abs=1e-6)


def test_an_optimizer_that_cannot_skip_on_the_device_is_refused():
    from accelerate import Accelerator

    model = Scaled()
    with pytest.raises(TypeError, match="SGD is not fused"):
        optimizer_step(model, torch.optim.SGD(model.parameters(), lr=0.1), [{"x": torch.tensor([1.0])}],
                       TrainSpec(), Accelerator(cpu=True))


@pytest.mark.parametrize("on_nan", ["raise", "skip"])
def test_the_loss_watch_reads_the_steps_flags_at_once_and_names_the_first_that_is_not_finite(on_nan, capsys):
    from mmkit.engine.loop import LossWatch

    watch = LossWatch(on_nan)
    for step, loss in [(3, 1.5), (4, float("nan")), (5, float("inf")), (6, 0.5)]:
        watch.add(step, torch.tensor(loss), torch.isfinite(torch.tensor(loss)))
    if on_nan == "raise":
        with pytest.raises(MMKitError, match="step 4: the loss is nan, not a number; its update was skipped and the run "
                                             "stopped at step 6, before its next checkpoint"):
            watch.skipped()
    else:
        assert watch.skipped() == [4, 5]
        assert capsys.readouterr().out.splitlines() == ['step 4: the loss is nan; update skipped (train.on_nan = "skip")',
                                                        'step 5: the loss is inf; update skipped (train.on_nan = "skip")']
    assert watch.skipped() == []  # each flag is read once
    watch.add(7, torch.tensor(2.0), torch.tensor(True))
    assert watch.skipped() == []


def test_a_diverging_run_halts_naming_the_step_and_writes_no_checkpoint_after(tiny_recipe):
    folder = tiny_recipe.parent / "runs" / "tiny"
    diverging = ["train.lr=1e30", "train.warmup=0", "train.checkpoint_every=1", "train.max_steps=20",
                 "train.log_every=50"]  # only the checkpoints read the losses before the end
    failed = run_mmkit("run", tiny_recipe, *diverging)
    assert failed.returncode == 2
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith("mmkit: error: step ") and "not a number; its update was skipped" in last
    step = int(last.split("step ")[1].split(":")[0])
    assert latest_checkpoint(folder / "checkpoints").name == f"step_{step - 1:08d}"
    skipped = run_mmkit("run", tiny_recipe, *diverging, "train.on_nan=skip", "run.name=skipping")
    assert skipped.returncode == 0, skipped.stderr
    summary = json.loads((folder.parent / "skipping" / "summary.json").read_text())
    assert 0 < summary["skipped_steps"] <= 20 - step + 1


def test_two_processes_evaluate_as_one(tiny_recipe):
    """Each process predicts half of the held-out set; the joined metrics equal one process's."""
    from accelerate import Accelerator
    from safetensors.torch import load_model

    from mmkit.components import build_parts
    from mmkit.engine.run import Run
    from mmkit.plugins import get_registry
    from mmkit.recipe import load_recipe

    torchrun = Path(sys.executable).with_name("torchrun")
    done = subprocess.run([str(torchrun), "--nproc_per_node", "2", "-m", "mmkit", "run", str(tiny_recipe),
                           "run.device=cpu", "eval.batch_size=5"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    folder = tiny_recipe.parent / "runs" / "tiny"
    recipe = load_recipe(folder / "recipe.toml", ["eval.batch_size=7"])
    run = Run(recipe)
    parts = build_parts(recipe, get_registry())
    load_model(parts.task, folder / "model.safetensors")
    metrics = run._evaluation(parts, Accelerator(cpu=True)).metrics(parts.task, Accelerator(cpu=True))
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["metrics"] == pytest.approx({k.removeprefix("val/"): v for k, v in metrics.items()
                                               if not k.startswith("val/chance/")}, abs=1e-6)
