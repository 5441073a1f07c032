"""The training loop: one readable function serving every task."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch.utils.data import DataLoader

from mmkit.data.loader import EpochBatches
from mmkit.engine.checkpoint import load_checkpoint, save_checkpoint
from mmkit.engine.schedule import adamw, warmup_cosine
from mmkit.engine.tracking import Tracker
from mmkit.errors import MMKitError
from mmkit.specs import EvalSpec, TrainSpec
from mmkit.tasks.base import Task


@dataclass
class FitResult:
    """How far training went and how fast."""

    steps: int
    epochs: float
    seconds: float
    samples_per_second: float


def fit(task: Task, loader: DataLoader, sampler: EpochBatches, val_loader: DataLoader | None,
        train: TrainSpec, evaluation: EvalSpec, accelerator: Any, tracker: Tracker,
        checkpoints: Path, resume_from: Path | None, lr_scales: Mapping[torch.nn.Module, float] | None = None,
        ) -> FitResult:
    """Train ``task`` for train.max_steps (or train.epochs), evaluating, logging and
    checkpointing on the way; returns after the last optimizer step. ``resume_from`` is a
    checkpoint that ``check_checkpoint`` accepted for this recipe; ``lr_scales`` scale the
    learning rate of some parts."""
    steps_per_epoch, total = step_plan(train, sampler, accelerator.num_processes)
    optimizer = adamw(task, train.lr, train.weight_decay, accelerator.device.type == "cuda", lr_scales)
    scheduler = warmup_cosine(optimizer, train.warmup, total)
    layout = data_layout(train, accelerator.num_processes)
    step = 0
    if resume_from is not None:
        step = load_checkpoint(resume_from, task, optimizer, scheduler, accelerator)
    model = torch.compile(task) if train.compile else task
    model, optimizer = accelerator.prepare(model, optimizer)
    batches = micro_batches(loader, sampler, start=step * train.grad_accum)
    samples_per_step = train.batch_size * train.grad_accum * accelerator.num_processes
    progress = _progress(total, step, accelerator.is_main_process)
    started, interval_start, interval_steps = time.perf_counter(), time.perf_counter(), 0
    first_step = step
    model.train()
    while step < total:
        losses = optimizer_step(model, optimizer, batches, train, accelerator)
        scheduler.step()
        step += 1
        interval_steps += 1
        progress.update(1)
        if step % train.log_every == 0 or step == total:
            rate = samples_per_step * interval_steps / (time.perf_counter() - interval_start)
            values = {f"train/{k}": v.item() for k, v in losses.items()}
            lr = optimizer.param_groups[0]["lr"] / optimizer.param_groups[0]["lr_scale"]  # train.lr, scheduled
            tracker.log(step, {**values, "lr": lr, "samples_per_s": rate})
            progress.set_postfix(loss=f"{values['train/loss']:.4f}", samples_s=f"{rate:.0f}")
            interval_start, interval_steps = time.perf_counter(), 0
        if val_loader is not None and evaluation.every and step % evaluation.every == 0 and step < total:
            tracker.log(step, evaluate(task, val_loader, accelerator))
        if train.checkpoint_every and step % train.checkpoint_every == 0:
            tracker.flush()
            save_checkpoint(checkpoints, step, task, optimizer, scheduler, accelerator, layout, train.keep_checkpoints)
    progress.close()
    seconds = time.perf_counter() - started
    trained = step - first_step
    return FitResult(step, step / steps_per_epoch, seconds, samples_per_step * trained / max(seconds, 1e-9))


def step_plan(train: TrainSpec, sampler: EpochBatches, processes: int) -> tuple[int, int]:
    """(optimizer steps per epoch, total steps); refuses a step bigger than the data."""
    if len(sampler) < train.grad_accum:
        raise MMKitError(f"train.batch_size {train.batch_size} x grad_accum {train.grad_accum} x "
                         f"{processes} processes is more than the {sampler.size} training samples; lower it")
    steps_per_epoch = len(sampler) // train.grad_accum
    return steps_per_epoch, train.max_steps or (train.epochs or 1) * steps_per_epoch


def data_layout(train: TrainSpec, processes: int) -> dict[str, int]:
    """What fixes where in the data a step ends; a checkpoint only resumes under the same."""
    return {"processes": processes, "batch_size": train.batch_size, "grad_accum": train.grad_accum}


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: Iterator[dict],
                   train: TrainSpec, accelerator: Any) -> dict[str, torch.Tensor]:
    """Accumulate gradients over grad_accum micro-batches (syncing processes only on the
    last), clip, and step; returns the loss terms averaged over the micro-batches."""
    totals: dict[str, torch.Tensor] = {}
    for micro in range(train.grad_accum):
        last = micro == train.grad_accum - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            losses = model(to_device(next(batches), accelerator.device))
            accelerator.backward(losses["loss"] / train.grad_accum)
        for key, value in losses.items():
            totals[key] = totals.get(key, 0) + value.detach().float() / train.grad_accum
    if train.clip_grad:
        accelerator.clip_grad_norm_(model.parameters(), train.clip_grad)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return totals


def evaluate(task: Task, loader: DataLoader, accelerator: Any) -> dict[str, float]:
    """Held-out metrics on the main process, prefixed ``val/``; the others wait."""
    metrics = {}
    if accelerator.is_main_process:
        task.eval()
        with accelerator.autocast():
            metrics = task.evaluate(on_device(loader, accelerator.device))
        task.train()
    accelerator.wait_for_everyone()
    return {f"val/{k}": v for k, v in metrics.items()}


def micro_batches(loader: DataLoader, sampler: EpochBatches, start: int) -> Iterator[dict]:
    """Batches across epochs without end, beginning after ``start`` micro-batches."""
    epoch, skip = divmod(start, len(sampler))
    while True:
        sampler.set_epoch(epoch, skip)
        yield from loader
        epoch, skip = epoch + 1, 0


def to_device(value: Any, device: torch.device) -> Any:
    """A batch on ``device``: its tensors, also those inside nested dicts (input_ids + attention_mask)."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {key: to_device(inner, device) for key, inner in value.items()}
    return value


def on_device(batches: Iterable[dict[str, Any]], device: torch.device) -> Iterator[dict[str, Any]]:
    return (to_device(batch, device) for batch in batches)


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", disable=not enabled, dynamic_ncols=True)
