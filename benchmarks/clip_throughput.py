"""Training throughput: mmkit against open_clip_train on the same CLIP shape, data and settings.

Writes synthetic_shapes images and captions once as a CSV manifest (JPEGs beside it), then
trains the same CLIP on it with each trainer, one after the other, in fresh subprocesses:

- ``--device cpu``: a small CLIP (ViT 4 x 128, patch 8, 64 px; text transformer 4 x 128,
  context 32; embed 128), fp32, batch 64. open_clip_train gets it as an open_clip config;
  mmkit as a timm ViT with those model_args and its ``transformer`` text encoder.
- ``--device cuda``: open_clip's ViT-B-32 at 224 px, bf16 autocast, batch 256; mmkit builds
  the same towers through its ``open_clip`` encoders and compares their embeddings as they are
  (clip_retrieval's project = false): the same model. open_clip_train runs eager and with
  --torchcompile, mmkit eager and with train.compile = "reduce-overhead" (``--compile-mode``).

Same batch, precision, data workers, optimizer (AdamW, the same betas, eps, decay, peak rate
and warm-up, cosine to the last step) and steps. Each trainer logs every ``--log-every`` steps;
the rate is the median over the log intervals that end after ``--skip`` steps (start-up and
compilation excluded) and before the last ``--profile`` steps, which each mmkit run runs under
torch.profiler (train.profile; on cuda the last 6): its ops table is kept beside the JSON.
Each trainer's MFU is its rate times its FLOPs per sample, counted with
torch.utils.flop_counter (mmkit's from its summary.json; open_clip_train's on its own model and
captions, which it pads to the full context where mmkit cuts a batch after its longest text),
over the device's matmul rate as mmkit measured it. Peak memory:
the largest process's resident set on the CPU; the GPU's memory in use (nvidia-smi) on CUDA.

    python benchmarks/clip_throughput.py --device cpu
    python benchmarks/clip_throughput.py --device cuda --json benchmarks/results/clip_throughput_cuda.json
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).parent))
from common import data_folder, load_average, machine, write_results  # noqa: E402

from mmkit.engine.flops import counted_attention, mfu  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SMALL = {"embed_dim": 128,
         "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "head_width": 32, "patch_size": 8},
         "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 4}}
PRESETS = {  # what each device trains unless the command line says otherwise
    "cpu": {"model": "small", "image_size": 64, "batch_size": 64, "precision": "fp32", "workers": 2,
            "steps": 80, "skip": 10, "log_every": 1, "samples": None, "compiled": False, "compile_mode": "default",
            "profile": 0,
            "lr": 1e-3, "warmup": 10, "beta2": 0.999, "eps": 1e-8},
    "cuda": {"model": "ViT-B-32", "image_size": 224, "batch_size": 256, "precision": "bf16", "workers": 12,
             "steps": 192, "skip": 60, "log_every": 10, "samples": 16384, "compiled": True,
             "compile_mode": "reduce-overhead", "profile": 6,
             "lr": 5e-4, "warmup": 50, "beta2": 0.98, "eps": 1e-6},  # open_clip's settings for ViTs
}
OPTIMIZER = {"weight_decay": 0.1, "beta1": 0.9}  # the same for both presets
OPEN_CLIP_LAUNCHER = """import logging, sys, time, open_clip
import open_clip_train.train
if sys.argv[1] != "-":
    open_clip.add_model_config(sys.argv[1])
class Stamped:  # each training log line stamped with when it was written: its times print to the ms only
    def __getattr__(self, name):
        return getattr(logging, name)
    def info(self, message, *args, **kwargs):
        logging.info(f"at {time.perf_counter():.6f} {message}", *args, **kwargs)
