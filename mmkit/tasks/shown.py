"""A few held-out items run through a task's model for the report: where each word attends."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch.utils.data import Dataset

from mmkit.encoders.base import Encoded, Encoder, token_ids
from mmkit.fusion.base import Fused
from mmkit.fusion.mlm_ae import IGNORE

SHOWN_ITEMS = 4
SHOWN_WORDS = 5


@contextlib.contextmanager
def in_eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """``module`` in eval mode within the block (no dropout, running norms), then as it was."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def shown_batch(dataset: Dataset, encoders: dict[str, Encoder], device: torch.device) -> dict[str, Any]:
    """The first few raw samples of ``dataset``, preprocessed and batched as the loader would, on ``device``."""
    samples = [dataset[i] for i in range(min(SHOWN_ITEMS, len(dataset)))]
    return {m: encoder.inputs([s[m] for s in samples], device) for m, encoder in encoders.items()}


def attention_figure(encoders: dict[str, Encoder], encoded: dict[str, Encoded], batch: dict[str, Any],
                     fused: Fused) -> dict[str, Any]:
    """Where the first words of each shown text attend in the other modality (the last layer
    of text -> other attention, averaged over heads), drawn over the part of its input the
    token grid covers (shown_positions picks the words); a masked word is shown as written, in
    brackets. {} without such attention."""
    from mmkit.report import attention_maps

    names = sorted((n for n in fused.attention if n.startswith("text->")), key=lambda n: int(n.rsplit("/", 1)[1]))
    other = names[-1].split("->")[1].split("/")[0] if names else None
    if other is None or other == "text" or encoded[other].grid is None:
        return {}
    grid, prefix = encoded[other].grid, encoded[other].prefix
    weights = fused.attention[names[-1]].float().mean(dim=1)[..., prefix:].cpu()  # [B, words, cells]
    ids, real = token_ids(batch["text"])
    targets = batch.get("mlm_targets", torch.full_like(ids, IGNORE))
    masked = targets != IGNORE
    ids = torch.where(masked, targets, ids).cpu()  # the words as written
    text = encoders["text"]
    hidden = {text.pad_id, text.mask_id, *text.special_ids}
    _, height, width = encoders[other].cell or (0, *batch[other].shape[-2:])
    inputs, words, maps = [], [], []
    for i, shown in enumerate(shown_positions(ids, real, hidden)):
        if shown:
            covered = batch.get("ae_target", batch[other])[i, :, : grid[0] * height, : grid[1] * width]
            inputs.append(covered.float().cpu())
            written = text.words([ids[i, t].item() for t in shown])
            words.append([f"[{w}]" if masked[i, t] else w for w, t in zip(written, shown)])
            maps.append(weights[i, shown].reshape(len(shown), *grid))
    return {"attention_maps": attention_maps(inputs, words, maps)} if inputs else {}


def shown_positions(ids: torch.Tensor, real: torch.Tensor, hidden: set[int]) -> list[list[int]]:
    """Per text, the positions of up to SHOWN_WORDS words to draw: real, not special, and those
    that tell it from the other shown texts first (tokens every text has are passed over while
    others remain: "effusion" rather than "frontal chest")."""
    common = set.intersection(*(set(row.tolist()) for row in ids)) if len(ids) > 1 else set()
    chosen = []
    for row, is_real in zip(ids.tolist(), real.tolist()):
        candidates = [t for t, (token, keep) in enumerate(zip(row, is_real)) if keep and token not in hidden]
        chosen.append(([t for t in candidates if row[t] not in common] or candidates)[:SHOWN_WORDS])
    return chosen
