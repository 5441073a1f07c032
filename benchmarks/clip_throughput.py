"""Training throughput: mmkit against open_clip_train on the same CLIP shape, data and settings.

Writes synthetic_shapes images and captions once as a CSV manifest (JPEGs beside it), then
trains the same small CLIP on it with each, one after the other, in fresh subprocesses:

- open_clip_train (``python -m open_clip_train.main``, the model given as an open_clip config:
  ViT 4 x 128, patch 8, 64 px; text transformer 4 x 128, context 32; embed 128);
- mmkit (``mmkit run`` of a recipe with the same shapes: timm ViT with those model_args, the
  ``transformer`` text encoder, clip_retrieval).

Same batch, precision (fp32), data workers, optimizer steps. Each logs every step; the rate is
the median of the per-step samples/s after the first ``--skip`` steps (start-up excluded).
mmkit's MFU is its samples/s times the FLOPs of one sample's forward + backward, counted by
torch.utils.flop_counter, over the machine's measured fp32 matmul rate (a CPU has no datasheet
peak to hand); peak memory is each run's peak resident set (its largest process, under a meter process of its own).

    python benchmarks/clip_throughput.py --device cpu
    python benchmarks/clip_throughput.py --device cpu --steps 120 --json benchmarks/results/clip_throughput_cpu.json

``--device cuda`` (ViT-B-32 at 224 px, bf16, batch 256, and open_clip_train with
--torchcompile too) is the GPU half of issue 15, not written yet.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import data_folder, load_average, machine, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SMALL = {"embed_dim": 128,
         "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "head_width": 32, "patch_size": 8},
         "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 4}}
OPEN_CLIP_LAUNCHER = """import sys, open_clip
open_clip.add_model_config(sys.argv[1])
from open_clip_train.main import main
main(sys.argv[2:])
"""


def write_data(folder: Path, samples: int) -> Path:
    """synthetic_shapes as a CSV manifest (image, text) with JPEGs, once per folder and size."""
    from mmkit import build
    from mmkit.data.manifest import write_manifest

    path = folder / f"shapes-{samples}.csv"
    if not path.exists():
        data = build("datasets", "synthetic_shapes", num_samples=samples, image_size=64)
        write_manifest(({"image": s["image"], "text": s["text"]} for s in data), path)
    return path


def run_open_clip(csv: Path, args: argparse.Namespace, logs: Path) -> tuple[list[float], int]:
    """open_clip_train on the manifest: its per-step samples/s and its peak RSS (KiB)."""
    config = logs / "mmkit-bench-small.json"
    config.write_text(json.dumps(SMALL))
    launcher = logs / "open_clip_launcher.py"
    launcher.write_text(OPEN_CLIP_LAUNCHER)
    command = [sys.executable, str(launcher), str(config), "--train-data", str(csv.name), "--dataset-type", "csv",
               "--csv-separator", ",", "--csv-img-key", "image", "--csv-caption-key", "text",
               "--model", "mmkit-bench-small", "--batch-size", str(args.batch_size), "--workers", str(args.workers),
               "--epochs", "1", "--train-num-samples", str(args.steps * args.batch_size), "--lr", "1e-3",
               "--warmup", "10", "--precision", "fp32", "--device", args.device, "--log-every-n-steps", "1",
               "--save-frequency", "0", "--zeroshot-frequency", "0", "--val-frequency", "0",
               "--logs", str(logs), "--name", f"open_clip-{time.time_ns()}", "--seed", "0"]
    output, peak = measured(command, cwd=csv.parent)  # the CSV's image paths are relative to its folder
    return open_clip_rates(output), peak


def open_clip_rates(output: str) -> list[float]:
    """The per-step samples/s of open_clip_train's log lines ("Batch (t): 0.302, 211.9/s, ...")."""
    return [float(rate) for rate in re.findall(r"Batch \(t\): [\d.]+, ([\d.]+)/s,", output)]


def run_mmkit(csv: Path, args: argparse.Namespace, logs: Path) -> tuple[list[float], int]:
    """mmkit on the same manifest with the same shapes: its per-step samples/s and peak RSS (KiB)."""
    name = f"mmkit-{time.time_ns()}"  # a folder of its own, however often the data folder is reused
    recipe = logs / f"{name}.toml"
    recipe.write_text(RECIPE.format(name=name, csv=csv, steps=args.steps, batch=args.batch_size,
                                    workers=args.workers, device=args.device, output=logs))
    _, peak = measured([sys.executable, "-m", "mmkit", "run", str(recipe)], cwd=ROOT)
    records = [json.loads(line) for line in (logs / name / "metrics.jsonl").read_text().splitlines()]
    return [r["samples_per_s"] for r in records if "samples_per_s" in r], peak


