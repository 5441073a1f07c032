"""The training loop: one readable function serving every task."""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import torch
from tqdm.auto import tqdm

from mmkit.data.loader import to_device
from mmkit.engine.checkpoint import load_checkpoint, save_checkpoint
from mmkit.engine.evaluation import Evaluation
from mmkit.engine.feed import TrainFeed
from mmkit.engine.flops import batch_rows, count_flops, matmul_rate, mfu
from mmkit.engine.profiling import Profiled, StepProfiler
from mmkit.engine.schedule import adamw, warmup_cosine
from mmkit.engine.tracking import Tracker
from mmkit.errors import MMKitError
from mmkit.specs import EvalSpec, TrainSpec
from mmkit.tasks.base import Task

if TYPE_CHECKING:
    from mmkit.engine.run import RunPaths


@dataclass
class FitResult:
    """How far training went and how fast (seconds include the runs it resumed)."""

    steps: int
    epochs: float | None
    seconds: float
    samples_per_second: float
    skipped_steps: int = 0
    flops_per_sample: float | None = None  # one sample's forward + backward, counted at this session's first step
    peak_flops_per_s: float | None = None  # its devices' measured matmul rate together: MFU's denominator
    compiled: CompileStats | None = None  # what torch.compile made in this session (None: no compiled step)
    profiled: Profiled | None = None  # train.profile's window, as the main process profiled it (this run or before)

    @property
    def mfu(self) -> float | None:
        """Model FLOPs utilisation over the whole training (None where nothing was counted)."""
        if self.flops_per_sample is None or not self.peak_flops_per_s:
            return None
        return mfu(self.samples_per_second, self.flops_per_sample, self.peak_flops_per_s)


