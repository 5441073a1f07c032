"""Streaming memory: peak resident memory over a webdataset of 1,000 against 20,000 samples.

Writes each size as webdataset shards (write_shards, small synthetic_shapes images and their
captions) with a tiny image-text recipe over them, then measures, each in a fresh
subprocess so that peaks never mix:

- ``stream``: the training stream without the model, as a recipe run builds it (the recipe's
  encoders' preprocessing, Streamed + stream_loader, ``--workers`` workers), read until
  every sample of the set has come at least once (or ``--samples-read`` samples of each
  set), so memory that grew with the samples read would show as well as memory that grows
  with the set's size;
- ``train``: a real training run of the recipe (``mmkit.engine.run.Run``) for
  ``--train-steps`` steps; ``--train-steps full`` reads every sample of the largest set once
  (several minutes on 2 CPU cores, so not the default).

Peak memory is reported four ways: the subprocess's own peak RSS (getrusage RUSAGE_SELF),
the largest worker's (RUSAGE_CHILDREN), and two peaks of the whole process tree, sampled
every ``--interval`` seconds: its summed RSS (psutil), which counts the pages forked workers
share with their parent once per process, and its allocated memory, the summed Pss_Anon +
Pss_Shmem of /proc/<pid>/smaps_rollup (Linux): heap and shared-memory batches, each page
counted once. Whole-process PSS and USS are not used: they split or withhold torch's
library pages with whatever other process on the machine maps the same files, so on a
shared machine they move by a hundred MiB with other people's work.

    python benchmarks/streaming.py
    python benchmarks/streaming.py --sizes 1000 20000 100000 --train-steps 0
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import data_folder, load_average, machine, write_results

RESULT = "RESULT "  # how a child's line of numbers starts

RECIPE = """
[run]
name = "stream"
seed = 0
output_dir = "{runs}"
device = "cpu"

[data]
name = "webdataset"
urls = "{urls}"
fields = {{image = "jpg", text = "txt"}}

[model.image]
name = "timm"
model_name = "test_vit"
image_size = {image_size}

[model.text]
name = "transformer"
width = 32
layers = 1
heads = 2
context_length = 16

[task]
name = "clip_retrieval"
embed_dim = 32

[train]
max_steps = {steps}
batch_size = {batch_size}
lr = 1e-3
warmup = 2
log_every = 10
num_workers = {workers}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 20000], help="samples per dataset")
    parser.add_argument("--per-shard", type=int, default=250, help="samples per shard")
    parser.add_argument("--image-size", type=int, default=32, help="side of the images in pixels")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="train.num_workers")
    parser.add_argument("--samples-read", type=int, default=0,
                        help="samples the stream measurement reads from each set (0: until each sample came once)")
    parser.add_argument("--train-steps", default="10",
                        help="steps of the training runs; 'full' reads the largest set once, 0 skips them")
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between psutil samples")
    parser.add_argument("--folder", help="write the shards here and keep them (default: a temp folder)")
    parser.add_argument("--json", default=str(Path(__file__).parent / "results" / "streaming.json"),
                        help="where the numbers go")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "RECIPE", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, recipe, size = args.child
        return child(mode, recipe, args.samples_read, int(size))

    steps = math.ceil(max(args.sizes) / args.batch_size) if args.train_steps == "full" else int(args.train_steps)
    modes = ["stream"] + (["train"] if steps > 0 else [])
    results: dict[str, Any] = {"setup": setup(args, steps), "stream": {}, "train": {}}
    with data_folder(args.folder, "mmkit-streaming-") as folder:
        started = time.perf_counter()
        recipes = {size: write_dataset(folder / f"size_{size}", size, args, max(steps, 1)) for size in args.sizes}
        print(f"shards of {', '.join(map(str, args.sizes))} samples in {folder}, "
              f"{time.perf_counter() - started:.1f}s to write or find")
        for mode in modes:
            for size in args.sizes:
                peak = measure(mode, recipes[size], size, args.samples_read, args.interval)
                results[mode][str(size)] = peak
                print(f"  {mode:6s} {size:7d} samples: " + (
                    f"{peak['self_mib']:7.1f} MiB main, {peak['tree_allocated_mib']:7.1f} MiB tree allocated, "
                    f"{peak['seconds']:.1f}s" if "error" not in peak else "FAILED"))
    results["ratios"] = ratios(results, args.sizes, modes)
    results["setup"]["load_after"] = load_average()
    print_table(results, args.sizes, modes)
    write_results(results, args.json)