RECIPE = """[run]
name = "{name}"
output_dir = "{output}"
device = "{device}"
precision = "fp32"
seed = 0

[data]
name = "manifest"
path = "{csv}"

[model.image]
name = "timm"
model_name = "vit_tiny_patch16_224"
image_size = 64
model_args = {{ depth = 4, embed_dim = 128, num_heads = 4, patch_size = 8 }}

[model.text]
name = "transformer"
width = 128
layers = 4
heads = 4
context_length = 32

[task]
name = "clip_retrieval"
embed_dim = 128

[train]
max_steps = {steps}
batch_size = {batch}
lr = 1e-3
warmup = 10
num_workers = {workers}
log_every = 1
checkpoint_every = 0
"""


METER = """import resource, subprocess, sys
done = subprocess.run(sys.argv[1:])
print(f"peak rss kib: {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}", flush=True)
sys.exit(done.returncode)
"""


def measured(command: list[str], cwd: Path) -> tuple[str, int]:
    """Run one trainer to the end under a meter process of its own: its output (stderr too)
    and its peak resident set in KiB (the largest process it ran, workers included)."""
    done = subprocess.run([sys.executable, "-c", METER, *command], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if done.returncode:
        raise SystemExit(f"{' '.join(command[:4])} ... failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout + done.stderr, int(re.findall(r"peak rss kib: (\d+)", done.stdout)[-1])


def mfu(samples_per_s: float, flops_per_sample: float, peak_flops_per_s: float) -> float:
    """Model FLOPs utilisation: the FLOP/s training does over the FLOP/s the machine can."""
    return samples_per_s * flops_per_sample / peak_flops_per_s


def steady(rates: list[float], skip: int) -> float:
    """The median per-step rate after the first ``skip`` steps (start-up, first batches)."""
    kept = rates[skip:]
    if not kept:
        raise SystemExit(f"only {len(rates)} steps were logged; train more than --skip {skip}")
    return statistics.median(kept)


def flops_per_sample(csv: Path, batch_size: int) -> float:
    """One sample's forward + backward FLOPs in mmkit's model, counted (torch.utils.flop_counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    from mmkit.components import build_parts
    from mmkit.data.loader import transform
    from mmkit.plugins import load_plugins
    from mmkit.recipe import load_recipe

    recipe_path = csv.parent / "mmkit_flops.toml"
    recipe_path.write_text(RECIPE.format(name="flops", csv=csv, steps=1, batch=batch_size, workers=0, device="cpu",
                                         output=csv.parent))
    parts = build_parts(load_recipe(recipe_path), load_plugins().registry)
    samples = [parts.train_set[i] for i in range(batch_size)]
    batch = parts.collate([transform(s, parts.transforms) for s in samples])
    batch.pop("_problems", None)
    with FlopCounterMode(display=False) as counter:
        loss = sum(v for k, v in parts.task.training_step(batch).items() if k.startswith("loss/"))
        loss.backward()
    return counter.get_total_flops() / batch_size


def matmul_rate(size: int = 2048, repeats: int = 10) -> float:
    """The machine's achieved fp32 matmul FLOP/s (the best of ``repeats``): MFU's denominator on a CPU."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu"], default="cpu")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--skip", type=int, default=10, help="first steps left out of the rate")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--folder", help="keep the written data here and reuse it (default: a temporary folder)")
    parser.add_argument("--json", default="benchmarks/results/clip_throughput_cpu.json")
    args = parser.parse_args()
    with data_folder(args.folder, "mmkit-throughput-") as folder:
        csv = write_data(folder, args.steps * args.batch_size)
        before = load_average()
        open_clip_rates, open_clip_peak = run_open_clip(csv, args, folder)
        mmkit_rates, mmkit_peak = run_mmkit(csv, args, folder)
        flops = flops_per_sample(csv, args.batch_size)
    peak_rate = matmul_rate()
    ours, theirs = steady(mmkit_rates, args.skip), steady(open_clip_rates, args.skip)
    results = {**machine(), "load_average_before": before, "load_average_after": load_average(),
               "device": args.device, "steps": args.steps, "batch_size": args.batch_size, "workers": args.workers,
               "open_clip_train_samples_per_s": round(theirs, 1), "mmkit_samples_per_s": round(ours, 1),
               "ratio": round(ours / theirs, 3), "mmkit_flops_per_sample": flops,
               "matmul_flops_per_s": peak_rate, "mmkit_mfu": round(mfu(ours, flops, peak_rate), 4),
               "peak_rss_mib": {"open_clip_train": round(open_clip_peak / 1024), "mmkit": round(mmkit_peak / 1024)}}
    for key, value in results.items():
        print(f"{key}: {value}")
    write_results(results, args.json)


if __name__ == "__main__":
    main()