class Stopped(Exception):
    """SIGTERM or Ctrl-C stopped training after a checkpoint; ``code`` is the exit status."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def fit(task: Task, feed: TrainFeed, val: Evaluation | None, train: TrainSpec, evaluation: EvalSpec,
        accelerator: Any, tracker: Tracker, paths: RunPaths, plan: tuple[float | None, int],
        layout: dict[str, int], resume_from: Path | None, lr_scales: Mapping[torch.nn.Module, float] | None = None,
        ) -> FitResult:
    """Train ``task`` for the ``plan``'s (steps per epoch, total steps), evaluating, logging,
    checkpointing (with the data ``layout``) and profiling into the run's ``paths`` on the way;
    returns after the last optimizer step. ``resume_from`` is a checkpoint that
    ``check_checkpoint`` accepted for this recipe; ``lr_scales`` scale the learning rate of
    some parts."""
    trainer = Trainer(task, feed, train, accelerator, tracker, paths, plan[1], layout, lr_scales)
    trainer.restore(resume_from)
    trainer.run(lambda step: val.metrics(task, accelerator, calibrate=True)
                if val is not None and evaluation.every and step % evaluation.every == 0 else None)
    steps, seconds = trainer.step, trainer.seconds
    return FitResult(steps, steps / plan[0] if plan[0] else None, seconds,
                     trainer.samples_per_step * steps / max(seconds, 1e-9), trainer.skipped,
                     trainer.flops_per_sample, trainer.peak and trainer.peak * accelerator.num_processes,
                     trainer.compiled, trainer.profiler.result)


class Trainer:
    """The optimizer, schedule and counters of one training, stepping until the total: logs,
    checkpoints (every train.checkpoint_every steps and at the last), profiles train.profile's
    steps (on the main process), and stops cleanly when SIGTERM or Ctrl-C asks (a checkpoint,
    then Stopped)."""

    def __init__(self, task: Task, feed: TrainFeed, train: TrainSpec, accelerator: Any, tracker: Tracker,
                 paths: RunPaths, total: int, layout: dict[str, int],
                 lr_scales: Mapping[torch.nn.Module, float] | None):
        self.task, self.feed, self.train, self.accelerator, self.tracker = task, feed, train, accelerator, tracker
        self.checkpoints, self.total, self.layout = paths.checkpoints, total, layout
        self.profiler = StepProfiler(train.profile if accelerator.is_main_process else None, paths.profile,
                                     accelerator.device)
        self.optimizer = adamw(task, train.lr, train.weight_decay, lr_scales, (train.beta1, train.beta2), train.eps)
        self.scheduler = warmup_cosine(self.optimizer, train.warmup, total)
        self.samples_per_step = train.batch_size * train.grad_accum * accelerator.num_processes
        self.step, self.seconds, self.skipped, self.before = 0, 0.0, 0, 0.0
        self.lr = 0.0  # the base learning rate of the last step (a part's lr_scale left out)
        self.watch = LossWatch(train.on_nan)
        self.flops_per_sample: float | None = None
        self.peak: float | None = None  # one device's matmul FLOP/s
        self.compiled: CompileStats | None = None

    def restore(self, checkpoint: Path | None) -> None:
        """Start from ``checkpoint`` (weights, optimizer, schedule, RNG, data place), or afresh."""
        state: dict[str, Any] = {}
        if checkpoint is not None:
            self.step, state = load_checkpoint(checkpoint, self.task, self.optimizer, self.scheduler, self.accelerator)
        self.before, self.skipped = state.get("seconds", 0.0), state.get("skipped_steps", 0)
        self.profiler.result = Profiled.from_summary(state.get("profile"))  # a window profiled before the stop
        self.seconds = self.before
        self.feed.start(self.step * self.train.grad_accum, state.get("data"))

    def run(self, evaluate: Any) -> None:
        """Step to the total; ``evaluate(step)`` gives held-out metrics to log, or None."""
        precision = {"no": "fp32"}.get(self.accelerator.mixed_precision, self.accelerator.mixed_precision)
        self.peak = matmul_rate(str(self.accelerator.device), precision)  # before the loader's workers start
        model, self.optimizer = self.accelerator.prepare(self.task, self.optimizer)
        started = time.perf_counter()
        self.interval = Interval(started)
        model.train()
        mode = compile_mode(self.train.compile)
        with StopSignals() as stop, _progress(self.total, self.step, self.accelerator.is_main_process) as progress, \
                compiled_encoders(self.task, mode), compile_stats(mode) as self.compiled, self.profiler:
            while self.step < self.total:
                with self.profiler.step(self.step + 1):
                    losses, finite = self._step(model, mode)
                self.step += 1
                self.watch.add(self.step, losses["loss"], finite)
                self.seconds = self.before + time.perf_counter() - started
                progress.update(1)
                self._log(losses, progress)
                paused = time.perf_counter()
                self.profiler.finish(self.step)
                saved = self._evaluate_and_save(evaluate)
                self.interval.pause(time.perf_counter() - paused)  # a log line's speed is training's alone
                if stop.asked(self.accelerator) and self.step < self.total:
                    self._stop(stop, saved)
        self._read_losses()
        if self.compiled is not None and self.accelerator.is_main_process:  # every process compiled alike
            for line in self.compiled.warnings(self.accelerator.device.type):
                tqdm.write(line)

    def _step(self, model: torch.nn.Module, mode: str | None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """One optimizer step on the feed's next batches, timing the wait for them (and, at this
        session's first step, counting their FLOPs)."""
        if mode in CUDA_GRAPH_MODES:
            torch.compiler.cudagraph_mark_step_begin()  # a step's graphs replay together, not per encoder
        asked = time.perf_counter()
        batches = step_batches(self.task, self.feed, self.train.grad_accum, self.accelerator.device,
                               self.feed.on_device)
        self.interval.add(time.perf_counter() - asked)
        if self.flops_per_sample is None:
            self.flops_per_sample = count_flops(self.task, batches[0], self.accelerator, model) / batch_rows(batches[0])
        losses, finite = optimizer_step(model, self.optimizer, batches, self.train, self.accelerator)
        group = self.optimizer.param_groups[0]
        self.lr = group["lr"] / group["lr_scale"]  # the rate this step used, read before the schedule moves on
        self.scheduler.step()
        return losses, finite

    def _evaluate_and_save(self, evaluate: Any) -> bool:
        """Held-out metrics where ``evaluate`` gives them, and a checkpoint where one is due
        (whether one was written)."""
        if self.step < self.total and (metrics := self._evaluate(evaluate)) is not None:
            self.tracker.log(self.step, metrics)
        every = self.train.checkpoint_every
        saved = bool(every) and (self.step % every == 0 or self.step == self.total)
        if saved:
            self._save()
        return saved

    def _evaluate(self, evaluate: Any) -> dict[str, float] | None:
        """``evaluate(step)``; where it fails (a bad held-out sample, a metric refused) in a
        single process, a checkpoint of this step first, so the steps since the last one are
        not lost. With several processes the others may wait in the evaluation's gather, not
        at a checkpoint's barrier, so the failing one ends at once and torchrun ends the rest."""
        try:
            return evaluate(self.step)
        except Exception:
            if self.accelerator.num_processes > 1:
                raise
            self._save()
            tqdm.write(f"the evaluation at step {self.step} did not finish; checkpoint step {self.step} written: "
                       "mend what it says below and run again with --resume to continue")
            raise

    def _read_losses(self) -> list[int]:
        """The steps since the last read whose update was skipped (their loss not finite), now
        counted; under train.on_nan = "raise" the first of them stops the run."""
        skipped = self.watch.skipped()
        self.skipped += len(skipped)
        return skipped

    def _log(self, losses: dict[str, torch.Tensor], progress: Any) -> None:
        if self.step % self.train.log_every and self.step != self.total:
            return
        if self.step in self._read_losses():  # a skipped step logs no values
            return
        rate, waited = self.interval.rates(time.perf_counter(), self.samples_per_step)
        utilisation = mfu(rate, self.flops_per_sample, self.peak, self.accelerator.num_processes)
        values = {f"train/{k}": v.item() for k, v in losses.items()}
        self.tracker.log(self.step, {**values, "lr": self.lr, "samples_per_s": rate,
                                     "mfu": utilisation, "data_share": waited})
        progress.set_postfix(loss=f"{values['train/loss']:.4f}", samples_s=f"{rate:.0f}", mfu=f"{utilisation:.1%}",
                             data=f"{waited:.0%}")
        self.interval = Interval(time.perf_counter())

    def _save(self) -> None:
        self._read_losses()  # a checkpoint counts every skipped step, and none follows a stop
        self.tracker.flush()
        save_checkpoint(self.checkpoints, self.step, self.task, self.optimizer, self.scheduler, self.accelerator,
                        self.layout, self.train.keep_checkpoints,
                        {"seconds": self.seconds, "skipped_steps": self.skipped,
                         "flops_per_sample": self.flops_per_sample, "peak_flops_per_s": self.peak,
                         "profile": self.profiler.result and self.profiler.result.summary()}, self.feed.state())

    def _stop(self, stop: StopSignals, saved: bool) -> None:
        if not saved:
            self._save()
        raise Stopped(f"stopped by {stop.name} at step {self.step} of {self.total}: checkpoint step {self.step} "
                      "written; run again with --resume to continue", stop.code)


