"""The engine as a user meets it: run folders, checkpoints, kill-and-resume, reproduction."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_mmkit
from mmkit import build
from mmkit.engine.checkpoint import latest_checkpoint
from mmkit.engine.loop import CompileStats, Interval, compile_stats, optimizer_step, step_batches, step_plan
from mmkit.engine.run import Run, RunPaths
from mmkit.engine.schedule import param_groups, warmup_cosine
from mmkit.errors import MMKitError
from mmkit.recipe import load_recipe
from mmkit.specs import TrainSpec
from mmkit.tasks.base import Task


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_a_run_leaves_a_complete_folder(tiny_recipe):
    summary = Run(load_recipe(tiny_recipe)).fit()
    folder = tiny_recipe.parent / "runs" / "tiny"
    for name in ("recipe.toml", "metrics.jsonl", "model.safetensors", "summary.json", "report.html",
                 "training_curves.png", "throughput.png", "retrieval_examples.png", "similarity.png"):
        assert (folder / name).stat().st_size > 0, name
    assert list((folder / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((folder / "summary.json").read_text()) == summary
    assert summary["steps"] == 6 and summary["samples_per_second"] > 0
    for direction in ("image_to_text", "text_to_image"):
        assert 0 <= summary["metrics"][f"{direction}/R@5"] <= 1
        assert 0 < summary["chance"][f"{direction}/R@5"] < 1
    steps = [r["step"] for r in records(folder) if "train/loss" in r]
    assert steps == [2, 4, 6]
    # each line's lr is the rate its step trained at: step s at factor(s - 1) of warmup 2, then cosine over 4
    lrs = [r["lr"] for r in records(folder) if "train/loss" in r]
    assert lrs == pytest.approx([1e-3, 1e-3 * (1 + math.cos(math.pi / 4)) / 2, 1e-3 * (1 + math.cos(3 * math.pi / 4)) / 2],
                                rel=1e-9)
    evals = [r["step"] for r in records(folder) if "val/image_to_text/R@1" in r]
    assert evals == [3, 6]
    assert '<img src="retrieval_examples.png">' in (folder / "report.html").read_text()


def test_a_final_evaluation_that_fails_leaves_the_trained_weights_for_mmkit_eval(tiny_recipe, monkeypatch, capsys):
    from mmkit.engine.evaluation import Evaluation

    def bad_row(self, task, accelerator):
        raise MMKitError("val.csv row 7: images/000005.jpg: missing file")

    with monkeypatch.context() as patched:
        patched.setattr(Evaluation, "outputs", bad_row)
        with pytest.raises(MMKitError, match="row 7"):
            Run(load_recipe(tiny_recipe, ["train.checkpoint_every=0", "eval.every=0"])).fit()
    folder = tiny_recipe.parent / "runs" / "tiny"
    assert f"the trained weights are in {folder / 'model.safetensors'}" in capsys.readouterr().out
    assert not (folder / "summary.json").exists() and not latest_checkpoint(folder / "checkpoints")
    trained = weights(folder)
    assert any(key.startswith("encoders.image.") for key in trained)
    summary = Run(load_recipe(folder / "recipe.toml")).evaluate(folder)  # the data mended: the weights judged
    assert summary["metrics"]["image_to_text/R@1"] >= 0 and load_file(folder / "model.safetensors").keys() == trained.keys()


def test_an_evaluation_that_fails_mid_run_keeps_the_steps_trained_for_resume(tiny_recipe, monkeypatch, capsys):
    from mmkit.engine.evaluation import Evaluation

    def bad_row(self, task, accelerator, outputs=None, calibrate=False):
        raise MMKitError("val.csv row 7: images/000005.jpg: missing file")

    settings = ["train.max_steps=8", "train.checkpoint_every=0", "eval.every=4"]  # no checkpoint would be due
    Run(load_recipe(tiny_recipe, [*settings, "run.name=straight"])).fit()
    with monkeypatch.context() as patched:
        patched.setattr(Evaluation, "metrics", bad_row)
        with pytest.raises(MMKitError, match="row 7"):
            Run(load_recipe(tiny_recipe, settings)).fit()
    runs = tiny_recipe.parent / "runs"
    assert "the evaluation at step 4 did not finish; checkpoint step 4 written" in capsys.readouterr().out
    assert latest_checkpoint(runs / "tiny" / "checkpoints").name == "step_00000004"
    Run(load_recipe(tiny_recipe, settings), resume=True).fit()  # the held-out data mended
    assert [r["step"] for r in records(runs / "tiny") if "train/loss" in r] == [2, 4, 6, 8]
    straight, resumed = weights(runs / "straight"), weights(runs / "tiny")
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_a_run_logs_its_model_flops_utilisation(tiny_recipe):
    summary = Run(load_recipe(tiny_recipe)).fit()
    folder = tiny_recipe.parent / "runs" / "tiny"
    flops, peak = summary["flops_per_sample"], summary["peak_flops_per_s"]
    assert flops > 0 and peak > 0
    logged = [r for r in records(folder) if "train/loss" in r]
    for record in logged:  # each log line's MFU is its own rate's
        assert record["mfu"] == pytest.approx(record["samples_per_s"] * flops / peak, rel=1e-9)
        assert 0 < record["data_share"] < 1  # no workers: the loop makes each batch itself
    assert summary["mfu"] == pytest.approx(summary["samples_per_second"] * flops / peak, rel=1e-3)
    assert summary["compile"] is None  # eager
    assert f"MFU {summary['mfu']:.1%}" in (folder / "report.html").read_text()
    assert '<img src="throughput.png">' in (folder / "report.html").read_text()


def test_checkpoints_hold_only_safetensors_and_json(tiny_recipe):
    Run(load_recipe(tiny_recipe, ["train.keep_checkpoints=1"])).fit()
    checkpoints = tiny_recipe.parent / "runs" / "tiny" / "checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == ["step_00000006"]
    files = sorted(p.name for p in (checkpoints / "step_00000006").iterdir())
    assert files == ["data_0.json", "model.safetensors", "optimizer.safetensors", "rng_0.json", "rng_0.safetensors",
                     "trainer.json"]
    (checkpoints / ".partial-step_00000009").mkdir()  # what a crash mid-write leaves
    assert latest_checkpoint(checkpoints).name == "step_00000006"


def test_rerunning_the_written_recipe_reproduces_the_run(tiny_recipe):
    Run(load_recipe(tiny_recipe)).fit()
    first = tiny_recipe.parent / "runs" / "tiny"
    again = Run(load_recipe(first / "recipe.toml"))
    again.fit()
    assert again.paths.folder.name == "tiny-2"  # a run never overwrites another
    a, b = weights(first), weights(again.paths.folder)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_kill_and_resume_continues_where_it_stopped(tiny_recipe):
    steps = ["train.max_steps=150", "train.checkpoint_every=5", "eval.every=0", "train.log_every=1",
             "model.text.dropout=0.1"]  # dropout draws from the RNG that resuming must restore
    assert run_mmkit("run", tiny_recipe, *steps, "run.name=straight").returncode == 0
    runs = tiny_recipe.parent / "runs"

    command = [sys.executable, "-m", "mmkit", "run", str(tiny_recipe), *steps, "run.name=killed"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while latest_checkpoint(runs / "killed" / "checkpoints") is None and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (runs / "killed" / "summary.json").exists(), "the run ended before it could be killed"
    stopped_at = int(latest_checkpoint(runs / "killed" / "checkpoints").name.split("_")[1])
    assert stopped_at < 150
    with (runs / "killed" / "metrics.jsonl").open("a") as log:
        log.write('{"step": 99, "train/lo')  # a line cut short by the kill

    resumed = run_mmkit("run", tiny_recipe, *steps, "run.name=killed", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    straight, killed = weights(runs / "straight"), weights(runs / "killed")
    assert all(torch.equal(straight[k], killed[k]) for k in straight)
    logged = [r["step"] for r in records(runs / "killed") if "train/loss" in r]
    assert logged == list(range(1, 151))  # steps past the checkpoint were logged once, not twice
    same_losses = [r["train/loss"] for r in records(runs / "straight") if "train/loss" in r]
    assert [r["train/loss"] for r in records(runs / "killed") if "train/loss" in r] == same_losses
    assert tensorboard_steps(runs / "killed", "train/loss") == list(range(1, 151))


def tensorboard_steps(folder: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder / "tensorboard"))
    events.Reload()
    return [event.step for event in events.Scalars(tag)]


def files(folder: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def test_a_resume_that_cannot_work_says_why_and_changes_nothing(tiny_recipe):
    Run(load_recipe(tiny_recipe)).fit()
    folder = tiny_recipe.parent / "runs" / "tiny"
    before = files(folder)
    layout = run_mmkit("run", tiny_recipe, "train.batch_size=8", "--resume")
    assert layout.returncode == 2
    assert "cannot resume from " in layout.stderr and "(train.batch_size 16 -> 8)" in layout.stderr
    for override, change in (("run.seed=1", "run.seed 0 -> 1"), ("data.num_samples=80", "training samples 64 -> 80")):
        with pytest.raises(MMKitError, match=rf"another data layout \({change}\)"):  # another order from here on
            Run(load_recipe(tiny_recipe, [override]), resume=True).fit()
    for override, change in (("train.lr=0.1", "train.lr 0.001 -> 0.1"), ("train.beta2=0.98", "train.beta2 0.999 -> 0.98"),
                             ("train.weight_decay=0", "train.weight_decay 0.1 -> 0")):
        with pytest.raises(MMKitError, match=rf"{change}; a resumed run keeps the optimizer settings its checkpoint"):
            Run(load_recipe(tiny_recipe, [override]), resume=True).fit()
    model = run_mmkit("run", tiny_recipe, "model.text.width=64", "--resume")
    assert model.returncode == 2 and len(model.stderr.strip().splitlines()) == 1
    assert "the recipe builds another model (encoders.text.position_embedding is [16, 32] in the checkpoint, " \
           "[16, 64] here)" in model.stderr
    frozen = run_mmkit("run", tiny_recipe, "model.image.freeze=true", "--resume")
    assert frozen.returncode == 2
    assert "the recipe trains other parameters (optimizer groups of [" in frozen.stderr
    finished = run_mmkit("run", tiny_recipe, "--resume")
    assert finished.returncode == 0, finished.stderr
    assert f"{folder} is finished (summary.json written); nothing to resume" in finished.stdout
    assert files(folder) == before
    assert sorted(p.name for p in folder.parent.iterdir()) == ["tiny"]


def test_a_step_bigger_than_the_data_is_refused_before_the_folder(tiny_recipe):
    with pytest.raises(MMKitError, match="batch_size 16 x grad_accum 5 x 1 processes is more than the 64"):
        Run(load_recipe(tiny_recipe, ["train.grad_accum=5"])).fit()
    assert not (tiny_recipe.parent / "runs").exists()


def test_resume_without_a_checkpoint_starts_over_in_the_same_folder(tiny_recipe):
    folder = tiny_recipe.parent / "runs" / "tiny"
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text('{"step": 1, "train/loss": 9.0, "time": 0}\n')  # killed before step 3
    started = run_mmkit("run", tiny_recipe, "--resume")
    assert started.returncode == 0, started.stderr
    assert f"no checkpoint in {folder} yet: starting the run over there" in started.stdout
    assert sorted(p.name for p in folder.parent.iterdir()) == ["tiny"]
    assert [r["step"] for r in records(folder) if "train/loss" in r] == [2, 4, 6]  # the stale line is gone
    assert (folder / "summary.json").exists()


def test_bf16_and_gradient_accumulation_run_on_cpu(tiny_recipe):
    summary = Run(load_recipe(tiny_recipe, ["run.precision=bf16", "train.grad_accum=2",
                                            "train.clip_grad=0.5", "run.name=bf16"])).fit()
    assert summary["precision"] == "bf16" and summary["steps"] == 6
    assert torch.isfinite(torch.tensor([r["train/loss"] for r in records(tiny_recipe.parent / "runs" / "bf16")
                                        if "train/loss" in r])).all()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_fp16_is_refused_where_auto_finds_no_gpu(tiny_recipe):
    with pytest.raises(MMKitError, match='run.precision = "fp16" needs a GPU, and this run found none'):
        Run(load_recipe(tiny_recipe, ["run.device=auto", "run.precision=fp16"])).fit()
    assert not (tiny_recipe.parent / "runs").exists()


def test_epochs_on_the_command_line_replace_the_recipes_max_steps(tiny_recipe):
    # 64 samples, batch 16, accumulation 2: two optimizer steps per epoch; the recipe says max_steps = 6.
    summary = Run(load_recipe(tiny_recipe, ["train.epochs=2", "train.grad_accum=2"])).fit()
    assert summary["steps"] == 4 and summary["epochs"] == 2


def test_epochs_count_micro_batches_where_accumulation_does_not_divide_an_epoch():
    # 8 batches an epoch, 3 a step: a step's batches run on across the epoch's end, so 2 epochs
    # (16 batches) hold 5 whole steps, 1.875 epochs; 3 epochs (24 batches) hold 8 steps
    assert step_plan(TrainSpec(epochs=2, batch_size=8, grad_accum=3), 8, 1, "64") == (8 / 3, 5)
    assert step_plan(TrainSpec(epochs=3, batch_size=8, grad_accum=3), 8, 1, "64") == (8 / 3, 8)
    assert step_plan(TrainSpec(epochs=2, batch_size=8, grad_accum=2), 8, 1, "64") == (4, 8)
    assert step_plan(TrainSpec(max_steps=7, batch_size=8, grad_accum=3), 8, 1, "64") == (8 / 3, 7)


def test_warmup_then_cosine():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = warmup_cosine(optimizer, warmup=4, total=14)
    lrs = []
    for _ in range(14):
        lrs.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    # step s < 4 trains at (s + 1) / 4; then cos decay over the 10 steps left: 0.5 (1 + cos(pi (s - 4) / 10))
    cosine = [0.5 * (1 + math.cos(math.pi * t / 10)) for t in range(10)]
    assert lrs == pytest.approx([0.25, 0.5, 0.75, 1.0, *cosine], abs=1e-12)
    assert lrs[9] == pytest.approx(0.5, abs=1e-12)


def test_the_recipe_sets_adamws_betas_and_eps(tiny_recipe):
    from accelerate import Accelerator

    from mmkit.engine.loop import Trainer

    train = load_recipe(tiny_recipe, ["train.beta2=0.98", "train.eps=1e-6"]).spec("train")
    trainer = Trainer(Regression(), None, train, Accelerator(cpu=True), None, RunPaths(tiny_recipe.parent), 10, {},
                      None)
    assert all(g["betas"] == (0.9, 0.98) and g["eps"] == 1e-6 for g in trainer.optimizer.param_groups)
    assert TrainSpec(beta2=1.0, eps=0.0).problems() == {"beta2": "must be at least 0 and below 1", "eps": "must be positive"}


def test_weight_decay_falls_on_matrices_only():
    model = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    model[0].weight.requires_grad_(False)  # frozen parameters are not handed to the optimizer
    decay, no_decay = param_groups(model, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert [p.shape for p in decay["params"]] == [(3, 4)]
    assert [p.shape for p in no_decay["params"]] == [(3,), (3,), (3,)]  # linear bias, norm weight and bias


class Regression(Task):
    """A per-sample loss (mean squared error), so one big batch and its halves must agree."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 2)

    def training_step(self, batch):
        return {"loss/mse": torch.nn.functional.mse_loss(self.linear(batch["x"]), batch["y"])}


