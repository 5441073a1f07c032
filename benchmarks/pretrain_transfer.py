"""Does the joint MLM + autoencoder pretraining help a fine-tune with few labels?

recipes/finetune_fused.toml is fine-tuned twice on the same small labelled subset, for the same
steps and seeds: once with its encoders and cross-attention from the pretraining run, once from
random weights. Both held-out accuracies (500 images, the majority class beside them) are
printed side by side and written to benchmarks/results/pretrain_transfer.json.

    python benchmarks/pretrain_transfer.py                # 24 labels (4 a class), 60 steps, seeds 0 1 2;
                                                          # trains runs/pretrain_mlm_ae first if it is not there
    python benchmarks/pretrain_transfer.py --labels 100 --steps 150 --seeds 0 1   # 5% of the recipe's labels
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

from common import load_average, machine, write_results

from mmkit.engine.run import Run
from mmkit.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("image", "text", "fusion")


def pretrained_run(folder: Path) -> Path:
    """The pretraining run's folder, trained with recipes/pretrain_mlm_ae.toml first if missing."""
    if not (folder / "model.safetensors").exists():
        print(f"no finished run in {folder}: training recipes/pretrain_mlm_ae.toml there first")
        Run(load_recipe(ROOT / "recipes" / "pretrain_mlm_ae.toml",
                        [f"run.output_dir={folder.parent}", f"run.name={folder.name}"])).fit()
    return folder


def finetune(start: Path | None, labels: int, steps: int, seed: int, output: Path) -> dict[str, Any]:
    """One fine-tune of the recipe on ``labels`` labelled samples, from ``start`` or from scratch."""
    name = f"{'pretrained' if start else 'scratch'}-seed{seed}"
    recipe = load_recipe(ROOT / "recipes" / "finetune_fused.toml", [
        f"data.num_samples={labels}", f"train.max_steps={steps}", f"run.seed={seed}", f"run.output_dir={output}",
        f"run.name={name}", "train.checkpoint_every=0", "eval.every=0", "train.warmup=10",
        f"train.batch_size={min(64, labels)}"])  # a batch is at most the labelled set
    for part in PARTS:
        table = recipe.tree["model"][part]
        table.pop("init_from")
        if start:
            table["init_from"] = str(start)
    began = time.perf_counter()
    summary = Run(recipe).fit()
    return {"run": name, "accuracy": summary["metrics"]["accuracy"], "majority_class": summary["chance"]["accuracy"],
            "seconds": round(time.perf_counter() - began, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-run", default="runs/pretrain_mlm_ae", help="the pretraining run's folder")
    parser.add_argument("--labels", type=int, default=24, help="labelled training samples (the recipe has 2,000)")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps of each fine-tune")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output", default="runs/pretrain_transfer", help="where the fine-tune runs go")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "pretrain_transfer.json"))
    args = parser.parse_args()
    start = pretrained_run(Path(args.pretrain_run))
    runs = [finetune(begin, args.labels, args.steps, seed, Path(args.output))
            for seed in args.seeds for begin in (start, None)]
    mean = {kind: statistics.mean(r["accuracy"] for r in runs if r["run"].startswith(kind)) for kind in ("pretrained", "scratch")}
    print(f"\n{args.labels} labels, {args.steps} steps, seeds {args.seeds}: held-out accuracy (majority class "
          f"{runs[0]['majority_class']:.3f})")
    for run in runs:
        print(f"  {run['run']:<20} {run['accuracy']:.3f}  ({run['seconds']:.0f} s)")
    print(f"  mean: from pretraining {mean['pretrained']:.3f}, from scratch {mean['scratch']:.3f}")
    write_results({**machine(), "load_average": load_average(), "labels": args.labels, "steps": args.steps,
                   "pretrain_run": str(start), "runs": runs, "mean_accuracy": mean}, args.results)


if __name__ == "__main__":
    main()