class Interval:
    """The steps since the last log line: their samples/s, and the share of their time the loop
    waited for batches (open_clip_train's Data (t) over Batch (t)): near 1, the loader is what
    holds training back. Evaluation and checkpoints are paused out of it (on a GPU, training
    work still queued when one starts counts as theirs)."""

    def __init__(self, start: float) -> None:
        self.start, self.steps, self.waited = start, 0, 0.0

    def add(self, waited: float) -> None:
        """One more step, whose batches took ``waited`` seconds to come."""
        self.steps += 1
        self.waited += waited

    def pause(self, seconds: float) -> None:
        """Leave out ``seconds`` spent on something other than training."""
        self.start += seconds

    def rates(self, now: float, samples_per_step: int) -> tuple[float, float]:
        """(samples/s, share of the time spent waiting for batches) from the start to ``now``."""
        seconds = max(now - self.start, 1e-9)
        return samples_per_step * self.steps / seconds, min(self.waited / seconds, 1.0)


CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # the modes whose graphs replay as CUDA graphs


def compile_mode(compile: bool | str) -> str | None:
    """train.compile as a torch.compile mode: true is "default", false None (eager)."""
    if compile is True:
        return "default"
    return compile or None


@contextlib.contextmanager
def compiled_encoders(task: Task, mode: str | None) -> Iterator[None]:
    """Within the block each encoder of ``task`` runs compiled with torch.compile ``mode`` (None:
    eagerly), for the training steps; after it (an error too), eagerly again. Encoders take only
    tensors, so one graph serves every step (CUDA graphs record one per text width); the whole
    task takes the batch with its ids and captions, and a graph compiled on it held for those
    strings alone. Compiled in place: weights keep their names."""
    from mmkit.encoders.base import Encoder

    compiled: list[tuple[str, Encoder, Any]] = []  # name, encoder, its own forward attribute before (or None)
    try:
        for name, module in task.named_modules() if mode is not None else ():
            if isinstance(module, Encoder) and not any(name.startswith(f"{outer}.") for outer, _, _ in compiled):
                compiled.append((name, module, module.__dict__.get("forward")))
                module.forward = torch.compile(module.forward, mode=mode)  # an encoder inside one is compiled with it
        yield
    finally:
        for _, module, before in compiled:
            if before is None:
                del module.forward  # the class's forward again
            else:
                module.forward = before


