"""clip_retrieval's maths on fixed numbers: the loss against open_clip's, the temperature
clamp, the labels under several processes, and which similarity each direction ranks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from torch.utils.data import default_collate

from mmkit import build
from mmkit.errors import MMKitError
from mmkit.tasks.clip_retrieval import both_directions, clamped_scale, contrastive_loss, same_pair


def unit_rows(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_the_loss_is_symmetric_infonce_by_hand():
    # logits s*a@b.T = s*[[1, 0], [0.6, 0.8]]: rows (a -> b) and columns (b -> a) differ.
    a = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    s = 2.0
    a_to_b = (-math.log(math.exp(2) / (math.exp(2) + 1)) - math.log(math.exp(1.6) / (math.exp(1.2) + math.exp(1.6)))) / 2
    b_to_a = (-math.log(math.exp(2) / (math.exp(2) + math.exp(1.2))) - math.log(math.exp(1.6) / (1 + math.exp(1.6)))) / 2
    assert contrastive_loss(a, b, torch.tensor(s)).item() == pytest.approx((a_to_b + b_to_a) / 2, abs=1e-6)


def test_the_loss_equals_open_clips_clip_loss():
    a, b = unit_rows(12, 8, seed=1), unit_rows(12, 8, seed=2)
    for scale in (1.0, 14.3, 100.0):
        ours = contrastive_loss(a, b, torch.tensor(scale))
        assert ours.item() == pytest.approx(ClipLoss()(a, b, torch.tensor(scale)).item(), abs=1e-6)


def tiny_task():
    encoders = {"image": build("image_encoders", "timm", model_name="test_vit", image_size=32),
                "text": build("text_encoders", "transformer", width=32, layers=1, heads=2, context_length=16)}
    task = build("tasks", "clip_retrieval", encoders=encoders, embed_dim=16)
    samples = build("datasets", "synthetic_shapes", num_samples=6, image_size=32)
    batch = {m: e.inputs([samples[i][m] for i in range(6)]) for m, e in encoders.items()}
    return task, batch


@pytest.mark.parametrize("learned, used", [(200.0, 100.0), (100.0, 100.0), (10.0, 10.0)])
def test_a_training_step_uses_the_scale_clamped_at_100(learned, used):
    task, batch = tiny_task()
    with torch.no_grad():
        task.logit_scale.fill_(math.log(learned))
    losses = task.training_step(batch)
    image, text = task.embed(batch, "image"), task.embed(batch, "text")
    expected = ClipLoss()(image, text, torch.tensor(used))
    assert losses["loss/contrastive"].item() == pytest.approx(expected.item(), abs=1e-5)
    assert losses["temperature"].item() == pytest.approx(1 / used, rel=1e-6)
    assert clamped_scale(torch.tensor(math.log(learned))).item() == pytest.approx(used, rel=1e-6)


def test_without_projections_the_encoders_pooled_features_are_the_embeddings():
    encoders = {"image": build("image_encoders", "timm", model_name="test_vit", image_size=32),
                "text": build("text_encoders", "transformer", width=64, layers=1, heads=2, context_length=16)}
    task = build("tasks", "clip_retrieval", encoders=encoders, project=False)
    samples = build("datasets", "synthetic_shapes", num_samples=4, image_size=32)
    batch = {m: e.inputs([samples[i][m] for i in range(4)]) for m, e in encoders.items()}
    for m, encoder in encoders.items():
        expected = F.normalize(encoder(batch[m]).pooled, dim=-1)
        assert torch.allclose(task.embed(batch, m), expected, atol=1e-6)
    assert not any(key.startswith("projections.") for key in task.state_dict())  # open_clip's towers, as they are
    assert task.predict([batch])["image"].shape == (4, 64)
    narrow = {**encoders, "text": build("text_encoders", "transformer", width=32, layers=1, heads=2, context_length=16)}
    with pytest.raises(MMKitError, match="need one width; got image 64, text 32: set task.project = true"):
        build("tasks", "clip_retrieval", encoders=narrow, project=False)


def _rank_loss(rank: int, world: int, init_file: str, a: torch.Tensor, b: torch.Tensor, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    rows = slice(rank * len(a) // world, (rank + 1) * len(a) // world)
    mine_a, mine_b = a[rows].clone().requires_grad_(), b[rows].clone().requires_grad_()
    loss = contrastive_loss(mine_a, mine_b, torch.tensor(10.0))
    loss.backward()
    torch.save({"loss": loss.detach(), "grad_a": mine_a.grad, "grad_b": mine_b.grad}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_each_process_contrasts_its_rows_with_the_global_batch(tmp_path):
    """Two gloo processes, 4 rows each: rank r's labels start at 4r, so its loss is the loss of
    its rows of the global batch, and the mean over ranks (what DDP's averaged gradients
    descend) is the global loss."""
    world, a, b = 2, unit_rows(8, 6, seed=3), unit_rows(8, 6, seed=4)
    mp.spawn(_rank_loss, args=(world, str(tmp_path / "init"), a, b, str(tmp_path / "out")), nprocs=world)
    results = [torch.load(tmp_path / f"out.{rank}", weights_only=True) for rank in range(world)]

    global_a, global_b = a.clone().requires_grad_(), b.clone().requires_grad_()
    global_loss = ClipLoss()(global_a, global_b, torch.tensor(10.0))
    global_loss.backward()
    logits = 10.0 * a @ b.T
    for rank, result in enumerate(results):
        rows = torch.arange(4 * rank, 4 * rank + 4)
        own = (F.cross_entropy(logits[rows], rows) + F.cross_entropy(logits.T[rows], rows)) / 2
        assert result["loss"].item() == pytest.approx(own.item(), abs=1e-6)
        # the gathered copies carry gradients back: each rank's rows get the whole batch's gradient
        assert torch.allclose(result["grad_a"], world * global_a.grad[rows], atol=1e-6)
        assert torch.allclose(result["grad_b"], world * global_b.grad[rows], atol=1e-6)
    assert sum(r["loss"].item() for r in results) / world == pytest.approx(global_loss.item(), abs=1e-6)


def test_each_direction_ranks_its_own_queries():
    # image i . text j = [[1.0, 0.5], [0.9, 0.8]]: image 1's best text is text 0 (a miss),
    # while each text's best image is its own, so image_to_text R@1 = 0.5 and text_to_image R@1 = 1.
    embeddings = {"image": torch.tensor([[1.0, 0.0], [0.9, 0.8]]), "text": torch.tensor([[1.0, 0.0], [0.5, 0.4375]])}
    metrics = both_directions(embeddings, torch.eye(2, dtype=torch.bool), "image", "text")
    assert metrics["image_to_text/R@1"] == 0.5 and metrics["image_to_text/mean_rank"] == 1.5
    assert metrics["text_to_image/R@1"] == 1.0 and metrics["text_to_image/mean_rank"] == 1.0
    assert metrics["chance/image_to_text/R@1"] == metrics["chance/text_to_image/R@1"] == 0.5


def test_rows_of_one_image_are_one_pair_so_a_model_that_matches_them_scores_full_recall():
    # items 0, 1 are image A (a caption per row, as in COCO's CSVs), items 2, 3 image B: the
    # copies of an image tie, and each caption lies nearest its own image
    image = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]), dim=-1)
    text = F.normalize(torch.tensor([[1.0, 0.1], [1.0, -0.1], [0.1, 1.0], [-0.1, 1.0]]), dim=-1)
    outputs = {"image": image, "text": text, "captions": ["a dog", "a brown dog", "a cat", "a grey cat"],
               "files": ["a.jpg", "a.jpg", "b.jpg", "b.jpg"]}
    metrics = both_directions(outputs, same_pair(outputs), "image", "text")
    assert metrics["text_to_image/R@1"] == metrics["image_to_text/R@1"] == 1.0
    assert metrics["chance/text_to_image/R@1"] == 0.5  # 2 of the 4 items are each query's image
    apart = both_directions(outputs, same_pair({**outputs, "files": []}), "image", "text")
    assert apart["text_to_image/R@1"] == 0.0  # without files the copy of its image ties with it: a miss


def test_a_manifests_rows_name_their_files_and_predict_pairs_the_rows_of_one_image(tmp_path):
    from PIL import Image

    from mmkit.data.manifest import Manifest

    for name, colour in (("a.jpg", "red"), ("b.jpg", "blue")):
        Image.new("RGB", (32, 32), colour).save(tmp_path / name)
    (tmp_path / "rows.csv").write_text("image,text\na.jpg,a dog\n./a.jpg,a brown dog\nb.jpg,a cat\n")
    (tmp_path / "wide.csv").write_text("image,c1,c2\na.jpg,a dog,a brown dog\nb.jpg,a cat,\n")
    rows = Manifest(str(tmp_path / "rows.csv"))
    wide = Manifest(str(tmp_path / "wide.csv"), columns={"text": ["c1", "c2"]})
    assert "files" in rows.info.keys and [rows[i]["files"] for i in range(3)] == [str(tmp_path / "a.jpg")] * 2 + [
        str(tmp_path / "b.jpg")]
    assert [wide[i]["files"] for i in range(3)] == [rows[i]["files"] for i in range(3)]

    encoders = {"image": build("image_encoders", "timm", model_name="test_vit", image_size=32),
                "text": build("text_encoders", "transformer", width=64, layers=1, heads=2, context_length=16)}
    task = build("tasks", "clip_retrieval", encoders=encoders).eval()
    samples = [rows[i] for i in range(3)]
    batch = {m: e.inputs([s[m] for s in samples]) for m, e in encoders.items()}
    batch |= {"raw_text": [s["text"] for s in samples], "files": [s["files"] for s in samples]}
    assert same_pair(task.predict([batch])).tolist() == [[True, True, False], [True, True, False],
                                                         [False, False, True]]


def test_without_raw_text_a_caption_is_its_tokens_whatever_the_batchs_longest_text():
    encoders = {"image": build("image_encoders", "timm", model_name="test_vit", image_size=32),
                "text": build("text_encoders", "transformer", width=64, layers=1, heads=2, context_length=16)}
    task = build("tasks", "clip_retrieval", encoders=encoders).eval()
    texts = [["a red circle"], ["a red circle", "a big blue square in the top left corner"]]
    batches = [{"image": torch.rand(len(t), 3, 32, 32), "text": encoders["text"].inputs(t)} for t in texts]
    assert batches[0]["text"].shape[1] < batches[1]["text"].shape[1]  # each batch cut after its longest text
    assert same_pair(task.predict(batches)).tolist() == [[True, True, False], [True, True, False],
                                                        [False, False, True]]