def write_dataset(folder: Path, size: int, args: argparse.Namespace, steps: int) -> Path:
    """``size`` synthetic_shapes samples (image and caption) as shards, and a recipe over them;
    shards already written with the same settings are kept."""
    from mmkit.data.shapes import SyntheticShapes
    from mmkit.data.shards import write_shards

    settings = {"size": size, "per_shard": args.per_shard, "image_size": args.image_size}
    written = folder / "written.json"
    if not (written.exists() and json.loads(written.read_text()) == settings):
        for old in folder.glob("train-*.tar"):
            old.unlink()
        shapes = SyntheticShapes(num_samples=size, image_size=args.image_size)
        samples = ({"id": sample["id"], "image": sample["image"], "text": sample["text"]}
                   for sample in (shapes[index] for index in range(size)))
        write_shards(samples, folder / "train-%06d.tar", args.per_shard)
        written.write_text(json.dumps(settings))
    shards = math.ceil(size / args.per_shard)
    recipe = folder / "recipe.toml"
    recipe.write_text(RECIPE.format(runs=folder / "runs", urls=folder / f"train-{{000000..{shards - 1:06d}}}.tar",
                                    image_size=args.image_size, steps=steps, batch_size=args.batch_size,
                                    workers=args.workers))
    return recipe


def measure(mode: str, recipe: Path, size: int, samples_read: int, interval: float) -> dict[str, Any]:
    """Run one measurement in a fresh subprocess, sampling its process tree's memory meanwhile."""
    import psutil

    command = [sys.executable, __file__, "--child", mode, str(recipe), str(size), "--samples-read", str(samples_read)]
    env = {**os.environ, "MMKIT_PLUGINS": "", "HF_HUB_OFFLINE": "1"}  # no stray plugins, no network
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, text=True, env=env)
        root = psutil.Process(process.pid)
        peak_rss = peak_allocated = 0
        while process.poll() is None:
            rss, allocated = tree_memory(root)
            peak_rss, peak_allocated = max(peak_rss, rss), max(peak_allocated, allocated)
            time.sleep(interval)
        seconds = time.perf_counter() - started
        output.seek(0)
        text = output.read()
    found = [line[len(RESULT):] for line in text.splitlines() if line.startswith(RESULT)]
    if process.returncode != 0 or not found:
        tail = "\n".join(text.strip().splitlines()[-15:])
        print(f"  {mode} over {recipe.parent.name} failed (exit {process.returncode}):\n{tail}")
        return {"error": tail, "exit_code": process.returncode}
    child_numbers = json.loads(found[-1])
    return {**child_numbers, "tree_rss_mib": mib(peak_rss), "tree_allocated_mib": mib(peak_allocated),
            "seconds": round(seconds, 1)}


def tree_memory(root: Any) -> tuple[int, int]:
    """Summed RSS and allocated memory (Pss_Anon + Pss_Shmem) in bytes of a process and its
    descendants (those still there)."""
    import psutil

    rss = allocated = 0
    with contextlib.suppress(psutil.Error):
        for process in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error, OSError):
                rss += process.memory_info().rss
                allocated += allocated_bytes(process.pid)
    return rss, allocated


