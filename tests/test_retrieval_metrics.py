import pytest
import torch

from mmkit.metrics.retrieval import chance_retrieval_metrics, retrieval_metrics


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


def test_chance_is_exact_for_one_match_each():
    chance = chance_retrieval_metrics(torch.eye(4, dtype=torch.bool), ks=(1, 2, 3, 4, 10))
    assert chance == pytest.approx({"R@1": 0.25, "R@2": 0.5, "R@3": 0.75, "R@4": 1.0, "R@10": 1.0,
                                    "mean_rank": 2.5}, abs=1e-12)


def test_chance_is_exact_for_groups_of_matches():
    # items 0-1 share a caption, as do 2-4; item 5 is alone: g = 2, 2, 3, 3, 3, 1 of n = 6.
    group = torch.tensor([0, 0, 1, 1, 1, 2])
    chance = chance_retrieval_metrics(group[:, None] == group[None, :], ks=(1, 2))
    r1 = (2 / 6 * 2 + 3 / 6 * 3 + 1 / 6) / 6
    r2 = (2 * (1 - 4 / 6 * 3 / 5) + 3 * (1 - 3 / 6 * 2 / 5) + (1 - 5 / 6 * 4 / 5)) / 6
    mean_rank = (2 * 7 / 3 + 3 * 7 / 4 + 7 / 2) / 6
    assert chance == pytest.approx({"R@1": r1, "R@2": r2, "mean_rank": mean_rank}, abs=1e-12)


def test_recall_at_k_agrees_with_scikit_learn():
    from sklearn.metrics import top_k_accuracy_score

    generator = torch.Generator().manual_seed(1)
    similarity = torch.rand(40, 40, generator=generator)
    truth = torch.randperm(40, generator=generator)  # query i's one match is item truth[i]
    relevant = torch.zeros(40, 40, dtype=torch.bool)
    relevant[torch.arange(40), truth] = True
    ours = retrieval_metrics(similarity, relevant, ks=(1, 5, 10))
    for k in (1, 5, 10):
        expected = top_k_accuracy_score(truth.numpy(), similarity.numpy(), k=k, labels=list(range(40)))
        assert ours[f"R@{k}"] == pytest.approx(expected, abs=1e-7), k
    ranks = (similarity > similarity[torch.arange(40), truth].unsqueeze(1)).sum(1) + 1
    assert ours["mean_rank"] == pytest.approx(ranks.float().mean().item())


def test_median_rank_of_an_even_count_is_the_midpoint():
    # query 0 finds item 0 first (rank 1); query 1's item 1 is behind item 0 (rank 2): numpy's median is 1.5
    metrics = retrieval_metrics(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.eye(2, dtype=torch.bool))
    assert metrics["mean_rank"] == 1.5 and metrics["median_rank"] == 1.5


@pytest.mark.parametrize("queries, items", [(0, 3), (3, 0), (0, 0)])
def test_nothing_to_rank_gives_no_metrics(queries, items):
    relevant = torch.zeros(queries, items, dtype=torch.bool)
    assert retrieval_metrics(torch.zeros(queries, items), relevant) == {}
    assert chance_retrieval_metrics(relevant) == {}
