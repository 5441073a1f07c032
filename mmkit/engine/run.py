"""A run: recipe in, run folder out (resolved recipe, logs, checkpoints, weights, report)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from mmkit.errors import MMKitError
from mmkit.files import write_text_atomic
from mmkit.plugins import load_plugins
from mmkit.recipe import Recipe, check_recipe, resolved_tree, write_recipe

PACKAGES = ("mmkit", "torch", "torchvision", "torchaudio", "timm", "transformers", "open_clip_torch", "accelerate")


@dataclass(frozen=True)
class RunPaths:
    """Where a run keeps each of its files."""

    folder: Path

    @property
    def recipe(self) -> Path:
        return self.folder / "recipe.toml"

    @property
    def checkpoints(self) -> Path:
        return self.folder / "checkpoints"

    @property
    def profile(self) -> Path:
        return self.folder / "profile"

    @property
    def weights(self) -> Path:
        return self.folder / "model.safetensors"

    @property
    def summary(self) -> Path:
        return self.folder / "summary.json"


class Run:
    """One run of a recipe: check it, build its parts, train, evaluate, report.

    ``Run(load_recipe("recipes/clip_retrieval.toml")).fit()`` returns the summary dict
    that is also written to ``summary.json``.
    """

    def __init__(self, recipe: Recipe, resume: bool = False):
        plugins = load_plugins()
        check_recipe(recipe, plugins.registry)
        self.recipe = recipe
        self.resume = resume
        self.registry = plugins.registry
        self.versions = _versions({name: info.version for name, info in plugins.infos.items()})
        self.spec = recipe.spec("run")
        self.train = recipe.spec("train")
        self.evaluation = recipe.spec("eval")
        self.paths: RunPaths | None = None
        self.finished: dict[str, Any] = {}  # the summary of a run --resume found finished

    def fit(self) -> dict[str, Any]:
        from accelerate.utils import set_seed

        from mmkit.components import build_parts
        from mmkit.data.examples import write_example
        from mmkit.engine.loop import FitResult, fit, trained_result
        from mmkit.engine.tracking import Tracker

        accelerator = self._accelerator()
        resume_from = self._resume_from(accelerator)
        if self.finished:
            self._say(accelerator, f"{self.paths.folder} is finished (summary.json written); nothing to resume")
            return self.finished
        set_seed(self.spec.seed)
        if accelerator.is_main_process:
            write_example(self.recipe, self.registry)
        accelerator.wait_for_everyone()
        # Everything that can refuse the recipe runs before the folder: a failed start leaves none.
        parts = build_parts(self.recipe, self.registry, trained=resume_from is not None)  # a checkpoint's weights
        steps = trains_by_gradient(parts.task)
        if self.train.profile and not steps:
            raise MMKitError(f"train.profile {self.train.profile}: nothing in the model trains by gradient (the "
                             f"task {self.recipe.table('task')['name']!r} takes no optimizer steps), so no step "
                             "can be profiled; remove train.profile")
        feed, plan, layout = self._train_feed(parts, accelerator)
        resume_step = self._check_resume(resume_from, parts, plan[1], layout)
        if self.finished:
            self._say(accelerator, f"{self.paths.folder} is finished (summary.json written); nothing to resume")
            return self.finished
        val = self._evaluation(parts, accelerator)
        self.paths = paths = RunPaths(self._folder(accelerator))
        if accelerator.is_main_process:
            paths.checkpoints.mkdir(parents=True, exist_ok=True)
            tree = resolved_tree(self.recipe, self.registry, self.versions)
            tree["run"]["name"] = paths.folder.name
            write_recipe(tree, paths.recipe)
        tracker = Tracker(paths.folder, accelerator.is_main_process,
                          resume_step=0 if self.resume and resume_step is None else resume_step)
        if accelerator.is_main_process:
            print(describe_parameters(parts.parameters()))
        try:
            fitted = self._fit_task(parts, accelerator, feed.problems) if resume_step is None else {}
            if fitted:
                tracker.log(0, {f"fit/{key}": value for key, value in fitted.items()})
            if resume_step is not None and resume_step >= plan[1]:
                result = trained_result(resume_from, parts.task, feed, accelerator, self.train, plan[0])
            elif not steps:
                self._say(accelerator, "nothing in the model trains by gradient: no optimizer steps")
                seconds = fitted.get("seconds", 0.0)
                result = FitResult(0, 0.0, seconds, fitted.get("samples", 0) / max(seconds, 1e-9))
            else:
                result = fit(parts.task, feed, val, self.train, self.evaluation, accelerator, tracker,
                             paths, plan, layout, resume_from, parts.scaled())
        finally:
            feed.close()
        return self._finish(parts, feed, val, result, tracker, accelerator, fitted)

    def evaluate(self, run: Path) -> dict[str, Any]:
        """Evaluate the weights of the finished run in folder ``run`` on this recipe's held-out
        set (the run's own recipe, or with data or evaluation settings overridden); writes
        summary.json, the task's figures and report.html to a new ``run``/eval folder."""
        from accelerate.utils import set_seed

        from mmkit.components import build_parts
        from mmkit.data.examples import write_example
        from mmkit.engine.checkpoint import load_trained_parts, load_trained_weights, weights_mismatch
        from mmkit.engine.evaluation import every_process_problems
        from mmkit.engine.feed import Problems
        from mmkit.report import write_report

        accelerator = self._accelerator()
        set_seed(self.spec.seed)
        if accelerator.is_main_process:
            write_example(self.recipe, self.registry)
        accelerator.wait_for_everyone()
        parts = build_parts(self.recipe, self.registry, trained=True)
        if parts.val_set is None:
            raise MMKitError(f"{self.recipe.source} has no [data.val] to evaluate on; add one (data.val.split=val)")
        weights, fitted, train_problems = run / "model.safetensors", {}, Problems()
        if parts.task.fits and weights.exists() and weights_mismatch(weights, parts.task):
            load_trained_parts(parts.modules, weights)  # another task's run: its parts, then this task fits
            parts.task.to(accelerator.device)
            fitted = self._fit_task(parts, accelerator, train_problems)
        else:
            load_trained_weights(parts.task, weights)
            parts.task.to(accelerator.device)
        val = self._evaluation(parts, accelerator)
        outputs = val.outputs(parts.task, accelerator)
        metrics = val.metrics(parts.task, accelerator, outputs)
        problems = val.all_problems(accelerator)
        skipped = {"val": problems.summary()}
        if fitted:
            skipped["train"] = every_process_problems(train_problems, accelerator).summary()
        self.paths = RunPaths(self._free_folder(run / "eval", accelerator))
        summary: dict[str, Any] = {}
        if accelerator.is_main_process:
            write_recipe(resolved_tree(self.recipe, self.registry, self.versions), self.paths.recipe)
            summary = {"name": self.paths.folder.name, "evaluated": str(run), "recipe": str(self.recipe.source),
                       "task": self.recipe.table("task")["name"], "device": str(accelerator.device),
                       **split_chance(metrics), **({"fit": fitted} if fitted else {}), "skipped_samples": skipped,
                       "versions": self.versions}
            _write_json(self.paths.summary, summary)
            raw, notes = readable(parts.val_set, problems)
            write_report(self.paths.folder, summary, parts.task.figures(raw, outputs), notes)
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return summary

    def _fit_task(self, parts: Any, accelerator: Any, problems: Any) -> dict[str, float]:
        """For a task that learns from the training set's outputs (a linear probe): one ordered
        pass over the training set (bad samples into ``problems``), then its ``fit``; what it
        chose, with the samples and seconds taken."""
        import time

        if not parts.task.fits:
            return {}
        started = time.perf_counter()
        outputs = self._ordered(parts.train_set, parts, accelerator, problems).outputs(parts.task, accelerator)
        self._say(accelerator, f"fitting {self.recipe.table('task')['name']} on the features of "
                               f"{len(next(iter(outputs.values())))} training samples")
        fitted = parts.task.fit(outputs)
        return {**fitted, "seconds": round(time.perf_counter() - started, 2)}

    def _finish(self, parts: Any, feed: Any, val: Any, result: Any, tracker: Any, accelerator: Any,
                fitted: dict[str, float]) -> dict[str, Any]:
        """The final evaluation, weights, summary and report (the report from the same outputs)."""
        from mmkit.engine.checkpoint import write_atomic_model
        from mmkit.engine.evaluation import every_process_problems

        try:
            outputs = val.outputs(parts.task, accelerator) if val else None
            metrics = val.metrics(parts.task, accelerator, outputs, calibrate=True) if val else {}
        except BaseException:  # a bad held-out sample, or a stop, does not cost the training
            if accelerator.is_main_process:
                write_atomic_model(parts.task, self.paths.weights)
                self._say(accelerator, f"the final evaluation did not finish; the trained weights are in "
                                       f"{self.paths.weights}: `mmkit eval {self.paths.folder}` evaluates them")
            raise
        skipped = {"train": every_process_problems(feed.problems, accelerator)}
        if val:
            skipped["val"] = val.all_problems(accelerator)
        summary: dict[str, Any] = {}
        if accelerator.is_main_process:
            tracker.log(result.steps, metrics)
            write_atomic_model(parts.task, self.paths.weights)
            summary = self._summary(result, metrics, accelerator, parts.parameters(), skipped, fitted)
            _write_json(self.paths.summary, summary)
            self._report(parts, outputs, skipped.get("val"), tracker, summary)
        tracker.close()
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return summary

    def _train_feed(self, parts: Any, accelerator: Any) -> tuple[Any, tuple[int | None, int], dict[str, int]]:
        """The training batches of this process, the step plan, and the data layout."""
        from torch.utils.data import IterableDataset

        from mmkit.data.loader import EpochBatches, Preprocessed, Streamed, stream_loader, train_loader
        from mmkit.engine.feed import TrainFeed
        from mmkit.engine.loop import data_layout, step_plan

        pin = accelerator.device.type == "cuda"
        collate, on_device = parts.batching(accelerator.device)
        rank, world = accelerator.process_index, accelerator.num_processes
        streamed = isinstance(parts.train_set, IterableDataset)
        if streamed:
            source = Streamed(parts.train_set, parts.transforms, self.spec.seed, rank, world, self.train.num_workers)
            loader, batches, size = stream_loader(source, self.train.batch_size, pin, collate), None, ""
        else:
            train_set = Preprocessed(parts.train_set, parts.transforms)
            source = EpochBatches(len(train_set), self.train.batch_size, self.spec.seed, rank, world)
            loader = train_loader(train_set, source, self.train.num_workers, pin, collate)
            batches, size = len(source), str(len(train_set))
        plan = step_plan(self.train, batches, world, size)
        feed = TrainFeed(loader, source, self.recipe.data().on_error, self._log(accelerator), on_device)
        return feed, plan, data_layout(self.train, world, self.spec.seed, None if streamed else len(train_set))

    def _accelerator(self) -> Any:
        import torch
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState

        if self.spec.device == "cuda" and not torch.cuda.is_available():
            raise MMKitError('run.device = "cuda" but no CUDA device is visible; use "auto" or "cpu"')
        precision = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[self.spec.precision]
        AcceleratorState._reset_state()  # a notebook's next run may use another precision
        accelerator = Accelerator(cpu=self.spec.device == "cpu", mixed_precision=precision)
        if precision == "fp16" and accelerator.device.type == "cpu":
            raise MMKitError('run.precision = "fp16" needs a GPU, and this run found none; use "bf16" or "fp32"')
        return accelerator

    def _resume_from(self, accelerator: Any) -> Path | None:
        """With --resume, the newest checkpoint of runs/<name>. A folder without one starts
        over there; a finished run without one is left as it is (``self.finished``)."""
        from mmkit.engine.checkpoint import latest_checkpoint

        if not self.resume:
            return None
        folder = Path(self.spec.output_dir) / self.spec.name
        found = latest_checkpoint(folder / "checkpoints")
        if found is None and not self._done(folder):
            self._say(accelerator, f"no checkpoint in {folder} yet: starting the run over there")
        return found

    def _check_resume(self, resume_from: Path | None, parts: Any, total: int, layout: dict[str, int]) -> int | None:
        """The step to resume from, once sure the checkpoint fits this recipe; a checkpoint at
        the last step of a finished run leaves it as it is (``self.finished``)."""
        from mmkit.engine.checkpoint import check_checkpoint, optimizer_settings
        from mmkit.engine.schedule import param_groups

        if resume_from is None:
            return None
        groups = param_groups(parts.task, self.train.weight_decay, parts.scaled())
        step = check_checkpoint(resume_from, parts.task, groups, layout, optimizer_settings(self.train))
        if step >= total and self._done(resume_from.parent.parent):
            return step
        if step > total:
            raise MMKitError(f"nothing to resume: {resume_from} is step {step}, past the {total} this recipe "
                             "trains for; raise train.max_steps (or train.epochs) to train further")
        return step

    def _done(self, folder: Path) -> bool:
        """Whether ``folder`` holds a finished run (its summary.json); if so keep that summary."""
        summary = folder / "summary.json"
        if summary.exists():
            self.paths = RunPaths(folder)
            self.finished = json.loads(summary.read_text())
        return bool(self.finished)

    def _evaluation(self, parts: Any, accelerator: Any) -> Any:
        """This process's share of the held-out set, in order (None without one)."""
        return None if parts.val_set is None else self._ordered(parts.val_set, parts, accelerator)

    def _ordered(self, dataset: Any, parts: Any, accelerator: Any, problems: Any = None) -> Any:
        """This process's share of a dataset, each sample once, in order: contiguous slices of
        a map-style set, shards of a stream; bad samples are counted into ``problems``."""
        from torch.utils.data import IterableDataset, Subset

        from mmkit.data.loader import Preprocessed, StreamedOnce, eval_loader
        from mmkit.engine.evaluation import Evaluation

        rank, world = accelerator.process_index, accelerator.num_processes
        which = "held-out" if dataset is parts.val_set else "training"
        if isinstance(dataset, IterableDataset):
            if dataset.max_parts < world:
                raise MMKitError(f"the {which} stream has {dataset.max_parts} shards, fewer than the {world} processes")
            share, workers = StreamedOnce(dataset, parts.transforms, self.spec.seed, rank, world), 0
        else:
            if len(dataset) < world:
                raise MMKitError(f"the {which} set has {len(dataset)} samples, fewer than the {world} processes")
            share = Subset(Preprocessed(dataset, parts.transforms, fill=False),
                           range(rank * len(dataset) // world, (rank + 1) * len(dataset) // world))
            workers = self.train.num_workers
        collate, on_device = parts.batching(accelerator.device)
        loader = eval_loader(share, self.evaluation.batch_size or self.train.batch_size, workers,
                             accelerator.device.type == "cuda", collate)
        return Evaluation(loader, self.recipe.data().on_error, self._log(accelerator), problems, on_device)

    def _log(self, accelerator: Any) -> Any:
        """Print a line above the progress bar, naming the process when there are several."""
        from tqdm.auto import tqdm

        prefix = f"[process {accelerator.process_index}] " if accelerator.num_processes > 1 else ""
        return lambda line: tqdm.write(prefix + line)

    def _say(self, accelerator: Any, line: str) -> None:
        if accelerator.is_main_process:
            print(line)

    def _folder(self, accelerator: Any) -> Path:
        """runs/<name>; a new run never overwrites one: it takes <name>-2, <name>-3, ..."""
        return self._free_folder(Path(self.spec.output_dir) / self.spec.name, accelerator)

    def _free_folder(self, base: Path, accelerator: Any) -> Path:
        """``base``, or (unless resuming) ``base``-2, -3, ... where ``base`` holds files; made."""
        from accelerate.utils import broadcast_object_list

        chosen = [base]
        if accelerator.is_main_process:
            n = 2
            while not self.resume and chosen[0].exists() and any(chosen[0].iterdir()):
                chosen[0] = base.with_name(f"{base.name}-{n}")
                n += 1
            chosen[0].mkdir(parents=True, exist_ok=True)
        if accelerator.num_processes > 1:
            broadcast_object_list(chosen)
        return chosen[0]

    def _summary(self, result: Any, metrics: dict[str, float], accelerator: Any,
                 parameters: dict[str, dict[str, int]], skipped: dict[str, Any],
                 fitted: dict[str, float]) -> dict[str, Any]:
        return {
            "name": self.paths.folder.name,
            "recipe": str(self.recipe.source),
            "task": self.recipe.table("task")["name"],
            "steps": result.steps,
            "epochs": None if result.epochs is None else round(result.epochs, 3),
            "train_seconds": round(result.seconds, 2),
            "samples_per_second": round(result.samples_per_second, 2),
            "mfu": None if result.mfu is None else float(f"{result.mfu:.4g}"),
            "flops_per_sample": result.flops_per_sample,
            "peak_flops_per_s": result.peak_flops_per_s,
            "compile": None if result.compiled is None else asdict(result.compiled),
            "profile": None if result.profiled is None else result.profiled.summary(),
            "device": str(accelerator.device),
            "processes": accelerator.num_processes,
            "precision": self.spec.precision,
            **split_chance(metrics),
            **({"fit": fitted} if fitted else {}),
            "parameters": parameters,
            "skipped_samples": {split: problems.summary() for split, problems in skipped.items()},
            "skipped_steps": result.skipped_steps,
            "versions": self.versions,
        }

    def _report(self, parts: Any, outputs: dict[str, Any] | None, val_problems: Any, tracker: Any,
                summary: dict[str, Any]) -> None:
        from mmkit.report import throughput, training_curves, write_report

        records = tracker.records()
        trained = any("train/loss" in record for record in records)  # a linear probe takes no steps
        figures = {"training_curves": training_curves(records, parts.task.headline()),
                   "throughput": throughput(records)} if trained else {}
        notes: list[str] = []
        if outputs is not None:
            raw, notes = readable(parts.val_set, val_problems)
            figures |= parts.task.figures(raw, outputs)
        write_report(self.paths.folder, summary, figures, notes)


def readable(val_set: Any, problems: Any) -> tuple[Readable | None, list[str]]:
    """The held-out samples the report's figures may draw (none from a stream, which cannot be
    indexed), and the report's note when they are missing."""
    from torch.utils.data import IterableDataset

    if isinstance(val_set, IterableDataset):
        return None, ["The held-out set is streamed, so the figures that draw its samples (retrieval "
                      "examples, attention maps) are left out; a manifest or folder held-out set has them."]
    return Readable(val_set, problems), []


class Readable:
    """A held-out set without the samples that could not be read: item i is the i-th item
    the task predicted, so figures draw the sample that was scored."""

    def __init__(self, dataset: Any, problems: Any):
        bad = {record.get("index") for record in problems.seen.values()}
        self.dataset, self.indices = dataset, [i for i in range(len(dataset)) if i not in bad]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> Any:
        return self.dataset[self.indices[item]]


def split_chance(metrics: dict[str, float]) -> dict[str, dict[str, float]]:
    """``val/`` metrics as summary.json keeps them: the values, and their chance levels apart."""
    return {"metrics": {k.removeprefix("val/"): v for k, v in metrics.items() if not k.startswith("val/chance/")},
            "chance": {k.removeprefix("val/chance/"): v for k, v in metrics.items() if k.startswith("val/chance/")}}


def trains_by_gradient(task: Any) -> bool:
    """Whether any of the task's parameters learns by gradient (a linear probe's none do)."""
    return any(p.requires_grad for p in task.parameters())


def describe_parameters(counts: dict[str, dict[str, int]]) -> str:
    """One line for the run log: each part's trainable and total parameters, then the task's."""
    return "parameters: " + ", ".join(f"{part} {c['trainable']:,} trainable of {c['total']:,}"
                                      for part, c in counts.items())


def _versions(plugins: dict[str, str]) -> dict[str, Any]:
    versions: dict[str, Any] = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    versions["plugins"] = plugins
    return versions


def _write_json(path: Path, value: Any) -> None:
    write_text_atomic(path, json.dumps(value, indent=2) + "\n")
