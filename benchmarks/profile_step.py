"""Where a run's training time goes: the recipe trained under torch.profiler, its costliest ops.

The whole run is profiled (building the parts, the steps, the final evaluation), so give it
enough steps that the steps dominate. Printed: the ops with the most time of their own on the
device and on the host, the host's wait for batches (the DataLoader's ``__next__``) and for the
device (synchronizations), and the share of the training time the device was busy.

    python benchmarks/profile_step.py recipes/clip_retrieval.toml train.max_steps=40
    python benchmarks/profile_step.py my_recipe.toml --rows 30 --out profile.txt
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from mmkit.engine.run import Run
from mmkit.recipe import load_recipe

WAITS = {"waiting for batches": ("DataLoader",),  # enumerate(DataLoader)#...__next__
         "waiting for the device": ("cudaStreamSynchronize", "cudaDeviceSynchronize")}


def profiled(recipe_path: str, overrides: list[str]) -> tuple[profile, dict, float]:
    """Train the recipe (checkpoints off, a run folder of its own) under the profiler: the
    profile, the run's summary and the profiled seconds."""
    extra = ["train.checkpoint_every=0", f"run.name=profile-{time.time_ns()}"]
    recipe = load_recipe(recipe_path, [*overrides, *extra])
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as profiler:
        started = time.perf_counter()
        summary = Run(recipe).fit()
        seconds = time.perf_counter() - started
    return profiler, summary, seconds


def waits(profiler: profile) -> dict[str, float]:
    """Seconds the host spent in each kind of wait (the ops' total time, nested calls included)."""
    found = dict.fromkeys(WAITS, 0.0)
    for event in profiler.key_averages():
        for kind, names in WAITS.items():
            if any(name in event.key for name in names):
                found[kind] += event.cpu_time_total / 1e6
    return found


def report(profiler: profile, summary: dict, seconds: float, rows: int) -> str:
    """The tables and totals, as text."""
    averages = profiler.key_averages()
    device_busy = sum(event.self_device_time_total for event in averages  # the kernels and copies alone: an op's
                      if event.device_type == DeviceType.CUDA and not event.is_user_annotation) / 1e6  # row repeats its kernels
    lines = [f"{summary['steps']} steps in {summary['train_seconds']:.1f} s ({summary['samples_per_second']:.1f} "
             f"samples/s, MFU {summary.get('mfu') or 0:.1%}) on {summary['device']}, precision {summary['precision']}; "
             f"the whole run {seconds:.1f} s"]
    if torch.cuda.is_available():
        lines.append(f"device busy (kernels): {device_busy:.2f} s = {device_busy / seconds:.0%} of the whole run, "
                     f"{device_busy / summary['train_seconds']:.0%} of the training time")
    lines += [f"host {kind}: {waited:.2f} s" for kind, waited in waits(profiler).items()]
    if torch.cuda.is_available():
        lines += ["", "by time on the device:", averages.table(sort_by="self_device_time_total", row_limit=rows)]
    lines += ["", "by time on the host:", averages.table(sort_by="self_cpu_time_total", row_limit=rows)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", help="recipe overrides, as `mmkit run` takes them")
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--out", help="also write the text here")
    args = parser.parse_args()
    profiler, summary, seconds = profiled(args.recipe, args.overrides)
    text = report(profiler, summary, seconds, args.rows)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
