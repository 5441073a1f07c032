import pytest
import torch

from mmkit.metrics import chance_retrieval_metrics, retrieval_metrics


def test_retrieval_metrics_on_a_known_ranking():
    similarity = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.5, 0.1], [0.3, 0.2, 0.1]])
    relevant = torch.eye(3, dtype=torch.bool)
    metrics = retrieval_metrics(similarity, relevant, ks=(1, 2))
    # ranks of the right item: 1, 2, 3
    assert metrics["R@1"] == pytest.approx(1 / 3) and metrics["R@2"] == pytest.approx(2 / 3)
    assert metrics["mean_rank"] == 2.0 and metrics["median_rank"] == 2.0


def test_a_collapsed_model_scores_at_the_bottom():
    relevant = torch.eye(4, dtype=torch.bool)
    for similarity in (torch.zeros(4, 4), torch.full((4, 4), float("nan"))):
        metrics = retrieval_metrics(similarity, relevant, ks=(1,))
        assert metrics["R@1"] == 0.0 and metrics["mean_rank"] == 4.0


def test_any_relevant_item_counts():
    similarity = torch.tensor([[0.1, 0.9, 0.0]])
    relevant = torch.tensor([[True, True, False]])
    assert retrieval_metrics(similarity, relevant, ks=(1,))["R@1"] == 1.0


def test_chance_matches_random_rankings():
    generator = torch.Generator().manual_seed(0)
    groups = torch.randint(0, 7, (60,), generator=generator)
    relevant = groups[:, None] == groups[None, :]
    expected = chance_retrieval_metrics(relevant, ks=(1, 5))
    trials = [retrieval_metrics(torch.rand(60, 60, generator=generator), relevant, ks=(1, 5)) for _ in range(300)]
    for key in ("R@1", "R@5", "mean_rank"):
        measured = sum(t[key] for t in trials) / len(trials)
        assert abs(measured - expected[key]) < 0.05 * max(1.0, expected[key]), key