open_clip_train.train.logging = Stamped()
from open_clip_train.main import main
main(sys.argv[2:])
"""
SAME_IMAGES = ["--aug-cfg", "scale=(1.0,1.0)"]  # the whole (square) image, as mmkit's preprocess takes it


def write_data(folder: Path, samples: int, image_size: int, processes: int = 1) -> Path:
    """synthetic_shapes as a CSV manifest (image, text) with JPEGs, once per folder, size and
    count; the images are written by ``processes`` processes."""
    path = folder / f"shapes-{samples}-{image_size}px.csv"
    if path.exists():
        return path
    chunks = [(start, min(start + 1024, samples), samples, image_size, path) for start in range(0, samples, 1024)]
    with multiprocessing.get_context("spawn").Pool(max(1, min(processes, len(chunks)))) as pool:
        rows = [row for chunk in pool.map(_write_images, chunks) for row in chunk]
    partial = path.with_name(path.name + ".partial")
    with partial.open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, ["image", "text"])
        writer.writeheader()
        writer.writerows(rows)
    os.replace(partial, path)
    return path


def _write_images(chunk: tuple[int, int, int, int, Path]) -> list[dict[str, str]]:
    """One share of the samples' JPEGs, as write_manifest writes them: their cells (path, caption)."""
    from mmkit import build
    from mmkit.data.manifest import manifest_cells

    start, stop, samples, image_size, manifest = chunk
    data = build("datasets", "synthetic_shapes", num_samples=samples, image_size=image_size)
    return [manifest_cells({"image": data[i]["image"], "text": data[i]["text"]}, i, manifest, ())
            for i in range(start, stop)]


def open_clip_command(csv: Path, args: argparse.Namespace, logs: Path, compiled: bool) -> list[str]:
    """open_clip_train's command line for the benchmark's settings."""
    launcher = logs / "open_clip_launcher.py"
    launcher.write_text(OPEN_CLIP_LAUNCHER)
    config, model = "-", args.model
    if args.model == "small":
        config, model = str(small_config(logs)), "mmkit-bench-small"
    epochs = args.steps * args.batch_size // args.samples  # main() refuses a fraction of an epoch
    precision = {"fp32": "fp32", "bf16": "amp_bf16"}[args.precision]
    return [sys.executable, str(launcher), config, "--train-data", csv.name, "--dataset-type", "csv",
            "--csv-separator", ",", "--csv-img-key", "image", "--csv-caption-key", "text",
            "--model", model, "--batch-size", str(args.batch_size), "--workers", str(args.workers),
            "--epochs", str(epochs), "--lr", str(args.lr), "--warmup", str(args.warmup),
            "--wd", str(OPTIMIZER["weight_decay"]), "--beta1", str(OPTIMIZER["beta1"]),
            "--beta2", str(args.beta2), "--eps", str(args.eps),
            "--precision", precision, "--device", args.device, "--log-every-n-steps", str(args.log_every),
            "--save-frequency", "0", "--zeroshot-frequency", "0", "--val-frequency", "0",
            "--logs", str(logs), "--name", f"open_clip-{time.time_ns()}", "--seed", "0", *SAME_IMAGES,
            *(["--torchcompile"] if compiled else [])]


def small_config(logs: Path) -> Path:
    """The small CLIP as an open_clip model config file (its name is the file's)."""
    path = logs / "mmkit-bench-small.json"
    path.write_text(json.dumps(SMALL))
    return path


def run_open_clip(csv: Path, args: argparse.Namespace, logs: Path, compiled: bool = False) -> dict[str, Any]:
    """open_clip_train on the manifest: its log records and peak memory."""
    output, peak = measured(open_clip_command(csv, args, logs, compiled), csv.parent, args.device)
    return {"records": open_clip_log(output, args.batch_size), "peak_mib": peak}


LINE = re.compile(r"at ([\d.]+) Train Epoch: (\d+) \[\s*(\d+)/(\d+) .*?Data \(t\): ([\d.]+) "
                  r"Batch \(t\): ([\d.]+),.*? Loss: ([\d.]+) ")


