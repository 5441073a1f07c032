"""Finished runs in Python (a notebook's view of mmkit): train a recipe, load a run with its
weights and preprocessing, embed or classify new images and texts, compare runs' metrics."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from mmkit.encoders.base import token_ids
from mmkit.errors import MMKitError
from mmkit.recipe import Recipe, load_recipe

if TYPE_CHECKING:
    import pandas

    from mmkit.components import Parts


class Trained:
    """A finished run: its resolved recipe, its task holding the run's weights (on ``device``),
    the encoders' preprocessing, its held-out set and its summary. Built by ``load_run``."""

    def __init__(self, folder: Path, recipe: Recipe, parts: Parts, summary: dict[str, Any], device: torch.device):
        self.folder, self.recipe, self.parts, self.summary, self.device = folder, recipe, parts, summary, device

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def task(self) -> Any:
        return self.parts.task

    @property
    def class_names(self) -> tuple[str, ...]:
        info = getattr(self.task, "info", None)
        return info.class_names if info is not None else ()

    @property
    def metrics(self) -> dict[str, float]:
        """The run's final held-out metrics, as summary.json keeps them."""
        return self.summary.get("metrics", {})

    @property
    def chance(self) -> dict[str, float]:
        """The chance level of each metric that has one."""
        return self.summary.get("chance", {})

    @property
    def val_set(self) -> Any:
        """The recipe's held-out set (raw samples: PIL images, report strings, labels)."""
        return self.parts.val_set

    def batch(self, images: Sequence[Image.Image] | None = None, texts: Sequence[str] | None = None,
              audio: Sequence[Any] | None = None, needed: Sequence[str] | None = None) -> dict[str, Any]:
        """Raw inputs (one of each per item) as one batch on the run's device, through each
        encoder's preprocessing and collate, as the run's loaders do; ``needed`` (by default
        every encoder of the run) names the modalities that must be given."""
        given = {key: list(values) for key, values in (("image", images), ("text", texts), ("audio", audio))
                 if values is not None}
        needed = list(self.parts.encoders if needed is None else needed)
        if missing := [m for m in needed if m not in given]:
            raise MMKitError(f"{self.name}: the run's model reads {', '.join(needed)}; give {', '.join(missing)} too")
        if unknown := [m for m in given if m not in self.parts.encoders]:
            raise MMKitError(f"{self.name}: the run has no {unknown[0]} encoder (it has {', '.join(self.parts.encoders)})")
        used = {m: given[m] for m in needed}
        if len({len(values) for values in used.values()}) != 1 or not next(iter(used.values())):
            raise MMKitError(f"{self.name}: give the same number (at least one) of each input, got "
                             + ", ".join(f"{len(v)} {k}" for k, v in used.items()))
        return self._prepare(used)

    def _prepare(self, given: dict[str, list[Any]]) -> dict[str, Any]:
        from mmkit.data.loader import to_device, transform

        transforms = {m: f for m, f in self.parts.transforms.items() if m in given}
        count = len(next(iter(given.values())))
        collate, on_device = self.parts.batching(self.device)
        batch = collate([transform({m: values[i] for m, values in given.items()}, transforms) for i in range(count)])
        batch.pop("_problems", None)
        return to_device(batch, self.device, on_device)

    def _autocast(self) -> Any:
        """The run's precision, as its evaluation ran under accelerate's autocast."""
        dtype = self.recipe.spec("run").dtype
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32)

    @torch.no_grad()
    def classify(self, images: Sequence[Image.Image] | None = None, texts: Sequence[str] | None = None,
                 audio: Sequence[Any] | None = None, batch_size: int = 64) -> torch.Tensor:
        """[N, classes] scores of new inputs by the run's task: class probabilities (softmax, or
        per finding for multi-label; zero-shot: cosine similarity per class, or a finding's
        probability), as the run's evaluation computed them for its held-out items."""
        if not hasattr(self.task, "scores"):
            raise MMKitError(f"{self.name}: its task ({self.summary.get('task')}) does not classify; "
                             "load a classification, linear_probe or zero_shot run")
        given = {"image": images, "text": texts, "audio": audio}
        count = len(next((given[m] for m in self.task.reads if given[m] is not None), ()))
        cut = lambda values, start: None if values is None else list(values)[start:start + batch_size]  # noqa: E731
        scores = []
        with self._autocast():
            for start in range(0, max(count, 1), batch_size):
                batch = self.batch(cut(images, start), cut(texts, start), cut(audio, start), needed=self.task.reads)
                scores.append(self.task.scores(batch).float().cpu())
        return torch.cat(scores)

    @property
    def shared_space(self) -> bool:
        """Whether the run embeds its modalities in one space (a contrastive run's projections)."""
        return hasattr(self.task, "projections")

    @torch.no_grad()
    def embed(self, images: Sequence[Image.Image] | None = None, texts: Sequence[str] | None = None,
              audio: Sequence[Any] | None = None, batch_size: int = 64) -> dict[str, torch.Tensor]:
        """Each given modality's embeddings: unit vectors in the shared space for a contrastive
        run (clip_retrieval, zero_shot), else the encoder's pooled features."""
        given = {"image": images, "text": texts, "audio": audio}
        out: dict[str, torch.Tensor] = {}
        for modality, values in given.items():
            if values is None:
                continue
            if modality not in self.parts.encoders:
                raise MMKitError(f"{self.name}: the run has no {modality} encoder (it has {', '.join(self.parts.encoders)})")
            if not values:
                raise MMKitError(f"{self.name}: give at least one {modality} input to embed")
            encoder, shared = self.parts.encoders[modality], self.shared_space
            chunks = []
            with self._autocast():
                for start in range(0, len(values), batch_size):
                    batch = self._prepare({modality: list(values)[start:start + batch_size]})
                    chunks.append((self.task.embed(batch, modality) if shared else encoder(batch[modality]).pooled)
                                  .float().cpu())
            out[modality] = torch.cat(chunks)
        return out

    @torch.no_grad()
    def attention(self, image: Image.Image, text: str) -> tuple[list[str], torch.Tensor]:
        """Where each token of ``text`` attends over ``image`` in a run with a cross-attention
        head: the tokens as words, and their weights on the image's token grid [tokens, rows,
        columns] (the last text -> image layer, the mean over heads)."""
        fusion = getattr(self.task, "fusion", None)
        batch = self.batch(images=[image], texts=[text])
        encoded = {m: encoder(batch[m]) for m, encoder in self.parts.encoders.items()}
        attention = fusion(encoded, batch).attention if fusion is not None else {}
        layers = sorted((n for n in attention if n.startswith("text->image/")), key=lambda n: int(n.rsplit("/", 1)[1]))
        if not layers or encoded["image"].grid is None:
            raise MMKitError(f"{self.name}: no text -> image attention over an image grid; load a run whose "
                             "[model.fusion] is cross_attention")
        ids, real = token_ids(batch["text"])[0][0].cpu(), encoded["text"].mask[0].cpu()  # the one text's ids
        weights = attention[layers[-1]].float().mean(dim=1)[0, :, encoded["image"].prefix:].cpu()
        return self.parts.encoders["text"].words(ids[real].tolist()), weights[real].reshape(-1, *encoded["image"].grid)

    def evaluate(self, *overrides: str) -> dict[str, Any]:
        """``mmkit eval`` of this run: its weights judged again on its held-out set, or on what
        the ``overrides`` give (``"data.val.split=test"``); writes <run>/eval and returns its summary."""
        from mmkit.engine.run import Run

        return Run(load_recipe(self.folder / "recipe.toml", overrides)).evaluate(self.folder)

    def __repr__(self) -> str:
        return f"Trained({str(self.folder)!r}, task={self.summary.get('task')!r})"