@dataclass
class CompileStats:
    """What torch.compile made of the encoders in one training session (a resumed run compiles
    again), from dynamo's counters: graphs compiled (a graph break or a recompile adds some),
    graph breaks (``first_break`` names the first new kind: in a fresh process, the first), and
    how often a graph ran without the CUDA graphs the mode asked for."""

    mode: str
    graphs: int = 0
    graph_breaks: int = 0
    cudagraph_skips: int = 0
    first_break: str | None = None

    def warnings(self, device_type: str) -> list[str]:
        """What a user who asked for this mode should know: breaks cost speed, and CUDA graphs
        that were not used are the speed the mode was chosen for."""
        lines = []
        if self.graph_breaks:
            lines.append(f"train.compile: {self.graph_breaks} graph breaks in the encoders "
                         f"(first: {self.first_break}); each splits a graph and costs speed: "
                         "TORCH_LOGS=graph_breaks shows where")
        if self.cudagraph_skips and device_type == "cuda":
            lines.append(f'train.compile = "{self.mode}": CUDA graphs were skipped {self.cudagraph_skips} times '
                         f"({self.graphs} graphs compiled): TORCH_LOGS=cudagraphs says why")
        elif self.cudagraph_skips:
            lines.append(f'train.compile = "{self.mode}": CUDA graphs need a GPU; on the {device_type} the encoders '
                         'ran as train.compile = "default" runs them')
        return lines


@contextlib.contextmanager
def compile_stats(mode: str | None) -> Iterator[CompileStats | None]:
    """Stats that, after the block (an error too), hold what compiling with ``mode`` made within
    it; None for an eager run (``mode`` None)."""
    if mode is None:
        yield None
        return
    stats = CompileStats(mode)
    graphs, breaks, skips = _dynamo_counts()
    try:
        yield stats
    finally:
        graphs_after, breaks_after, skips_after = _dynamo_counts()
        new = {reason: n - breaks.get(reason, 0) for reason, n in breaks_after.items() if n > breaks.get(reason, 0)}
        stats.graphs, stats.cudagraph_skips = graphs_after - graphs, skips_after - skips
        stats.graph_breaks = sum(new.values())
        stats.first_break = next(iter(new)).splitlines()[0] if new else None


