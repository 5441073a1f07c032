"""Retrieval metrics: recall@k and ranks of the first relevant item, and their chance levels."""

from __future__ import annotations

import torch


def retrieval_metrics(similarity: torch.Tensor, relevant: torch.Tensor,
                      ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k (share of queries with a relevant item in the top k) and mean/median rank
    of the first relevant item (1 is best). ``similarity`` and ``relevant`` are [queries, items].
    Ties count against the model and NaN scores rank last, so a collapsed model scores low.
    Nothing to rank (no query or no item) gives no metrics, as an empty held-out set does."""
    if not similarity.numel():
        return {}
    similarity = similarity.float().nan_to_num(nan=float("-inf"))
    best_relevant = similarity.masked_fill(~relevant, float("-inf")).max(dim=1).values
    ahead = (similarity >= best_relevant.unsqueeze(1)) & ~relevant
    ranks = ahead.sum(dim=1) + 1
    metrics = {f"R@{k}": (ranks <= k).float().mean().item() for k in ks}
    metrics["mean_rank"] = ranks.float().mean().item()
    metrics["median_rank"] = midpoint_median(ranks.double())
    return metrics


def midpoint_median(values: torch.Tensor) -> float:
    """The median as numpy takes it: the mean of the two middle values of an even count
    (torch.median takes the lower one)."""
    ordered = values.sort().values
    return ((ordered[(len(ordered) - 1) // 2] + ordered[len(ordered) // 2]) / 2).item()


def chance_retrieval_metrics(relevant: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """What a random ranking scores on average: for g relevant among n items,
    P(hit in top k) = 1 - prod_{t<k} (n-g-t)/(n-t), and E[first relevant rank] = (n+1)/(g+1).
    No query or no item gives no metrics, as retrieval_metrics."""
    if not relevant.numel():
        return {}
    n = relevant.shape[1]
    g = relevant.sum(dim=1).double()
    metrics = {}
    for k in ks:
        t = torch.arange(min(k, n), dtype=torch.float64)
        miss = ((n - g.unsqueeze(1) - t) / (n - t)).clamp(min=0).prod(dim=1)
        metrics[f"R@{k}"] = (1 - miss).mean().item()
    metrics["mean_rank"] = ((n + 1) / (g + 1)).mean().item()
    return metrics