class TwoTerms(Task):
    """Two loss terms on one weight: a = 2w, b = 3w (w starts at 1)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))

    def training_step(self, batch):
        return {"loss/a": 2 * self.w, "loss/b": 3 * self.w, "accuracy": torch.tensor(0.5)}


def test_the_optimizer_minimises_the_weighted_sum_of_the_named_loss_terms():
    from accelerate import Accelerator

    task = TwoTerms()
    optimizer = torch.optim.SGD(task.parameters(), lr=0.1, fused=True)
    spec = TrainSpec(loss_weights={"b": 0.5})
    losses, finite = optimizer_step(task, optimizer, [{}], spec, Accelerator(cpu=True))
    assert finite.item()
    assert losses["loss"].item() == pytest.approx(2 + 0.5 * 3)  # a weighs 1 (not named), b 0.5
    assert (losses["loss/a"].item(), losses["loss/b"].item(), losses["accuracy"].item()) == (2, 3, 0.5)  # each logged
    assert task.w.item() == pytest.approx(1 - 0.1 * (2 + 0.5 * 3))  # d(2w + 1.5w)/dw = 3.5
    with pytest.raises(MMKitError, match="train.loss_weights names c, which the task does not return; its loss terms: a, b"):
        optimizer_step(task, optimizer, [{}], TrainSpec(loss_weights={"c": 1.0}), Accelerator(cpu=True))


class OldStyle(Task):
    def training_step(self, batch):
        return {"loss": torch.ones((), requires_grad=True)}


def test_a_task_without_named_loss_terms_is_told_how_to_name_them():
    from accelerate import Accelerator

    with pytest.raises(MMKitError, match="name each loss term under 'loss/'"):
        optimizer_step(OldStyle(), None, [{}], TrainSpec(), Accelerator(cpu=True))


def test_two_accumulated_half_batches_step_like_one_batch():
    from accelerate import Accelerator

    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 3, generator=generator), torch.randn(24, 2, generator=generator)

    def one_step(batch_size: int, grad_accum: int):
        torch.manual_seed(0)
        task = Regression()
        optimizer = torch.optim.SGD(task.parameters(), lr=0.5, fused=True)  # plain SGD shows a wrong gradient scale
        batches = iter([{"x": x[i:i + batch_size], "y": y[i:i + batch_size]} for i in range(0, 24, batch_size)])
        spec = TrainSpec(batch_size=batch_size, grad_accum=grad_accum)
        taken = step_batches(task, batches, grad_accum, torch.device("cpu"))
        losses, _ = optimizer_step(task, optimizer, taken, spec, Accelerator(cpu=True))
        return task.linear, losses["loss"], next(batches)["x"]

    whole, whole_loss, _ = one_step(16, 1)
    halves, halves_loss, after = one_step(8, 2)
    assert torch.allclose(whole.weight, halves.weight, atol=1e-6) and torch.allclose(whole.bias, halves.bias, atol=1e-6)
    assert halves_loss.item() == pytest.approx(whole_loss.item(), abs=1e-6)  # logged loss: the mean of both
    assert torch.equal(after, x[16:24])  # the step took exactly its two micro-batches


class MaskedTokens(Task):
    """A loss summed over the masked items of a batch (as MLM over masked tokens), which
    ``prepare`` picks at random: a mean over items must not depend on how they split."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))

    def prepare(self, batch, generator=None):
        return {**batch, "masked": torch.rand(batch["x"].shape, generator=generator) < 0.4}

    def item_counts(self, batch):
        return {"loss/masked": batch["masked"].sum(), "hits": batch["masked"].sum()}

    def training_step(self, batch):
        errors = ((self.w * batch["x"] - 1) ** 2)[batch["masked"]]
        return {"loss/masked": errors.sum(), "hits": (errors < 1).sum().float(), "batches": torch.tensor(1.0)}