def _dynamo_counts() -> tuple[int, dict[str, int], int]:
    """(graphs compiled, graph breaks by reason, CUDA-graph skips) so far in this process."""
    from torch._dynamo.utils import counters  # dynamo's own tally; torch.compiler has no public one

    return counters["stats"]["unique_graphs"], dict(counters["graph_break"]), counters["inductor"]["cudagraph_skips"]


def trained_result(checkpoint: Path, task: Task, feed: TrainFeed, accelerator: Any, train: TrainSpec,
                   steps_per_epoch: float | None) -> FitResult:
    """A run whose last step's checkpoint was written but not its final files: its weights,
    bad samples and totals, so the final evaluation and files can follow."""
    from safetensors.torch import load_model

    load_model(task, checkpoint / "model.safetensors", strict=True)
    task.to(accelerator.device)  # training would have moved it (accelerator.prepare)
    state = json.loads((checkpoint / "trainer.json").read_text())
    data = checkpoint / f"data_{accelerator.process_index}.json"
    feed.start(state["step"] * train.grad_accum, json.loads(data.read_text()) if data.exists() else None)
    step, seconds = state["step"], state.get("seconds", 0.0)
    samples = step * train.batch_size * train.grad_accum * accelerator.num_processes
    peak = state.get("peak_flops_per_s")
    return FitResult(step, step / steps_per_epoch if steps_per_epoch else None, seconds,
                     samples / max(seconds, 1e-9), state.get("skipped_steps", 0), state.get("flops_per_sample"),
                     peak and peak * accelerator.num_processes, profiled=Profiled.from_summary(state.get("profile")))


def step_plan(train: TrainSpec, batches_per_epoch: int | None, processes: int, size: str) -> tuple[float | None, int]:
    """(optimizer steps per epoch, total steps); refuses a step bigger than the data, and a
    train.profile window past the last step. A step's micro-batches run on across an epoch's
    end, so train.epochs is the whole steps in that many epochs' batches, and an epoch may hold
    a fraction of a step. A stream (no batches per epoch) trains for train.max_steps."""
    if batches_per_epoch is None:
        if not train.max_steps:
            raise MMKitError("a streamed dataset has no length, so train.epochs cannot be counted; set train.max_steps")
        return None, checked_profile(train, train.max_steps)
    if batches_per_epoch < train.grad_accum:
        raise MMKitError(f"train.batch_size {train.batch_size} x grad_accum {train.grad_accum} x "
                         f"{processes} processes is more than the {size} training samples; lower it")
    total = train.max_steps or (train.epochs or 1) * batches_per_epoch // train.grad_accum
    return batches_per_epoch / train.grad_accum, checked_profile(train, total)


def checked_profile(train: TrainSpec, total: int) -> int:
    """``total``, once train.profile's window is seen to end by the last step."""
    if train.profile and train.profile[1] > total:
        raise MMKitError(f"train.profile {train.profile} ends after the run's last step ({total}); "
                         f"profile steps up to {total}")
    return total


def data_layout(train: TrainSpec, processes: int, seed: int, samples: int | None = None) -> dict[str, int]:
    """What fixes which samples each step reads: where a step ends in the data, the seed of
    its order and the training set's size (``samples``; None for a stream, whose shares depend
    on the worker count instead). A checkpoint only resumes under the same."""
    layout = {"processes": processes, "batch_size": train.batch_size, "grad_accum": train.grad_accum, "seed": seed}
    return layout | ({"num_workers": train.num_workers} if samples is None else {"samples": samples})