def open_clip_log(output: str, batch_size: int) -> list[dict[str, float]]:
    """open_clip_train's log lines (stamped by the launcher) as records: the step, samples/s
    over the steps since the previous line, from the lines' stamps (its own batch time prints
    to the millisecond: 1.5% apart at 70 ms; the first line, with none before it, from that),
    the share of that time spent waiting for data (its averages reset at each line), and the
    loss at that step."""
    records, before = [], None
    for stamp, epoch, seen, per_epoch, data_time, batch_time, loss in LINE.findall(output):
        step, now = int(epoch) * (int(per_epoch) // batch_size) + int(seen) // batch_size, float(stamp)
        rate = batch_size / float(batch_time) if before is None else batch_size * (step - before[0]) / (now - before[1])
        records.append({"step": step, "samples_per_s": rate, "data_share": float(data_time) / float(batch_time),
                        "loss": float(loss)})
        before = step, now
    return records


def open_clip_flops(args: argparse.Namespace, manifest: Path, logs: Path, rows: int = 4) -> float:
    """FLOPs per sample of open_clip_train's step (forward + backward of its CLIP loss), counted
    as mmkit counts its own, on the manifest's first captions: open_clip pads every text to its
    full context, mmkit cuts a batch after its longest text."""
    import open_clip
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    name = args.model
    if name == "small":
        name = "mmkit-bench-small"
        open_clip.add_model_config(str(small_config(logs)))
    model = open_clip.create_model(name)
    with manifest.open(newline="", encoding="utf-8") as file:
        captions = [row["text"] for _, row in zip(range(rows), csv.DictReader(file))]
    text = open_clip.get_tokenizer(name)(captions)
    images = torch.randn(rows, 3, args.image_size, args.image_size)
    with counted_attention(), FlopCounterMode(display=False) as counter:
        open_clip.ClipLoss()(*model(images, text)).backward()  # image and text features, logit scale
    return counter.get_total_flops() / rows


def run_mmkit(csv: Path, args: argparse.Namespace, logs: Path, compiled: bool = False) -> dict[str, Any]:
    """mmkit on the same manifest with the same shapes: its log records, peak memory, summary
    and, with ``--profile``, its profiled steps' ops table (copied beside the JSON)."""
    kind = "compiled" if compiled else "eager"
    name = f"mmkit-{kind}-{time.time_ns()}"  # a folder of its own, every time
    recipe = logs / f"{name}.toml"
    recipe.write_text(mmkit_recipe(name, csv, args, logs, compiled))
    _, peak = measured([sys.executable, "-m", "mmkit", "run", str(recipe)], ROOT, args.device)
    lines = [json.loads(line) for line in (logs / name / "metrics.jsonl").read_text().splitlines()]
    records = [{"step": r["step"], "samples_per_s": r["samples_per_s"], "mfu": r["mfu"], "loss": r["train/loss"],
                "data_share": r["data_share"]} for r in lines if "samples_per_s" in r]
    if args.profile:
        ops = Path(args.json).with_name(f"{Path(args.json).stem}_profile_mmkit_{kind}.txt")
        ops.write_text((logs / name / "profile" / "ops.txt").read_text())
    return {"records": records, "peak_mib": peak, "summary": json.loads((logs / name / "summary.json").read_text())}


def mmkit_recipe(name: str, csv: Path, args: argparse.Namespace, output: Path, compiled: bool) -> str:
    """The recipe mmkit trains: the model as the preset names it, the shared settings."""
    if args.model == "small":
        model = SMALL_MODEL.format(size=args.image_size)
    else:
        model = OPEN_CLIP_MODEL.format(model=args.model)
    return RECIPE.format(name=name, csv=csv, output=output, device=args.device, precision=args.precision,
                         model=model, steps=args.steps, batch=args.batch_size, lr=args.lr, warmup=args.warmup,
                         beta2=args.beta2, eps=args.eps, workers=args.workers, log_every=args.log_every,
                         compile=f'"{args.compile_mode}"' if compiled else "false",
                         profile=f"profile = {list(profiled_steps(args))}" if args.profile else "",
                         **OPTIMIZER)


def profiled_steps(args: argparse.Namespace) -> tuple[int, int]:
    """The first and last step mmkit profiles: the last ``--profile`` (none: past the last step)."""
    return args.steps - args.profile + 1, args.steps


RECIPE = """[run]
name = "{name}"
output_dir = "{output}"
device = "{device}"
precision = "{precision}"
seed = 0

[data]
name = "manifest"
path = "{csv}"
{model}
[train]
max_steps = {steps}
batch_size = {batch}
lr = {lr}
warmup = {warmup}
weight_decay = {weight_decay}
beta1 = {beta1}
beta2 = {beta2}
eps = {eps}
num_workers = {workers}
log_every = {log_every}
checkpoint_every = 0
compile = {compile}
{profile}
"""
SMALL_MODEL = """
[model.image]
name = "timm"
model_name = "vit_tiny_patch16_224"
image_size = {size}
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
"""
OPEN_CLIP_MODEL = """
[model.image]
name = "open_clip"
model_name = "{model}"

[model.text]
name = "open_clip"
model_name = "{model}"

[task]
name = "clip_retrieval"
project = false
"""

METER = """import resource, subprocess, sys, threading, time
peak = [0]
def watch():
    while True:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True).stdout.split()
        peak[0] = max([peak[0], *map(int, out[:1])])
        time.sleep(0.5)
if sys.argv[1] == "cuda":
    threading.Thread(target=watch, daemon=True).start()
done = subprocess.run(sys.argv[2:])
print(f"peak rss kib: {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}", flush=True)
print(f"peak gpu mib: {peak[0]}", flush=True)
sys.exit(done.returncode)
"""


def measured(command: list[str], cwd: Path, device: str) -> tuple[str, int]:
    """Run one trainer to the end under a meter process of its own: its output (stderr too)
    and its peak memory in MiB: the GPU's memory in use on CUDA (nvidia-smi, twice a second),
    else the largest process's resident set (workers included)."""
    done = subprocess.run([sys.executable, "-c", METER, device, *command], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if done.returncode:
        raise SystemExit(f"{' '.join(command[:4])} ... failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    if device == "cuda":
        return done.stdout + done.stderr, int(re.findall(r"peak gpu mib: (\d+)", done.stdout)[-1])
    return done.stdout + done.stderr, int(re.findall(r"peak rss kib: (\d+)", done.stdout)[-1]) // 1024


def steady(records: list[dict[str, float]], skip: int, until: int, key: str = "samples_per_s") -> float:
    """The median ``key`` (samples/s, or the data share) over the log intervals that end after
    step ``skip`` (start-up, compilation and the first batches left out) and before step
    ``until`` (an interval holding a profiled step left out)."""
    kept = [r[key] for r in records if skip < r["step"] < until]
    if not kept:
        raise SystemExit(f"no log line after step {skip} and before {until} ({len(records)} lines); "
                         "train more steps than --skip and --profile take")
    return statistics.median(kept)


def loss_plot(runs: dict[str, dict[str, Any]], path: Path) -> None:
    """Each trainer's training loss per logged step, overlaid."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for name, run in runs.items():
        ax.plot([r["step"] for r in run["records"]], [r["loss"] for r in run["records"]], label=name, alpha=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (contrastive)")
    ax.set_title("the same CLIP, data and settings")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def chosen_trainers(compiled: bool, only: list[str] | None) -> dict[str, tuple[Callable[..., dict[str, Any]], bool]]:
    """The trainers to run, by name, in the order they run, each with whether it compiles: the
    goals' three first, so a run cut short by a time limit loses mmkit eager; --only keeps some."""
    trainers = {"open_clip_train": (run_open_clip, False)}
    if compiled:
        trainers |= {"open_clip_train --torchcompile": (run_open_clip, True), "mmkit train.compile": (run_mmkit, True)}
    trainers["mmkit"] = (run_mmkit, False)
    if unknown := sorted(set(only or ()) - set(trainers)):
        raise SystemExit(f"--only {', '.join(unknown)}: not among this run's trainers ({', '.join(trainers)})")
    return {name: trainer for name, trainer in trainers.items() if name in (only or trainers)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=sorted(PRESETS), default="cpu")
    for key in ("steps", "skip", "batch_size", "workers", "log_every", "samples"):
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, help="default: the device's preset")
    parser.add_argument("--model", help='"small" or an open_clip model name; default: the preset')
    parser.add_argument("--precision", choices=["fp32", "bf16"])
    parser.add_argument("--compiled", action=argparse.BooleanOptionalAction,
                        help="also run open_clip_train --torchcompile and mmkit train.compile; default: the preset")
    parser.add_argument("--compile-mode", choices=["default", "reduce-overhead", "max-autotune"],
                        help="mmkit's train.compile when compiled; default: the preset (CUDA graphs on cuda)")
    parser.add_argument("--profile", type=int, help="steps at the end of each mmkit run to profile (0: none); "
                        "default: the preset")
    parser.add_argument("--only", nargs="+", metavar="TRAINER", help="run these trainers alone, by the names the "
                        'results use (quoted: "mmkit train.compile"); default: all the preset runs')
    parser.add_argument("--folder", help="keep the written data here and reuse it (default: a temporary folder)")
    parser.add_argument("--json", help="default: benchmarks/results/clip_throughput_<device>.json")
    args = parser.parse_args()
    for key, value in PRESETS[args.device].items():
        if getattr(args, key, None) is None:  # the preset's, where the command line is silent
            setattr(args, key, value)
    args.samples = args.samples or args.steps * args.batch_size
    if args.samples % args.batch_size or args.steps * args.batch_size % args.samples:
        parser.error(f"--steps {args.steps} x --batch-size {args.batch_size} must be whole passes over --samples "
                     f"{args.samples} of whole batches: open_clip_train counts epochs, mmkit steps")
    if not 0 <= args.profile < args.steps - args.skip:
        parser.error(f"--profile {args.profile}: from 0 to {args.steps - args.skip - 1} here (--steps {args.steps} "
                     f"- --skip {args.skip} - 1: the rate needs a logged step after the skipped ones and before the "
                     "profiled ones)")
    args.json = args.json or f"benchmarks/results/clip_throughput_{args.device}.json"
    trainers = chosen_trainers(args.compiled, args.only)
    runs: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    with data_folder(args.folder, "mmkit-throughput-") as folder:
        csv = write_data(folder, args.samples, args.image_size, os.cpu_count() or 1)
        counted = {"open_clip_train": open_clip_flops(args, csv, folder)}
        before = load_average()
        for name, (trainer, compiled) in trainers.items():
            started = time.perf_counter()
            try:
                run = trainer(csv, args, folder, compiled)
                run["seconds"] = time.perf_counter() - started  # start-up and compilation included
                until = profiled_steps(args)[0]  # a log too short to time fails this trainer, not the bench
                run["rate"], run["data_share"] = (steady(run["records"], args.skip, until, key)
                                                  for key in ("samples_per_s", "data_share"))
                runs[name] = run
                if name.startswith("mmkit"):  # the same count eager and compiled
                    counted["mmkit"] = run["summary"]["flops_per_sample"]
            except SystemExit as failure:  # a trainer that fails costs its own numbers, not the others'
                failed[name] = str(failure)
                print(f"{name} failed: {failure}", file=sys.stderr)
            results = compared(runs, args, before, counted) | ({"failed": failed} if failed else {})
            write_results(results, args.json)  # after each trainer: a cut-off run keeps its numbers
            loss_plot(runs, Path(args.json).with_suffix(".png"))
    for key, value in results.items():
        if key not in ("loss", "failed"):
            print(f"{key}: {value}")
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)} (their output is above and in the JSON's 'failed')")


def compared(runs: dict[str, dict[str, Any]], args: argparse.Namespace, before: list[float],
             counted: dict[str, float]) -> dict[str, Any]:
    """The numbers of the trainers run so far: rates, ratios, FLOPs per sample and MFU (each
    trainer's own count, eager and compiled alike), memory, losses."""
    rates = {name: run["rate"] for name, run in runs.items()}
    results = {**machine(), "load_average_before": before, "load_average_after": load_average(),
               "settings": {k: v for k, v in vars(args).items() if k not in ("json", "folder", "only")} | OPTIMIZER,
               "samples_per_s": {name: round(rate, 1) for name, rate in rates.items()},
               "peak_memory_mib": {name: run["peak_mib"] for name, run in runs.items()},
               "wall_seconds": {name: round(run["seconds"], 1) for name, run in runs.items()},
               "data_wait_share": {name: round(run["data_share"], 3) for name, run in runs.items()},
               "compile": {name: run["summary"]["compile"] for name, run in runs.items() if "summary" in run},
               "profile": {name: run["summary"]["profile"] for name, run in runs.items() if "summary" in run}}
    if mmkit := [name for name in runs if name.startswith("mmkit")]:
        peak = runs[mmkit[0]]["summary"]["peak_flops_per_s"]
        results |= {"ratios": {f"{m} / {o}": round(rates[m] / rates[o], 3) for m in mmkit for o in rates
                               if o.startswith("open_clip")},
                    "flops_per_sample": counted, "matmul_flops_per_s": peak,
                    "mfu": {name: round(mfu(rate, counted[name.split()[0]], peak), 4) for name, rate in rates.items()}}
    results["loss"] = {name: [(r["step"], round(r["loss"], 4)) for r in run["records"]] for name, run in runs.items()}
    return results


if __name__ == "__main__":
    main()