def load_run(folder: str | Path, device: str = "cpu") -> Trained:
    """A finished run (a folder with recipe.toml, model.safetensors and summary.json) ready to
    use: its recipe's parts built, the run's weights loaded (safetensors), in eval mode."""
    from mmkit.components import build_parts
    from mmkit.engine.checkpoint import load_trained_weights
    from mmkit.plugins import load_plugins

    folder = Path(folder)
    for name in ("recipe.toml", "model.safetensors", "summary.json"):
        if not (folder / name).exists():
            raise MMKitError(f"{folder} has no {name}: load the folder of a finished run (runs/<name>)")
    recipe = load_recipe(folder / "recipe.toml")
    parts = build_parts(recipe, load_plugins().registry, trained=True)
    load_trained_weights(parts.task, folder / "model.safetensors")
    chosen = torch.device(device)
    parts.task.to(chosen).eval()
    return Trained(folder, recipe, parts, json.loads((folder / "summary.json").read_text()), chosen)


def train(recipe: str | Path | Recipe, *overrides: str, device: str = "cpu") -> Trained:
    """Run a recipe (a path with dotted ``overrides``, or a loaded Recipe) to the end, with the
    progress bar Jupyter shows, and return the finished run loaded."""
    from mmkit.engine.run import Run

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    elif overrides:
        raise MMKitError("train: give overrides with a recipe path, or to load_recipe")
    run = Run(recipe)
    run.fit()
    return load_run(run.paths.folder, device)


def metrics_table(runs: Sequence[Trained | str | Path], prefix: str = "") -> pandas.DataFrame:
    """The runs' final metrics side by side (one column per run), the metrics whose names start
    with ``prefix`` (e.g. "auroc/"), with each metric's chance level beside them: one "chance"
    column where the runs agree on it (the same held-out set), else one per run."""
    try:
        import pandas
    except ImportError:
        raise MMKitError("metrics_table needs pandas: pip install 'mmkit[notebook]'") from None

    loaded = [run if isinstance(run, Trained) else _Summary(Path(run)) for run in runs]
    names = list(dict.fromkeys(k for run in loaded for k in run.metrics if k.startswith(prefix)))
    shared = [run.name for run in loaded]
    labels = [str(run.folder) if shared.count(run.name) > 1 else run.name for run in loaded]  # two runs named alike
    table = pandas.DataFrame({label: [run.metrics.get(k) for k in names] for label, run in zip(labels, loaded)},
                             index=names)
    chances = [pandas.Series([run.chance.get(k) for k in names], dtype=float) for run in loaded]
    if all(c.equals(chances[0]) for c in chances):  # NaN equals NaN here
        table["chance"] = chances[0].to_numpy()
    else:
        for label, values in zip(labels, chances):
            table[f"chance ({label})"] = values.to_numpy()
    return table


class _Summary:
    """A run folder's name, metrics and chance levels, read from its summary.json alone."""

    def __init__(self, folder: Path):
        path = folder / "summary.json"
        if not path.exists():
            raise MMKitError(f"{folder} has no summary.json: give the folder of a finished run")
        summary = json.loads(path.read_text())
        self.folder, self.name = folder, folder.name
        self.metrics, self.chance = summary.get("metrics", {}), summary.get("chance", {})