def step_batches(task: Task, feed: Iterator[dict[str, Any]], grad_accum: int, device: torch.device,
                 on_device: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """A step's ``grad_accum`` micro-batches from ``feed``, on ``device`` (finished there by
    the encoders' ``on_device`` steps), each through the task's ``prepare`` (a head's masking)."""
    return [task.prepare(to_device(next(feed), device, on_device)) for _ in range(grad_accum)]


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: list[dict[str, Any]],
                   train: TrainSpec, accelerator: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Accumulate gradients over a step's prepared micro-batches (``step_batches``; processes
    sync only on the last), clip, and step; returns the step's values (each the mean over the
    micro-batches, or for a value the task sums over items (``item_counts``: masked tokens), the
    sum over the step's items) and whether the loss was finite on every process. Both stay on
    the device: where the loss is not finite the (fused) optimizer skips the update there, so
    the host need not wait for the device to decide (``LossWatch`` reads the flags later)."""
    task = accelerator.unwrap_model(model)
    counts = step_counts([task.item_counts(batch) for batch in batches], accelerator)
    totals: dict[str, torch.Tensor] = {}
    for micro, batch in enumerate(batches):
        last = micro == len(batches) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            losses = step_shares(model(batch), counts, len(batches))
            losses["loss"] = total_loss(losses, train.loss_weights or {})
            accelerator.backward(losses["loss"])
        for key, value in losses.items():
            totals[key] = totals.get(key, 0) + value.detach().float()
    finite = all_finite(totals["loss"], accelerator)
    if train.clip_grad:
        accelerator.clip_grad_norm_(model.parameters(), train.clip_grad)
    with skipped_unless(optimizer, finite):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return totals, finite


@contextlib.contextmanager
def skipped_unless(optimizer: torch.optim.Optimizer, finite: torch.Tensor) -> Iterator[None]:
    """Within the block the optimizer's step changes no weight or state unless ``finite``: a
    fused optimizer reads the flag on the device (``found_inf``, as loss scaling sets it; under
    fp16 the scaler sets its own, which a non-finite loss sets too)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
    if not all(group.get("fused") for group in inner.param_groups):
        raise TypeError(f"{type(inner).__name__} is not fused (fused=True), so it cannot skip a non-finite "
                        "update on the device")
    inner.found_inf = (~finite).float()
    try:
        yield
    finally:
        inner.__dict__.pop("found_inf", None)


class LossWatch:
    """Each step's finite-loss flag, kept on the device and read only where the host must know
    (a log line, a checkpoint, the end): reading it at every step made the host wait for the
    device at every step. A step whose loss was not finite had its update skipped already
    (``optimizer_step``); here it is reported, or stops the run (``on_nan = "raise"``)."""

    def __init__(self, on_nan: str):
        self.on_nan = on_nan
        self.pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def add(self, step: int, loss: torch.Tensor, finite: torch.Tensor) -> None:
        self.pending.append((step, loss, finite))

    def skipped(self) -> list[int]:
        """The steps added since the last call whose loss was not finite (one read of the device)."""
        if not self.pending:
            return []
        read = torch.stack([torch.stack([loss.float(), finite.float()]) for _, loss, finite in self.pending]).tolist()
        bad = [(step, loss) for (step, _, _), (loss, finite) in zip(self.pending, read) if not finite]
        last, self.pending = self.pending[-1][0], []
        if bad and self.on_nan == "raise":
            step, loss = bad[0]
            raise MMKitError(f"step {step}: the loss is {loss:.4g}, not a number; its update was skipped and the run "
                             f"stopped at step {last}, before its next checkpoint (checkpoints so far are intact); "
                             'lower train.lr, set train.clip_grad, or set train.on_nan = "skip" to skip such steps')
        for step, loss in bad:
            tqdm.write(f"step {step}: the loss is {loss:.4g}; update skipped (train.on_nan = \"skip\")")
        return [step for step, _ in bad]


def step_counts(per_batch: list[dict[str, torch.Tensor]], accelerator: Any) -> dict[str, torch.Tensor]:
    """Items of each summed value over the whole step, per process: the count over every
    micro-batch of every process, divided by the processes (whose gradients DDP averages)."""
    keys = list(per_batch[0])
    if not keys:
        return {}
    counts = torch.stack([sum(batch[key] for batch in per_batch) for key in keys]).float()
    if accelerator.num_processes > 1:
        counts = accelerator.reduce(counts, reduction="sum")
    return dict(zip(keys, counts.clamp(min=1) / accelerator.num_processes))