def test_a_summed_loss_is_divided_by_the_items_of_the_whole_step_not_averaged_per_micro_batch():
    from accelerate import Accelerator

    x = torch.linspace(-2, 2, 24).reshape(4, 6)

    def one_step(rows: int, grad_accum: int):
        torch.manual_seed(3)  # the same masks, drawn row block by row block
        task = MaskedTokens()
        optimizer = torch.optim.SGD(task.parameters(), lr=0.1, fused=True)
        batches = step_batches(task, iter([{"x": x[i:i + rows]} for i in range(0, 4, rows)]), grad_accum,
                               torch.device("cpu"))
        losses, _ = optimizer_step(task, optimizer, batches, TrainSpec(grad_accum=grad_accum), Accelerator(cpu=True))
        return task.w.item(), losses

    torch.manual_seed(3)
    masks = torch.cat([torch.rand(1, 6) < 0.4 for _ in range(4)])
    assert len(set(masks.sum(1).tolist())) > 1  # uneven rows: a mean of the micro-batch means would differ
    errors = ((x - 1) ** 2)[masks]
    whole_w, whole = one_step(4, 1)
    halves_w, halves = one_step(1, 4)
    for losses in (whole, halves):
        assert losses["loss/masked"].item() == pytest.approx(errors.mean().item())
        assert losses["hits"].item() == pytest.approx((errors < 1).double().mean().item())
        assert losses["batches"].item() == pytest.approx(1.0)  # a plain value: the mean over micro-batches
    gradient = (2 * (x - 1) * x)[masks].mean().item()
    assert whole_w == pytest.approx(1 - 0.1 * gradient) and halves_w == pytest.approx(whole_w)


