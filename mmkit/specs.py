"""The recipe tables that are not components: [run], [train] and [eval]."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal


@dataclass(frozen=True)
class RunSpec:
    """Where a run goes and how it is executed.

    Args:
        name: folder name under output_dir; defaults to the recipe file's stem.
        seed: seeds Python, NumPy and torch, and the data order.
        output_dir: parent folder of run folders.
        device: "auto" picks CUDA when available.
        precision: "bf16" and "fp16" use autocast; fp16 needs CUDA.
    """

    name: str = ""
    seed: int = 0
    output_dir: str = "runs"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"

    @property
    def dtype(self) -> Any:
        """The torch dtype of ``precision``: what autocast computes in (float32: no autocast)."""
        return precision_dtype(self.precision)

    def problems(self) -> dict[str, str]:
        """Values of the right type that still cannot work, by key."""
        found = {"seed": "must not be negative"} if self.seed < 0 else {}
        if self.precision == "fp16" and self.device == "cpu":
            found["precision"] = 'fp16 needs CUDA; use "bf16" or "fp32" on the CPU'
        return found


def precision_dtype(precision: str) -> Any:
    """run.precision ("fp32", "bf16", "fp16") as a torch dtype."""
    import torch  # here, so reading a recipe does not load torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


@dataclass(frozen=True)
class TrainSpec:
    """How the task is optimised (AdamW, linear warmup then cosine decay).

    Args:
        epochs: passes over the training set (1 when neither this nor max_steps is set).
        max_steps: optimizer steps to run (0: use epochs). Set one of the two: a recipe
            layer or override that sets one drops the other from the layers below.
        batch_size: samples per micro-batch on each process.
        lr: peak learning rate.
        weight_decay: AdamW decay, applied to matrices only (not biases, norms, scales).
        beta1, beta2, eps: AdamW's moment decays and epsilon (CLIP from scratch is steadier
            with beta2 = 0.98 and eps = 1e-6, as open_clip trains ViTs).
        warmup: optimizer steps of linear warmup.
        grad_accum: micro-batches accumulated per optimizer step (a contrastive task
            contrasts each micro-batch on its own: its negatives are one micro-batch).
        clip_grad: clip the global gradient norm to this value.
        checkpoint_every: save a resumable checkpoint every N steps (0: never).
        keep_checkpoints: how many recent checkpoints to keep.
        log_every: log training metrics every N steps.
        num_workers: DataLoader worker processes.
        compile: torch.compile each encoder for the training steps (the loss and any fusion head
            run eagerly, and so does evaluation): true, or a torch.compile mode
            ("reduce-overhead" replays the encoders' kernels as CUDA graphs on a GPU).
        on_nan: a loss that is not a number stops the run ("raise", at the next log line or
            checkpoint, its update skipped) or skips that update ("skip", counted in summary.json).
        loss_weights: a weight per loss term by name (the task's and its fusion head's, e.g.
            {mlm = 1.0, ae = 0.5}); the optimizer minimises their weighted sum, terms not
            named weigh 1, and each term is logged.
        profile: [first, last] optimizer steps to run under torch.profiler (on the main
            process): the run folder's profile/ops.txt lists the costliest ops on the device
            and the host, profile/trace.json is their timeline (ui.perfetto.dev), and
            summary.json's "profile" says how busy the device was. Pick steps after the
            compile and the loader's start, e.g. [41, 50] (an evaluation or checkpoint
            between them is profiled with them).
    """

    epochs: int | None = None
    max_steps: int | None = None
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    warmup: int = 0
    grad_accum: int = 1
    clip_grad: float | None = None
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    log_every: int = 10
    num_workers: int = 0
    compile: bool | Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = False
    on_nan: Literal["raise", "skip"] = "raise"
    loss_weights: dict[str, float] | None = None
    profile: list[int] | None = None

    def problems(self) -> dict[str, str]:
        """Values of the right type that still cannot work, by key."""
        rules = {
            "must be at least 1": (("batch_size", "grad_accum", "log_every", "keep_checkpoints", "epochs"), 1),
            "must not be negative": (("max_steps", "warmup", "checkpoint_every", "num_workers", "weight_decay"), 0),
        }
        found = {k: message for message, (keys, low) in rules.items() for k in keys
                 if getattr(self, k) is not None and getattr(self, k) < low}
        found |= {k: "must be positive" for k in ("lr", "clip_grad", "eps")
                  if getattr(self, k) is not None and getattr(self, k) <= 0}
        found |= {k: "must be at least 0 and below 1" for k in ("beta1", "beta2") if not 0 <= getattr(self, k) < 1}
        if self.epochs is not None and self.max_steps:
            found.setdefault("max_steps", "set train.epochs or train.max_steps, not both")
        if bad := [k for k, v in (self.loss_weights or {}).items() if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0]:
            found["loss_weights"] = f"weights must be numbers of at least 0 ({', '.join(bad)})"
        if self.profile is not None and not (len(self.profile) == 2 and 1 <= self.profile[0] <= self.profile[1]):
            found["profile"] = "must be [first, last]: two optimizer steps, 1 <= first <= last"
        return dict(sorted(found.items(), key=lambda item: list(vars(self)).index(item[0])))


@dataclass(frozen=True)
class DataSpec:
    """Keys of [data] that mmkit applies to any dataset, beside the dataset's own parameters
    and [data.val].

    Args:
        on_error: a sample that cannot be read (missing or broken file, empty text, unknown
            label) stops the run in one line naming it ("raise"), or is dropped, its batch
            filled from the next sample, and counted and listed in summary.json ("skip").
        example: {name, train, val, params}: a generated dataset written in this dataset's
            format where [data] and [data.val] read, when those files are missing (never
            over existing ones), so a file-based recipe runs as shipped.
    """

    on_error: Literal["raise", "skip"] = "raise"
    example: dict[str, Any] | None = None


DATA_KEYS = ("val", *(f.name for f in fields(DataSpec)))


@dataclass(frozen=True)
class Example:
    """A [data.example] table: which generated dataset to write, and how many samples per split.

    Args:
        name: a generated dataset (e.g. "synthetic_shapes").
        train: samples written for the training split.
        val: samples written for the held-out split ([data.val]).
        params: the generated dataset's own parameters (e.g. {image_size = 64}).
    """

    name: str
    train: int = 1000
    val: int = 200
    params: dict[str, Any] | None = None


@dataclass(frozen=True)
class EvalSpec:
    """When and how the held-out split is evaluated.

    Args:
        every: evaluate every N optimizer steps (0: only at the end).
        batch_size: evaluation batch size; defaults to train.batch_size.
    """

    every: int = 0
    batch_size: int | None = None

    def problems(self) -> dict[str, str]:
        found = {"every": "must not be negative"} if self.every < 0 else {}
        if self.batch_size is not None and self.batch_size < 1:
            found["batch_size"] = "must be at least 1"
        return found


@dataclass(frozen=True)
class PartSpec:
    """Keys every [model.<part>] table accepts beside its component's own: mmkit applies them
    to the built part, the same way for every encoder and fusion head, builtin or plugin.

    Args:
        freeze: true keeps the whole part fixed (and in eval mode, so its norm statistics stay);
            a list of parameter-name globs (["blocks.0.*", "patch_embed.*"]) freezes those.
        lora: {r, alpha, dropout, target_modules} adds LoRA adapters (peft) and trains only
            them in this part; target_modules defaults to every linear layer.
        init_from: a run folder or .safetensors file whose tensors of the same names are
            loaded; {path, prefix} takes only the keys under prefix (a run folder's default
            prefix is the part's place in its task, e.g. "encoders.text.").
        lr_scale: this part's learning rate is train.lr x lr_scale.
    """

    freeze: bool | list[str] = False
    lora: dict[str, Any] | None = None
    init_from: str | dict[str, str] | None = None
    lr_scale: float = 1.0

    def problems(self) -> dict[str, str]:
        """Values of the right type that still cannot work, by key."""
        found = {"lr_scale": "must be positive (freeze = true stops a part training)"} if self.lr_scale <= 0 else {}
        if self.freeze is True and self.lora is not None:
            found["lora"] = "a part with freeze = true trains no adapters; drop one of the two"
        return found


PART_KEYS = tuple(f.name for f in fields(PartSpec))


@dataclass(frozen=True)
class LoraSpec:
    """A [model.<part>.lora] table: low-rank adapters added with peft.

    Args:
        r: rank of the adapters.
        alpha: scaling; the update is (alpha / r) x B A.
        dropout: dropout on the adapters' input.
        target_modules: names (or name suffixes) of the layers to adapt; unset: every linear layer.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | None = None

    def problems(self) -> dict[str, str]:
        """Values of the right type that still cannot work, by key."""
        found = {"r": "must be at least 1"} if self.r < 1 else {}
        if not 0 <= self.dropout < 1:
            found["dropout"] = "must be in [0, 1)"
        return found


@dataclass(frozen=True)
class InitFrom:
    """An init_from table: where the weights are and which of their keys to take.

    Args:
        path: a run folder or a .safetensors file.
        prefix: take the keys under this prefix, without it.
    """

    path: str
    prefix: str | None = None
