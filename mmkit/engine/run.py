"""A run: recipe in, run folder out (resolved recipe, logs, checkpoints, weights, report)."""

from __future__ import annotations

import json
from dataclasses import dataclass
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

    def fit(self) -> dict[str, Any]:
        from accelerate.utils import set_seed

        from mmkit.components import build_parts
        from mmkit.data.loader import EpochBatches, Preprocessed, train_loader
        from mmkit.engine.checkpoint import write_atomic_model
        from mmkit.engine.loop import evaluate, fit
        from mmkit.engine.tracking import Tracker

        accelerator = self._accelerator()
        resume_from = self._resume_from()
        set_seed(self.spec.seed)
        # Everything that can refuse the recipe runs before the folder: a failed start leaves none.
        parts = build_parts(self.recipe, self.registry)
        train_set = Preprocessed(parts.train_set, parts.transforms)
        sampler = EpochBatches(len(train_set), self.train.batch_size, self.spec.seed,
                               accelerator.process_index, accelerator.num_processes)
        resume_step = self._check_resume(resume_from, parts, sampler, accelerator.num_processes)
        self.paths = paths = RunPaths(self._folder(accelerator))
        if accelerator.is_main_process:
            paths.checkpoints.mkdir(parents=True, exist_ok=True)
            tree = resolved_tree(self.recipe, self.registry, self.versions)
            tree["run"]["name"] = paths.folder.name
            write_recipe(tree, paths.recipe)

        pin = accelerator.device.type == "cuda"
        loader = train_loader(train_set, sampler, self.train.num_workers, pin, parts.collate)
        val_loader = self._val_loader(parts, self.train.num_workers, pin)
        tracker = Tracker(paths.folder, accelerator.is_main_process, resume_step=resume_step)
        if accelerator.is_main_process:
            print(describe_parameters(parts.parameters()))
        result = fit(parts.task, loader, sampler, val_loader, self.train, self.evaluation,
                     accelerator, tracker, paths.checkpoints, resume_from, parts.scaled())
        metrics = evaluate(parts.task, val_loader, accelerator) if val_loader else {}
        summary: dict[str, Any] = {}
        if accelerator.is_main_process:
            tracker.log(result.steps, metrics)
            write_atomic_model(parts.task, paths.weights)
            summary = self._summary(result, metrics, accelerator, parts.parameters())
            _write_json(paths.summary, summary)
            self._report(parts, val_loader, tracker, summary, accelerator)
        tracker.close()
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return summary

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

    def _resume_from(self) -> Path | None:
        """With --resume, the newest checkpoint of runs/<name>; checked before anything is built."""
        from mmkit.engine.checkpoint import latest_checkpoint

        if not self.resume:
            return None
        folder = Path(self.spec.output_dir) / self.spec.name
        if not folder.is_dir():
            raise MMKitError(f"nothing to resume: {folder} does not exist")
        found = latest_checkpoint(folder / "checkpoints")
        if found is None:
            raise MMKitError(f"nothing to resume in {folder}: it has no checkpoint "
                             "(set train.checkpoint_every); run without --resume to start over")
        return found

    def _check_resume(self, resume_from: Path | None, parts: Any, sampler: Any, processes: int) -> int | None:
        """Refuse a step bigger than the data or a checkpoint that does not fit or has no steps
        left; the step to resume from, if any."""
        from mmkit.engine.checkpoint import check_checkpoint
        from mmkit.engine.loop import data_layout, step_plan
        from mmkit.engine.schedule import param_groups

        _, total = step_plan(self.train, sampler, processes)
        if resume_from is None:
            return None
        groups = param_groups(parts.task, self.train.weight_decay, parts.scaled())
        step = check_checkpoint(resume_from, parts.task, groups, data_layout(self.train, processes))
        if step >= total:
            raise MMKitError(f"nothing to resume: {resume_from} is step {step} of the {total} this recipe "
                             "trains for; raise train.max_steps (or train.epochs) to train further")
        return step

    def _val_loader(self, parts: Any, num_workers: int, pin: bool) -> Any:
        from mmkit.data.loader import Preprocessed, eval_loader

        if parts.val_set is None:
            return None
        return eval_loader(Preprocessed(parts.val_set, parts.transforms),
                           self.evaluation.batch_size or self.train.batch_size, num_workers, pin, parts.collate)

    def _folder(self, accelerator: Any) -> Path:
        """runs/<name>; a new run never overwrites one: it takes <name>-2, <name>-3, ..."""
        from accelerate.utils import broadcast_object_list

        base = Path(self.spec.output_dir) / self.spec.name
        chosen = [base]
        if accelerator.is_main_process and not self.resume:
            n = 2
            while chosen[0].exists() and any(chosen[0].iterdir()):
                chosen[0] = base.with_name(f"{base.name}-{n}")
                n += 1
            chosen[0].mkdir(parents=True, exist_ok=True)
        if accelerator.num_processes > 1:
            broadcast_object_list(chosen)
        return chosen[0]

    def _summary(self, result: Any, metrics: dict[str, float], accelerator: Any,
                 parameters: dict[str, dict[str, int]]) -> dict[str, Any]:
        held_out = {k.removeprefix("val/"): v for k, v in metrics.items() if not k.startswith("val/chance/")}
        chance = {k.removeprefix("val/chance/"): v for k, v in metrics.items() if k.startswith("val/chance/")}
        return {
            "name": self.paths.folder.name,
            "recipe": str(self.recipe.source),
            "task": self.recipe.table("task")["name"],
            "steps": result.steps,
            "epochs": round(result.epochs, 3),
            "train_seconds": round(result.seconds, 2),
            "samples_per_second": round(result.samples_per_second, 2),
            "device": str(accelerator.device),
            "processes": accelerator.num_processes,
            "precision": self.spec.precision,
            "metrics": held_out,
            "chance": chance,
            "parameters": parameters,
            "versions": self.versions,
        }

    def _report(self, parts: Any, val_loader: Any, tracker: Any, summary: dict[str, Any],
                accelerator: Any) -> None:
        from mmkit.engine.loop import on_device
        from mmkit.report import training_curves, write_report

        figures = {"training_curves": training_curves(tracker.records())}
        if val_loader is not None:
            parts.task.eval()
            with accelerator.autocast():
                figures |= parts.task.figures(parts.val_set, on_device(val_loader, accelerator.device))
        write_report(self.paths.folder, summary, figures)


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