def test_a_resumed_run_with_accumulation_ends_bit_identical(tiny_recipe):
    """Batch 8 x 2 micro-batches: the step-3 checkpoint sits 6 micro-batches into the 8 of an epoch."""
    settings = ["train.batch_size=8", "train.grad_accum=2", "train.checkpoint_every=3", "eval.every=0",
                "model.text.dropout=0.1"]
    Run(load_recipe(tiny_recipe, settings)).fit()
    runs = tiny_recipe.parent / "runs"
    shutil.copytree(runs / "tiny", runs / "cut")  # as if killed after the step-3 checkpoint
    shutil.rmtree(runs / "cut" / "checkpoints" / "step_00000006")
    (runs / "cut" / "model.safetensors").unlink()
    Run(load_recipe(tiny_recipe, [*settings, "run.name=cut"]), resume=True).fit()
    straight, resumed = weights(runs / "tiny"), weights(runs / "cut")
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_the_summary_holds_the_last_held_out_record_and_its_exact_chance(tiny_recipe):
    summary = Run(load_recipe(tiny_recipe)).fit()
    held_out = [r for r in records(tiny_recipe.parent / "runs" / "tiny") if "val/image_to_text/R@1" in r]
    last = held_out[-1]
    assert last["step"] == 6
    assert summary["metrics"] == {k[4:]: v for k, v in last.items() if k.startswith("val/") and "chance" not in k}
    assert summary["chance"] == {k[11:]: v for k, v in last.items() if k.startswith("val/chance/")}
    val = build("datasets", "synthetic_shapes", split="val", num_samples=32, image_size=32)
    captions = [val[i]["text"] for i in range(32)]
    share = sum(captions.count(c) for c in captions) / 32 / 32  # chance R@1: mean share of one's own caption
    assert summary["chance"]["text_to_image/R@1"] == pytest.approx(share, abs=1e-12)
    mean_rank = sum(33 / (captions.count(c) + 1) for c in captions) / 32
    assert summary["chance"]["image_to_text/mean_rank"] == pytest.approx(mean_rank, abs=1e-12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("loss", [1.0, float("nan")])
def test_an_optimizer_step_on_the_gpu_never_waits_for_the_device(loss):
    """The step queues its work and returns: CUDA's sync debug mode raises at any host sync."""
    from accelerate import Accelerator

    from mmkit.engine.schedule import adamw

    accelerator = Accelerator()
    task = Regression().to(accelerator.device)
    optimizer = adamw(task, 0.1, 0.1)
    batch = {"x": torch.randn(8, 3, device="cuda"), "y": torch.zeros(8, 2, device="cuda")}
    optimizer_step(task, optimizer, [batch], TrainSpec(clip_grad=1.0), accelerator)  # the optimizer's state made
    batch["x"] = batch["x"] * loss
    before = task.linear.weight.detach().clone()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses, finite = optimizer_step(task, optimizer, [batch], TrainSpec(clip_grad=1.0), accelerator)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert finite.item() == (loss == 1.0)
    assert torch.equal(task.linear.weight, before) != (loss == 1.0)  # updated only where the loss is finite


def loader_batch(tiny_recipe: Path, device: str) -> tuple[dict, dict, object]:
    """The first batch a run on ``device`` reads from its loader (one worker), and what then
    finishes it on the device; the run's image encoder."""
    from mmkit.components import build_parts
    from mmkit.data.loader import EpochBatches, Preprocessed, train_loader
    from mmkit.plugins import get_registry

    parts = build_parts(load_recipe(tiny_recipe), get_registry())
    dataset = Preprocessed(parts.train_set, parts.transforms)
    collate, on_device = parts.batching(torch.device(device))
    loader = train_loader(dataset, EpochBatches(len(dataset), 8, seed=0), 1, False, collate)
    return next(iter(loader)), on_device, parts.encoders["image"]


def test_a_cpu_runs_loader_workers_hand_over_normalised_images(tiny_recipe):
    batch, on_device, image = loader_batch(tiny_recipe, "cpu")
    assert on_device == {} and batch["image"].dtype == torch.float32  # nothing left for the main process
    assert -2.2 < batch["image"].min() < 0 < batch["image"].max() < 2.7  # ImageNet-normalised, not [0, 1] or [0, 255]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_images_cross_to_the_gpu_as_uint8_and_are_normalised_there_as_on_the_cpu(tiny_recipe):
    from mmkit.data.loader import to_device

    batch, on_device, image = loader_batch(tiny_recipe, "cuda")
    assert batch["image"].dtype == torch.uint8 and set(on_device) == {"image"}
    on_gpu = to_device(batch, torch.device("cuda"), on_device)
    cpu_batch, _, _ = loader_batch(tiny_recipe, "cpu")
    assert on_gpu["image"].is_cuda and torch.equal(on_gpu["image"].cpu(), cpu_batch["image"])  # bit for bit


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_stop_flags_sum_is_read_without_waiting_for_the_steps_queued_after_it():
    """Several processes agree on stopping through a sum read a step late (StopSignals.asked):
    the read waits for the work before the copy, not for the next step's."""
    from mmkit.engine.loop import HostCopy

    copy = HostCopy(torch.full((1,), 3.0, device="cuda") * 2)
    torch.cuda._sleep(2_000_000_000)  # about a second of device work queued after the copy
    started = time.perf_counter()
    assert copy.read() == 6.0 and time.perf_counter() - started < 0.3
    torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_run_on_the_gpu_in_bf16(tiny_recipe):
    summary = Run(load_recipe(tiny_recipe, ["run.device=cuda", "run.precision=bf16"])).fit()
    assert summary["device"].startswith("cuda") and summary["steps"] == 6


def tiny_parts_and_feed(recipe: Path) -> tuple[Any, Any, Any]:
    """The tiny recipe's parts, an iterator over its training batches of 16 (CPU, no workers)
    and the encoders' on-device steps, for driving optimizer steps by hand."""
    from mmkit.components import build_parts
    from mmkit.data.loader import EpochBatches, Preprocessed, train_loader
    from mmkit.plugins import get_registry

    parts = build_parts(load_recipe(recipe), get_registry())
    collate, on_device = parts.batching(torch.device("cpu"))
    dataset = Preprocessed(parts.train_set, parts.transforms)
    return parts, iter(train_loader(dataset, EpochBatches(len(dataset), 16, seed=0), 0, False, collate)), on_device


def test_compiled_encoders_serve_every_step_and_train_as_the_eager_ones(tiny_recipe):
    """train.compile compiles each encoder once: later batches (other ids, other captions) reuse
    the graphs, and the steps' losses and weights are the eager steps' to float rounding. After
    the training block the encoders run eagerly again."""
    from accelerate import Accelerator
    from torch._dynamo.utils import counters

    from mmkit.engine.loop import compiled_encoders

    def three_steps(mode: str | None):
        torch.manual_seed(0)
        parts, feed, on_device = tiny_parts_and_feed(tiny_recipe)
        optimizer = torch.optim.SGD(parts.task.parameters(), lr=0.5, fused=True)  # an update in proportion to the gradient
        graphs, losses = [], []
        with compiled_encoders(parts.task, mode), compile_stats(mode) as stats:
            for step in range(1, 4):
                batches = step_batches(parts.task, feed, 1, torch.device("cpu"), on_device)
                losses.append(optimizer_step(parts.task, optimizer, batches, TrainSpec(), Accelerator(cpu=True))[0]["loss"])
                graphs.append(counters["stats"]["unique_graphs"])
        parts.task.encoders["image"](batches[0]["image"][:5])  # a new batch size: a compiled encoder would compile again
        return losses, graphs + [counters["stats"]["unique_graphs"]], parts.task.state_dict(), stats

    torch._dynamo.reset()
    counters.clear()
    eager, _, eager_weights, none = three_steps(None)
    compiled, graphs, compiled_weights, stats = three_steps("default")
    assert graphs[0] == 2 and graphs[1] == graphs[2] == graphs[3] == graphs[0]  # image and text, at the first step only
    assert none is None and stats == CompileStats("default", graphs=2, graph_breaks=0, cudagraph_skips=0)
    assert torch.allclose(torch.stack(compiled), torch.stack(eager), rtol=1e-5)
    assert compiled_weights.keys() == eager_weights.keys()  # checkpoints keep the eager names
    assert all(torch.allclose(compiled_weights[k], eager_weights[k], atol=1e-5) for k in eager_weights)


def test_compiled_encoders_count_their_graph_breaks_and_graphs_run_without_cuda_graphs(tiny_recipe):
    """What a run's summary and warnings report: here a break at the start of the text encoder
    (its graph is what follows it; the image encoder's is whole), and on the CPU no CUDA graphs
    for either graph."""
    from accelerate import Accelerator

    from mmkit.engine.loop import compiled_encoders

    parts, feed, on_device = tiny_parts_and_feed(tiny_recipe)
    text = parts.task.encoders["text"]

    def broken(*args: Any) -> Any:
        torch._dynamo.graph_break()
        return type(text).forward(text, *args)

    text.forward = broken
    optimizer = torch.optim.SGD(parts.task.parameters(), lr=0.1, fused=True)
    with compiled_encoders(parts.task, "reduce-overhead"), compile_stats("reduce-overhead") as stats:
        for _ in range(2):
            batches = step_batches(parts.task, feed, 1, torch.device("cpu"), on_device)
            optimizer_step(parts.task, optimizer, batches, TrainSpec(), Accelerator(cpu=True))
    assert (stats.graphs, stats.graph_breaks, stats.cudagraph_skips) == (2, 1, 2)
    assert "graph_break" in stats.first_break
    assert stats.warnings("cpu") == [
        f"train.compile: 1 graph breaks in the encoders (first: {stats.first_break}); each splits a graph and costs "
        "speed: TORCH_LOGS=graph_breaks shows where",
        'train.compile = "reduce-overhead": CUDA graphs need a GPU; on the cpu the encoders ran as '
        'train.compile = "default" runs them']
    assert CompileStats("reduce-overhead", graphs=4, cudagraph_skips=1).warnings("cuda") == [
        'train.compile = "reduce-overhead": CUDA graphs were skipped 1 times (4 graphs compiled): '
        "TORCH_LOGS=cudagraphs says why"]
    assert CompileStats("default", graphs=2).warnings("cuda") == []


def test_train_profile_profiles_its_steps_alone_and_writes_their_ops_and_timeline(tiny_recipe):
    summary = Run(load_recipe(tiny_recipe, ["train.profile=[3,4]", "run.name=profiled"])).fit()
    folder = tiny_recipe.parent / "runs" / "profiled"
    profiled = summary["profile"]
    assert profiled["steps"] == [3, 4] and profiled["folder"] == "profile"
    assert profiled["device_busy"] is None and profiled["device_busy_seconds"] is None  # no device on the CPU
    assert 0 < profiled["waiting_for_batches_seconds"] < profiled["seconds"] < summary["train_seconds"]
    trace = json.loads((folder / "profile" / "trace.json").read_text())["traceEvents"]
    names = [event.get("name", "") for event in trace]
    assert sorted(n for n in names if n.startswith("ProfilerStep#")) == ["ProfilerStep#3", "ProfilerStep#4"]
    assert names.count("Optimizer.step#AdamW.step") == 2  # each step whole, its update too, and no other step
    ops = (folder / "profile" / "ops.txt").read_text()
    assert ops.startswith("steps 3-4 (2) in ") and "by time on the host:" in ops and "aten::mm" in ops
    assert "; steps 3-4 profiled in " in (folder / "report.html").read_text()
    unprofiled = Run(load_recipe(tiny_recipe, ["run.name=plain"])).fit()
    assert unprofiled["profile"] is None and not (tiny_recipe.parent / "runs" / "plain" / "profile").exists()


def test_train_profile_is_a_window_of_the_runs_steps(tiny_recipe):
    message = "must be [first, last]: two optimizer steps, 1 <= first <= last"
    for window in ([3], [4, 3], [0, 2], [1, 2, 3]):
        assert TrainSpec(profile=window).problems() == {"profile": message}
    assert TrainSpec(profile=[6, 6]).problems() == {}
    with pytest.raises(MMKitError, match=r"train.profile \[5, 7\] ends after the run's last step \(6\)"):
        Run(load_recipe(tiny_recipe, ["train.profile=[5,7]"])).fit()
    assert not (tiny_recipe.parent / "runs").exists()  # refused before a run folder is made


def test_a_resumed_run_keeps_its_profile_or_profiles_what_is_left_of_the_window(tiny_recipe):
    settings = ["train.profile=[2,3]", "train.checkpoint_every=2", "train.keep_checkpoints=3", "eval.every=0"]
    straight = Run(load_recipe(tiny_recipe, settings)).fit()["profile"]
    assert straight["steps"] == [2, 3]
    runs = tiny_recipe.parent / "runs"
    for name, last in (("ended", 6), ("after", 4), ("inside", 2)):  # killed after the step-`last` checkpoint
        shutil.copytree(runs / "tiny", runs / name)
        for file in ("summary.json", "model.safetensors", "report.html"):
            (runs / name / file).unlink()
        for later in range(last + 2, 7, 2):
            shutil.rmtree(runs / name / "checkpoints" / f"step_{later:08d}")
    shutil.rmtree(runs / "inside" / "profile")
    for name in ("ended", "after"):  # the checkpoint's profile: the final files alone, or steps 5 and 6 run again
        assert Run(load_recipe(tiny_recipe, [*settings, f"run.name={name}"]), resume=True).fit()["profile"] == straight, name
    assert Run(load_recipe(tiny_recipe, [*settings, "run.name=inside"]), resume=True).fit()["profile"]["steps"] == [3, 3]
    trace = json.loads((runs / "inside" / "profile" / "trace.json").read_text())["traceEvents"]
    assert [e["name"] for e in trace if e.get("name", "").startswith("ProfilerStep#")] == ["ProfilerStep#3"]


def test_the_device_is_busy_for_the_union_of_its_kernels_and_copies_spans():
    from mmkit.engine.profiling import union_seconds

    # a copy beside a kernel counts once, one inside another not at all, an empty span nothing
    assert union_seconds([(5.0, 6.0), (0.0, 2.0), (1.0, 3.0), (5.5, 5.8), (10.0, 10.0)]) == 4.0
    assert union_seconds([(0.0, 1.0), (1.0, 2.0)]) == 2.0 and union_seconds([]) == 0.0


def test_a_run_stopped_inside_the_profile_window_turns_the_profiler_off_and_writes_no_profile(tmp_path):
    from mmkit.engine.profiling import StepProfiler

    with pytest.raises(KeyboardInterrupt), StepProfiler([1, 3], tmp_path / "profile", torch.device("cpu")) as steps:
        with steps.step(1):
            torch.ones(2).sum()
        steps.finish(1)  # not the window's last step: it goes on
        assert torch.autograd._profiler_enabled()
        raise KeyboardInterrupt
    assert not torch.autograd._profiler_enabled() and not (tmp_path / "profile").exists()
    assert steps.result is None


def test_the_report_says_what_compiling_made_of_the_encoders(tmp_path):
    from dataclasses import asdict

    from mmkit.report import write_report

    stats = CompileStats("reduce-overhead", graphs=4, graph_breaks=1, cudagraph_skips=2, first_break="print")
    summary = {"name": "r", "task": "clip_retrieval", "steps": 6, "train_seconds": 3.0, "samples_per_second": 32.0,
               "compile": asdict(stats)}
    assert ("task clip_retrieval, 6 steps in 3 s (32.0 samples/s); encoders compiled (reduce-overhead): 4 graphs, "
            "1 graph breaks, 2 CUDA-graph skips</p>") in write_report(tmp_path, summary, {}).read_text()


def test_a_log_interval_gives_its_samples_per_second_and_its_share_spent_waiting_for_batches():
    interval = Interval(10.0)
    for waited in (0.5, 0.25, 0.75):
        interval.add(waited)
    assert interval.rates(14.0, 64) == pytest.approx((48.0, 0.375))  # 3 steps of 64 in 4 s, 1.5 s of them waiting
    interval.pause(1.0)  # an evaluation: no part of training's time
    assert interval.rates(15.0, 64) == pytest.approx((48.0, 0.375))
    assert Interval(3.0).rates(5.0, 64) == (0.0, 0.0)


def test_encoders_run_eagerly_again_after_an_error_in_the_compiled_block(tiny_recipe):
    from mmkit.components import build_parts
    from mmkit.engine.loop import compiled_encoders
    from mmkit.plugins import get_registry

    task = build_parts(load_recipe(tiny_recipe), get_registry()).task
    image, text = task.encoders["image"], task.encoders["text"]
    text.forward = own = text.forward.__func__.__get__(text)  # an instance forward of its own, kept
    with pytest.raises(KeyboardInterrupt), compiled_encoders(task, "reduce-overhead"):
        assert "forward" in vars(image) and vars(text)["forward"] is not own  # compiled (lazily: no call here)
        raise KeyboardInterrupt
    assert "forward" not in vars(image) and vars(text)["forward"] is own


def test_train_compile_takes_true_or_a_torch_compile_mode(tiny_recipe):
    from mmkit.plugins import get_registry
    from mmkit.recipe import check_recipe

    check_recipe(load_recipe(tiny_recipe, ['train.compile="reduce-overhead"']), get_registry())
    with pytest.raises(MMKitError, match="train.compile") as error:
        check_recipe(load_recipe(tiny_recipe, ['train.compile="fast"']), get_registry())
    assert "'reduce-overhead'" in str(error.value)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision, first, later", [("fp32", 1e-5, 1e-3), ("bf16", 1e-2, 3e-2)])
def test_compiled_and_eager_training_give_the_same_losses_on_the_gpu(tiny_recipe, precision, first, later):
    """train.compile changes speed, not results: the same first batch gives the same loss, and
    the steps after it stay together (to rounding: bf16 rounds the two paths' sums differently)."""
    losses, held_out, stats, profiled = {}, {}, {}, {}
    for compiled in ("false", "true", '"reduce-overhead"'):
        name = "compiled-" + compiled.strip('"')
        summary = Run(load_recipe(tiny_recipe, ["run.device=cuda", f"run.precision={precision}",
                                                f"train.compile={compiled}", "train.log_every=1",
                                                "train.profile=[5,6]", f"run.name={name}"])).fit()
        stats[compiled], profiled[compiled] = summary["compile"], summary["profile"]
        folder = tiny_recipe.parent / "runs" / name
        losses[compiled] = [r["train/loss"] for r in records(folder) if "train/loss" in r]
        held_out[compiled] = [r[f"val/{way}/mean_rank"] for r in records(folder) if "val/image_to_text/R@1" in r
                              for way in ("image_to_text", "text_to_image")]
    for compiled in ("true", '"reduce-overhead"'):  # CUDA graphs too, evaluating at step 3 and at the end
        assert len(losses[compiled]) == len(losses["false"]) == 6
        assert losses[compiled][0] == pytest.approx(losses["false"][0], rel=first)
        assert losses[compiled] == pytest.approx(losses["false"], rel=later)
        assert len(held_out[compiled]) == 4  # evaluated at step 3 and at the end, with ranks as the eager run's
        assert held_out[compiled] == pytest.approx(held_out["false"], abs=1.0)
    assert stats["false"] is None
    for compiled in ("true", '"reduce-overhead"'):  # whole graphs: what was measured
        assert stats[compiled]["graphs"] >= 2 and stats[compiled]["graph_breaks"] == 0
    assert stats['"reduce-overhead"']["cudagraph_skips"] == 0, "TORCH_LOGS=cudagraphs says why"  # CUDA graphs used
    for compiled, window in profiled.items():  # profiled on the device, CUDA graphs too
        assert window["steps"] == [5, 6] and 0 < window["device_busy"] <= 1, compiled
        folder = tiny_recipe.parent / "runs" / ("compiled-" + compiled.strip('"')) / "profile"
        assert "by time on the device:" in (folder / "ops.txt").read_text()
        assert any(e.get("cat") == "kernel" for e in json.loads((folder / "trace.json").read_text())["traceEvents"])


def test_two_processes_under_torchrun(tiny_recipe):
    """The same recipe under torchrun (gloo on the CPU): each process trains its shard."""
    torchrun = Path(sys.executable).with_name("torchrun")
    done = subprocess.run([str(torchrun), "--nproc_per_node", "2", "-m", "mmkit", "run", str(tiny_recipe),
                           "run.device=cpu"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    folder = tiny_recipe.parent / "runs" / "tiny"
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 6
    # MFU over both processes' devices: the summary's peak is the two matmul rates together, as
    # each log line's MFU (computed from one process's rate times the processes) has it
    flops, peak = summary["flops_per_sample"], summary["peak_flops_per_s"]
    assert summary["mfu"] == pytest.approx(summary["samples_per_second"] * flops / peak, rel=1e-3)
    for record in [r for r in records(folder) if "mfu" in r]:
        assert record["mfu"] == pytest.approx(record["samples_per_s"] * flops / peak, rel=1e-9)
    assert {"rng_0.safetensors", "rng_1.safetensors"} <= {p.name for p in latest_checkpoint(folder / "checkpoints").iterdir()}
    assert not list(tiny_recipe.parent.glob("runs/tiny-*"))  # both processes wrote one folder
