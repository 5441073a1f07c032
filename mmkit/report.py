"""The run report: PNG plots (training curves, retrieval examples, ...) and report.html."""

from __future__ import annotations

import html
import json
import textwrap
from pathlib import Path
from typing import Any

import torch

from mmkit.files import write_text_atomic


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def training_curves(records: list[dict[str, Any]]) -> Any:
    """Training loss (and learning rate) per step, and every evaluated metric per step."""
    plt = _pyplot()
    train = [r for r in records if "train/loss" in r]
    evals = [r for r in records if any(k.startswith("val/") for k in r)]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot([r["step"] for r in train], [r["train/loss"] for r in train], label="train loss")
    left.set_xlabel("step")
    left.set_ylabel("loss")
    left.set_title("training loss")
    if train and "lr" in train[0]:
        lr_axis = left.twinx()
        lr_axis.plot([r["step"] for r in train], [r["lr"] for r in train], color="grey", alpha=0.5)
        lr_axis.set_ylabel("learning rate", color="grey")
    keys = sorted({k for r in evals for k in r if k.startswith("val/") and "/R@" in k and "chance" not in k})
    for key in keys:
        points = [(r["step"], r[key]) for r in evals if key in r]
        line = right.plot(*zip(*points), marker="o", label=key.removeprefix("val/"))[0]
        chance = evals[-1].get(key.replace("val/", "val/chance/", 1))
        if chance is not None:
            right.axhline(chance, color=line.get_color(), linestyle=":", linewidth=1)
    right.set_xlabel("step")
    right.set_title("held-out recall (dotted: chance)")
    if keys:
        right.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _draw(ax: Any, sample: dict[str, Any], modality: str) -> None:
    value = sample[modality]
    if modality == "image":
        ax.imshow(value)
    elif modality == "audio":
        ax.specgram(value.samples.numpy(), Fs=value.sample_rate, NFFT=256, noverlap=128)
    else:
        ax.text(0.5, 0.5, "\n".join(textwrap.wrap(str(value), 18)), ha="center", va="center", fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def retrieval_grid(dataset: Any, similarity: torch.Tensor, relevant: torch.Tensor, query: str,
                   gallery: str, rows: int = 6, k: int = 5) -> Any:
    """For a few queries with distinct captions: the query, then its top-k retrieved items,
    framed green when they match and red when they do not."""
    plt = _pyplot()
    chosen, seen = [], set()
    for i in range(len(similarity)):
        key = tuple(relevant[i].nonzero().flatten().tolist()[:3])
        if key not in seen:
            seen.add(key)
            chosen.append(i)
        if len(chosen) == rows:
            break
    fig, axes = plt.subplots(len(chosen), k + 1, figsize=(1.9 * (k + 1), 1.9 * len(chosen)), squeeze=False)
    for row, i in enumerate(chosen):
        _draw(axes[row][0], dataset[i], query)
        axes[row][0].set_title("query", fontsize=8)
        for col, j in enumerate(similarity[i].topk(min(k, similarity.shape[1])).indices.tolist(), 1):
            _draw(axes[row][col], dataset[j], gallery)
            hit = bool(relevant[i, j])
            for spine in axes[row][col].spines.values():
                spine.set_edgecolor("green" if hit else "red")
                spine.set_linewidth(3)
            axes[row][col].set_title(f"#{col} {'match' if hit else 'miss'}", fontsize=8)
    fig.suptitle(f"{query} -> {gallery} retrieval on held-out data")
    fig.tight_layout()
    return fig


def similarity_heatmap(similarity: torch.Tensor, query: str, gallery: str) -> Any:
    """Cosine similarities of the first held-out pairs; a bright diagonal means aligned."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4.5))
    image = ax.imshow(similarity.numpy(), cmap="viridis")
    ax.set_xlabel(f"{gallery} item")
    ax.set_ylabel(f"{query} item")
    ax.set_title("held-out similarity")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig


def write_report(folder: Path, summary: dict[str, Any], figures: dict[str, Any]) -> Path:
    """Save each figure as PNG beside report.html, which shows them under the summary."""
    plt = _pyplot()
    images = []
    for name, fig in figures.items():
        fig.savefig(folder / f"{name}.png", dpi=100)
        plt.close(fig)
        images.append(f'<h2>{html.escape(name.replace("_", " "))}</h2><img src="{name}.png">')
    rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{v:.4g}</td><td>{_chance(summary, k)}</td></tr>"
        for k, v in summary.get("metrics", {}).items()
    )
    page = f"""<!doctype html><html><head><meta charset="utf-8">
<title>mmkit run {html.escape(summary["name"])}</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:2px 12px}}img{{max-width:100%}}</style></head>
<body><h1>Run {html.escape(summary["name"])}</h1>
<p>task {html.escape(summary["task"])}, {summary["steps"]} steps in {summary["train_seconds"]:.0f} s
({summary["samples_per_second"]:.1f} samples/s)</p>
<table><tr><th>held-out metric</th><th>value</th><th>chance</th></tr>{rows}</table>
{"".join(images)}
<h2>summary.json</h2><pre>{html.escape(json.dumps(summary, indent=2))}</pre></body></html>"""
    path = folder / "report.html"
    write_text_atomic(path, page)
    return path


def _chance(summary: dict[str, Any], key: str) -> str:
    value = summary.get("chance", {}).get(key)
    return "" if value is None else f"{value:.4g}"