def step_shares(values: dict[str, torch.Tensor], counts: dict[str, torch.Tensor], micro_batches: int,
                ) -> dict[str, torch.Tensor]:
    """Each value of one micro-batch as its share of the step's: a sum over items divided by
    the step's item count, any other value by the number of micro-batches."""
    return {key: value / counts[key] if key in counts else value / micro_batches for key, value in values.items()}


def total_loss(losses: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """What the optimizer minimises: the loss terms a task returns (keys ``loss/<name>``, its
    own and its fusion head's), each times its ``train.loss_weights`` entry (1 if not named)."""
    terms = {key.removeprefix("loss/"): value for key, value in losses.items() if key.startswith("loss/")}
    if not terms or "loss" in losses:
        raise MMKitError(f"the task's training_step returned {', '.join(losses) or 'nothing'}: name each loss term "
                         "under 'loss/' (e.g. 'loss/cross_entropy'); mmkit sums them into 'loss'")
    if unknown := sorted(set(weights) - set(terms)):
        raise MMKitError(f"train.loss_weights names {', '.join(unknown)}, which the task does not return; "
                         f"its loss terms: {', '.join(terms)}")
    return sum(weights.get(name, 1.0) * value for name, value in terms.items())


def all_finite(loss: torch.Tensor, accelerator: Any) -> torch.Tensor:
    """Whether the loss is finite on every process (they must agree to step or skip), as a flag
    on the device."""
    finite = torch.isfinite(loss).float().reshape(1)
    if accelerator.num_processes > 1:
        finite = accelerator.reduce(finite, reduction="sum") / accelerator.num_processes
    return finite[0] == 1.0


class StopSignals:
    """Within the block, SIGTERM and Ctrl-C (SIGINT) ask training to stop after the step it
    is in; a second Ctrl-C stops at once. Only the main thread can take signals."""

    CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}

    def __init__(self) -> None:
        self.received: int | None = None
        self.previous: dict[int, Any] = {}
        self.pending: HostCopy | None = None

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._ask) for s in self.CODES}
        return self

    def __exit__(self, *exc: Any) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)

    def _ask(self, number: int, frame: Any) -> None:
        if number == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = number

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else "request"

    @property
    def code(self) -> int:
        return self.CODES.get(self.received, 1)

    def asked(self, accelerator: Any) -> bool:
        """Whether training stops after this step, the same answer on every process. Alone:
        whether a signal came. With several: whether any process had one at the previous
        step, whose flags' sum crossed to the host while this step ran; reading this step's
        sum now would make every step wait for the device. All stop one step later."""
        if accelerator.num_processes == 1:
            return self.received is not None
        agreed = self.pending is not None and self.pending.read() > 0
        flag = torch.full((1,), float(self.received is not None), device=accelerator.device)
        self.pending = HostCopy(accelerator.reduce(flag, reduction="sum"))
        if agreed and self.received is None:
            self.received = signal.SIGTERM
        return agreed


class HostCopy:
    """A device tensor's value on its way to the host: the copy is queued behind the work
    before it, and ``read`` waits for that work alone, not for what was queued since."""

    def __init__(self, value: torch.Tensor):
        self.value = value.to("cpu", non_blocking=True)  # pinned memory, when from a GPU
        self.copied = torch.cuda.Event() if value.is_cuda else None
        if self.copied is not None:
            self.copied.record()

    def read(self) -> float:
        if self.copied is not None:
            self.copied.synchronize()
        return self.value.item()


def _progress(total: int, initial: int, enabled: bool):
    return tqdm(total=total, initial=initial, unit="step", disable=not enabled, dynamic_ncols=True)