def allocated_bytes(pid: int) -> int:
    """A process's share of its anonymous and shared-memory pages (0 where the kernel lacks
    the Pss_Anon field, before Linux 5.13)."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, _, value = line.partition(":")
        fields[name] = int(value.split()[0]) * 1024 if value.strip().endswith("kB") else 0
    return fields.get("Pss_Anon", 0) + fields.get("Pss_Shmem", 0)


def child(mode: str, recipe_path: str, samples_read: int, size: int) -> None:
    """One measurement, in this fresh process; its peaks end the output as one JSON line."""
    from mmkit.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    numbers = train(recipe) if mode == "train" else stream(recipe, samples_read, size)
    gc.collect()  # loaders shut their workers down, so RUSAGE_CHILDREN covers them
    own, workers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    print(RESULT + json.dumps({**numbers, "self_mib": round(own.ru_maxrss / 1024, 1),  # ru_maxrss is KiB
                               "largest_worker_mib": round(workers.ru_maxrss / 1024, 1)}))


def train(recipe: Any) -> dict[str, Any]:
    """A training run of the recipe, as ``mmkit run`` makes it."""
    from mmkit.engine.run import Run

    summary = Run(recipe).fit()
    return {"steps": summary.get("steps"), "samples_per_second": summary.get("samples_per_second")}


def stream(recipe: Any, samples_read: int, size: int) -> dict[str, Any]:
    """The recipe's training stream without the model: the parts a run builds, the stream it
    makes of them (Streamed + stream_loader), read for ``samples_read`` samples, or until
    each of the set's ``size`` samples has come (at most three passes' worth)."""
    import torch

    from mmkit.components import build_parts
    from mmkit.data.loader import Streamed, stream_loader
    from mmkit.plugins import load_plugins

    parts = build_parts(recipe, load_plugins().registry)
    run, training = recipe.spec("run"), recipe.spec("train")
    source = Streamed(parts.train_set, parts.transforms, run.seed, workers=training.num_workers)
    collate, _ = parts.batching(torch.device("cpu"))  # the stream as a CPU run reads it
    loader = stream_loader(source, training.batch_size, pin_memory=False, collate=collate)
    def more() -> bool:
        return read < samples_read if samples_read else (len(ids) < size and read < 3 * size)

    read, ids, started = 0, set(), time.perf_counter()
    batches = iter(loader)
    while more():
        batch = next(batches)
        read += len(batch["id"])
        ids.update(batch["id"])
    seconds = time.perf_counter() - started
    del batches  # shuts the workers down
    return {"samples": read, "distinct_samples": len(ids), "read_seconds": round(seconds, 1),
            "samples_per_second": round(read / seconds, 1)}


def ratios(results: dict[str, Any], sizes: list[int], modes: list[str]) -> dict[str, Any]:
    """Each measure of the largest set over the smallest's (target: at most 1.10)."""
    small, large = str(min(sizes)), str(max(sizes))
    found = {}
    for mode in modes:
        a, b = results[mode].get(small, {}), results[mode].get(large, {})
        if "error" in a or "error" in b:
            continue
        found[mode] = {key: round(b[key] / a[key], 3) for key in PEAKS if a.get(key)}
    return found


PEAKS = {"self_mib": "main process (ru_maxrss)", "largest_worker_mib": "largest worker (ru_maxrss)",
         "tree_rss_mib": "process tree, summed RSS", "tree_allocated_mib": "process tree, allocated"}


def print_table(results: dict[str, Any], sizes: list[int], modes: list[str]) -> None:
    s = results["setup"]
    print(f"\npeak memory in MiB, {s['workers']} workers, batch {s['batch_size']}, {s['image_size']} px images, "
          f"{s['per_shard']} per shard; {s['cpu_cores']} CPU cores, load {s['load_before']} -> {s['load_after']}")
    reads = ", ".join(f"{results['stream'].get(str(size), {}).get('samples', '-')}" for size in sizes)
    what = {"stream": f"stream, no model: {s['samples_read'] or 'every sample once'} ({reads} samples read)",
            "train": f"train: Run.fit(), {s['train_steps']} steps of {s['batch_size']}"}
    for mode in modes:
        print(f"\n{what[mode]}")
        print(f"  {'peak':28s}" + "".join(f"{size:>10d}" for size in sizes) + f"{'ratio':>8s}")
        for key, label in PEAKS.items():
            row = [results[mode].get(str(size), {}).get(key) for size in sizes]
            ratio = results["ratios"].get(mode, {}).get(key)
            print(f"  {label:28s}" + "".join(f"{v:10.1f}" if v is not None else f"{'-':>10s}" for v in row)
                  + (f"{ratio:8.3f}" if ratio is not None else f"{'-':>8s}"))
    print("\nratio: the largest set's peak over the smallest's (target: at most 1.10)")


def setup(args: argparse.Namespace, steps: int) -> dict[str, Any]:
    return {**machine(), "sizes": args.sizes, "per_shard": args.per_shard,
            "image_size": args.image_size, "batch_size": args.batch_size, "workers": args.workers,
            "samples_read": args.samples_read, "train_steps": steps, "interval": args.interval, "load_before": load_average()}


def mib(count: int) -> float:
    return round(count / 2**20, 1)


if __name__ == "__main__":
    main()
