"""The run report: PNG plots (training curves, retrieval examples, ...) and report.html."""

from __future__ import annotations

import html
import itertools
import json
import textwrap
from pathlib import Path
from typing import Any, Sequence

import torch

from mmkit.files import write_text_atomic


def _subplots(*grid: int, figsize: tuple[float, float], **kwargs: Any) -> tuple[Any, Any]:
    """A figure and its axes, made without pyplot: no backend is chosen and no global figure
    list is touched, so a notebook's own plots keep showing after a run writes its report."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*grid, **kwargs)


def training_curves(records: list[dict[str, Any]], headline: list[str]) -> Any:
    """Training loss per step (with each loss term, when there are several, and the learning
    rate), and the task's headline held-out metrics per step, each with its chance level dotted."""
    train = [r for r in records if "train/loss" in r]
    evals = [r for r in records if any(k.startswith("val/") for k in r)]
    fig, (left, right) = _subplots(1, 2, figsize=(11, 4))
    left.plot([r["step"] for r in train], [r["train/loss"] for r in train], label="total")
    terms = sorted({k for r in train for k in r if k.startswith("train/loss/")})
    for key in terms if len(terms) > 1 else []:  # each weighted term of a sum (mlm, ae)
        points = [(r["step"], r[key]) for r in train if key in r]
        left.plot(*zip(*points), linestyle="--", label=key.removeprefix("train/loss/"))
    left.set_xlabel("step")
    left.set_ylabel("loss")
    left.set_title("training loss")
    if len(terms) > 1:
        left.legend(fontsize=7, loc="upper right")
        if all(r[k] > 0 for r in train for k in terms if k in r):
            left.set_yscale("log")  # terms of different sizes each stay readable
    if train and "lr" in train[0]:
        lr_axis = left.twinx()
        lr_axis.plot([r["step"] for r in train], [r["lr"] for r in train], color="grey", alpha=0.5)
        lr_axis.set_ylabel("learning rate", color="grey")
    keys = [f"val/{name}" for name in headline if any(f"val/{name}" in r for r in evals)]
    for key in keys:
        points = [(r["step"], r[key]) for r in evals if key in r]
        line = right.plot(*zip(*points), marker="o", label=key.removeprefix("val/"))[0]
        chance = evals[-1].get(key.replace("val/", "val/chance/", 1))
        if chance is not None:
            right.axhline(chance, color=line.get_color(), linestyle=":", linewidth=1)
    right.set_xlabel("step")
    right.set_title("held-out metrics (dotted: chance)")
    if keys:
        right.legend(fontsize=7)
    fig.tight_layout()
    return fig


def throughput(records: list[dict[str, Any]]) -> Any:
    """Training speed per logged step: samples/s, read as MFU on the right-hand scale (MFU is
    samples/s times the counted FLOPs per sample over the device's measured matmul rate), and
    below it the share of the time spent waiting for batches (high: the loader holds it back)."""
    import statistics

    logged = [r for r in records if "samples_per_s" in r]
    fig, (ax, wait) = _subplots(2, 1, figsize=(7, 4.4), sharex=True, height_ratios=(3, 1))
    ax.plot([r["step"] for r in logged], [r["samples_per_s"] for r in logged], marker=".")
    ax.set_ylabel("samples/s")
    ax.set_ylim(bottom=0)
    ax.set_title("training speed (since the previous log line)")
    if ratios := [r["mfu"] / r["samples_per_s"] for r in logged if r.get("mfu") and r["samples_per_s"]]:
        percent = 100 * statistics.median(ratios)  # MFU % per sample/s
        right = ax.secondary_yaxis("right", functions=(lambda rate: rate * percent, lambda mfu: mfu / percent))
        right.set_ylabel("MFU (%)")
    waited = [(r["step"], 100 * r["data_share"]) for r in logged if r.get("data_share") is not None]
    wait.plot([step for step, _ in waited], [share for _, share in waited], marker=".", color="tab:orange")
    wait.set_ylim(0, 100)
    wait.set_ylabel("waiting for\nbatches (%)")
    wait.set_xlabel("step")
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
    chosen, seen = [], set()
    for i in range(len(similarity)):
        key = tuple(relevant[i].nonzero().flatten().tolist()[:3])
        if key not in seen:
            seen.add(key)
            chosen.append(i)
        if len(chosen) == rows:
            break
    fig, axes = _subplots(len(chosen), k + 1, figsize=(1.9 * (k + 1), 1.9 * len(chosen)), squeeze=False)
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
    fig, ax = _subplots(figsize=(5, 4.5))
    image = ax.imshow(similarity.numpy(), cmap="viridis")
    ax.set_xlabel(f"{gallery} item")
    ax.set_ylabel(f"{query} item")
    ax.set_title("held-out similarity")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig


def confusion_heatmap(counts: torch.Tensor, class_names: tuple[str, ...]) -> Any:
    """Held-out counts, true class by row and predicted class by column, each row shaded by
    its share so rare classes show as clearly as common ones; names shown up to 30 classes."""
    classes = len(class_names)
    side = min(4 + 0.3 * classes, 14)
    fig, ax = _subplots(figsize=(side + 1, side))
    shares = counts.double() / counts.sum(1, keepdim=True).clamp(min=1)
    image = ax.imshow(shares.numpy(), cmap="Blues", vmin=0, vmax=1)
    if classes <= 30:
        ax.set_xticks(range(classes), [textwrap.shorten(n, 18) for n in class_names], rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(classes), [textwrap.shorten(n, 18) for n in class_names], fontsize=7)
    if classes <= 12:
        for (row, column), count in zip(itertools.product(range(classes), repeat=2), counts.flatten().tolist()):
            ax.text(column, row, str(count), ha="center", va="center", fontsize=7,
                    color="white" if shares[row, column] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix (held-out counts, shaded by row share)")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def roc_curves(curves: dict[str, tuple[torch.Tensor, torch.Tensor, float]]) -> Any:
    """One ROC curve per class or label: name -> (false positive rates, true positive rates, AUROC)."""
    fig, ax = _subplots(figsize=(5.5, 5))
    for name, (fpr, tpr, area) in curves.items():
        ax.plot(fpr.numpy(), tpr.numpy(), label=f"{textwrap.shorten(name, 24)} ({area:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="chance (0.5)")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC curves on held-out data (AUROC)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def class_accuracy_bars(accuracy: dict[str, float]) -> Any:
    """Each class's held-out accuracy as a bar (up to 40 classes, the lowest first)."""
    shown = sorted(accuracy.items(), key=lambda item: item[1])[:40]
    fig, ax = _subplots(figsize=(7, 1.2 + 0.28 * len(shown)))
    ax.barh([textwrap.shorten(name, 28) for name, _ in shown], [value for _, value in shown], color="tab:blue")
    ax.set_xlim(0, 1)
    ax.set_xlabel("accuracy")
    ax.set_title("held-out accuracy per class" + (" (the 40 lowest)" if len(accuracy) > 40 else ""))
    fig.tight_layout()
    return fig


def penalty_sweep(penalties: list[float], scores: list[float], measure: str) -> Any:
    """A probe's validation score for each L2 penalty tried, weakest first, the chosen one marked."""
    order = sorted(range(len(penalties)), key=lambda i: penalties[i])
    values = [scores[i] for i in order]
    best = max(range(len(values)), key=lambda i: (values[i], penalties[order[i]]))
    fig, ax = _subplots(figsize=(6, 3.5))
    ax.plot(range(len(values)), values, marker="o")
    ax.plot([best], [values[best]], marker="*", markersize=14, color="tab:red", linestyle="", label="chosen")
    ax.set_xticks(range(len(values)), [f"{penalties[i]:g}" for i in order])
    ax.set_xlabel("L2 penalty")
    ax.set_ylabel(measure)
    ax.set_title("linear probe: each penalty on a held-out share of the training set", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _picture(ax: Any, values: torch.Tensor, low: float, high: float) -> None:
    """An input tensor [C, H, W] as a picture: RGB for 3 channels, else a heat map (a log-mel
    spectrogram: frequency upwards), scaled from ``low`` to ``high``."""
    scaled = ((values - low) / max(high - low, 1e-8)).clamp(0, 1)
    if len(values) == 3:
        ax.imshow(scaled.permute(1, 2, 0).numpy())
    else:
        ax.imshow(scaled[0].numpy(), cmap="magma", origin="lower", aspect="auto")
    ax.set_xticks([])
    ax.set_yticks([])


def reconstructions(shown: torch.Tensor, reconstructed: torch.Tensor, original: torch.Tensor) -> Any:
    """Per held-out item: what the encoder saw (blanked cells), the decoder's output, the original."""
    rows = len(original)
    fig, axes = _subplots(rows, 3, figsize=(6.5, 2.1 * rows), squeeze=False)
    for i in range(rows):
        low, high = original[i].min().item(), original[i].max().item()
        for ax, values, title in zip(axes[i], (shown[i], reconstructed[i], original[i]),
                                     ("encoder input", "reconstruction", "original")):
            _picture(ax, values, low, high)
            if i == 0:
                ax.set_title(title, fontsize=9)
    fig.suptitle("autoencoder: held-out inputs and their reconstructions", fontsize=10)
    fig.tight_layout()
    return fig


def attention_maps(inputs: list[torch.Tensor], words: list[list[str]], maps: list[torch.Tensor]) -> Any:
    """Per held-out item and word: where in the input [C, H, W] (the part the token grid covers)
    the word attends, its weights on the grid [words, rows, columns] drawn over it."""
    columns = max(len(w) for w in words)
    fig, axes = _subplots(len(inputs), columns, figsize=(1.9 * columns, 2.0 * len(inputs)), squeeze=False)
    for row, (values, names, weights) in enumerate(zip(inputs, words, maps)):
        height, width = values.shape[-2:]  # the part of the input the grid covers
        for column, ax in enumerate(axes[row]):
            if column >= len(names):
                ax.axis("off")
                continue
            _picture(ax, values, values.min().item(), values.max().item())
            picture = len(values) == 3  # else a spectrogram, drawn with its first row at the bottom
            ax.imshow(weights[column].numpy(), cmap="viridis", alpha=0.55, interpolation="nearest",
                      aspect=None if picture else "auto", origin="upper" if picture else "lower",
                      extent=(-0.5, width - 0.5, height - 0.5, -0.5) if picture else (-0.5, width - 0.5, -0.5, height - 0.5))
            ax.set_title(names[column], fontsize=9)
    fig.suptitle("cross-attention: where each word attends (last layer, mean over heads)", fontsize=10)
    fig.tight_layout()
    return fig


def write_report(folder: Path, summary: dict[str, Any], figures: dict[str, Any], notes: Sequence[str] = ()) -> Path:
    """Save each figure as PNG beside report.html, which shows them under the summary (and
    ``notes``, e.g. why a figure is missing)."""
    images = []
    for name, fig in figures.items():
        fig.savefig(folder / f"{name}.png", dpi=100)
        images.append(f'<h2>{html.escape(name.replace("_", " "))}</h2><img src="{name}.png">')
    rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{v:.4g}</td><td>{_chance(summary, k)}</td></tr>"
        for k, v in summary.get("metrics", {}).items()
    )
    page = f"""<!doctype html><html><head><meta charset="utf-8">
<title>mmkit run {html.escape(summary["name"])}</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:2px 12px}}img{{max-width:100%}}</style></head>
<body><h1>Run {html.escape(summary["name"])}</h1>
<p>{html.escape(_what(summary))}</p>{"".join(f"<p>{html.escape(note)}</p>" for note in notes)}
<table><tr><th>held-out metric</th><th>value</th><th>chance</th></tr>{rows}</table>
{"".join(images)}
<h2>summary.json</h2><pre>{html.escape(json.dumps(summary, indent=2))}</pre></body></html>"""
    path = folder / "report.html"
    write_text_atomic(path, page)
    return path


def _what(summary: dict[str, Any]) -> str:
    """The report's first line: what was trained, or which run's weights were evaluated."""
    if "evaluated" in summary:
        what = f"task {summary['task']}: the weights of {summary['evaluated']}, evaluated"
    elif summary.get("fit") and not summary["steps"]:
        what = f"task {summary['task']}, no gradient step"
    else:
        utilisation = f", MFU {summary['mfu']:.1%}" if summary.get("mfu") is not None else ""
        what = (f"task {summary['task']}, {summary['steps']} steps in {summary['train_seconds']:.0f} s "
                f"({summary['samples_per_second']:.1f} samples/s{utilisation})")
        if compiled := summary.get("compile"):
            what += (f"; encoders compiled ({compiled['mode']}): {compiled['graphs']} graphs, "
                     f"{compiled['graph_breaks']} graph breaks, {compiled['cudagraph_skips']} CUDA-graph skips")
        if profiled := summary.get("profile"):
            first, last = profiled["steps"]
            busy = "" if profiled["device_busy"] is None else f", the device busy {profiled['device_busy']:.0%} of it"
            what += (f"; steps {first}-{last} profiled in {profiled['seconds']:.2f} s{busy}, "
                     f"{profiled['waiting_for_batches_seconds']:.2f} s waiting for batches "
                     f"({profiled['folder']}/ops.txt, {profiled['folder']}/trace.json)")
    if fitted := summary.get("fit"):
        chosen = ", ".join(f"{k} {v:.4g}" for k, v in fitted.items() if "/" not in k and k != "seconds")
        what += f"; fitted on the training set in {fitted.get('seconds', 0):.0f} s ({chosen})"
    return what


def _chance(summary: dict[str, Any], key: str) -> str:
    value = summary.get("chance", {}).get(key)
    return "" if value is None else f"{value:.4g}"
