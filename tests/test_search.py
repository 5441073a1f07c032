"""`mmkit embed` and `mmkit search`: files embedded with a finished run's encoders, the rows
nearest a text or a file, and indexes or files that cannot be trusted refused."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from conftest import run_mmkit
from mmkit import build
from mmkit.engine.run import Run
from mmkit.errors import MMKitError
from mmkit.recipe import load_recipe
from mmkit.search import Index, gather, nearest
from mmkit.trained import load_run


def test_files_embedded_with_a_run_are_searched_by_text_and_by_image(tiny_recipe, tmp_path):
    Run(load_recipe(tiny_recipe)).fit()
    run = tmp_path / "runs" / "tiny"
    shapes = build("datasets", "synthetic_shapes", split="val", num_samples=6, image_size=32)
    (tmp_path / "images" / "more").mkdir(parents=True)
    paths = [tmp_path / "images" / ("more" if i > 3 else "") / f"{i}.png" for i in range(6)]
    for path, sample in zip(paths, shapes):
        sample["image"].save(path)
    captions = [sample["text"] for sample in shapes]
    (tmp_path / "captions.txt").write_text("\n".join(captions[:3]) + "\n\n" + "\n".join(captions[3:]) + "\n")

    done = run_mmkit("embed", run, tmp_path / "images", tmp_path / "captions.txt", "--out", tmp_path / "index.st")
    assert done.returncode == 0, done.stderr
    assert f"embedded 6 image, 6 text with {run}" in done.stdout
    trained = load_run(run)
    expected = trained.embed(images=[Image.open(p) for p in sorted(paths)], texts=captions)
    with safe_open(str(tmp_path / "index.st"), "pt") as index:
        for modality in ("image", "text"):
            assert torch.allclose(index.get_tensor(modality), expected[modality], atol=1e-5)

    found = run_mmkit("search", tmp_path / "index.st", captions[0], "-k", "4")
    assert found.returncode == 0, found.stderr
    query = trained.embed(texts=[captions[0]])["text"][0]
    rows = [(f"image  {p}", float(v @ query)) for p, v in zip(sorted(paths), expected["image"])]
    rows += [(f"text   {c}", float(v @ query)) for c, v in zip(captions, expected["text"])]
    best = sorted(rows, key=lambda row: -row[1])[:4]
    lines = found.stdout.splitlines()
    assert [line.split(None, 2)[2] for line in lines] == [name for name, _ in best]
    assert [float(line.split()[1]) for line in lines] == pytest.approx([score for _, score in best], abs=1e-4)
    by_image = run_mmkit("search", tmp_path / "index.st", paths[2], "-k", "1")
    assert by_image.stdout == f"  1  1.0000  image  {paths[2]}\n"  # an image is its own nearest
    typo = run_mmkit("search", tmp_path / "index.st", tmp_path / "images" / "9.png")
    assert typo.returncode == 2 and "9.png: no such image file; to search for these words, add --text" in typo.stderr
    words = run_mmkit("search", tmp_path / "index.st", "9.png", "--text", "-k", "2")
    assert words.returncode == 0 and len(words.stdout.splitlines()) == 2

    (run / "model.safetensors").write_bytes((run / "model.safetensors").read_bytes())  # weights written again
    stale = run_mmkit("search", tmp_path / "index.st", captions[0])
    assert stale.returncode == 2 and "was made with other weights of" in stale.stderr and "embed the files again" in stale.stderr


def test_unreadable_files_stop_embedding_with_their_path_or_are_skipped_and_listed(tmp_path):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "good.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "good.png").read_bytes()[:30])
    with pytest.raises(MMKitError, match=rf"{tmp_path / 'cut.png'}.*--on-error skip leaves such files out"):
        gather([tmp_path])
    items = gather([tmp_path], on_error="skip")
    assert items.names == {"image": [str(tmp_path / "good.png")]} and len(items.skipped) == 1
    (tmp_path / "notes.txt").write_text("a note beside the images\n")  # a folder's .txt files are not walked
    assert gather([tmp_path, tmp_path / "good.png"], on_error="skip").names == {"image": [str(tmp_path / "good.png")]}
    assert gather([tmp_path / "notes.txt"]).names == {"text": ["a note beside the images"]}  # named: its lines
    (tmp_path / "notes.md").write_text("hello")
    with pytest.raises(MMKitError, match="notes.md: not an image, audio or .txt file"):
        gather([tmp_path / "notes.md"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(MMKitError, match="nothing to embed in"):
        gather([tmp_path / "empty"])


def test_a_file_that_is_not_an_index_is_refused_in_one_line(tmp_path):
    from mmkit.search import read_index

    (tmp_path / "notes.st").write_bytes(b"\xff" * 64)
    with pytest.raises(MMKitError, match="notes.st: not an index written by `mmkit embed`"):
        read_index(tmp_path / "notes.st")


def test_nearest_ranks_by_cosine_across_modalities_only_in_a_shared_space():
    vectors = {"image": torch.tensor([[2.0, 0.0], [0.6, 0.8], [0.0, 1.0]]), "text": torch.tensor([[0.8, 0.6]])}
    names = {"image": ["a", "b", "c"], "text": ["t"]}
    query = torch.tensor([3.0, 0.0])
    shared = Index(None, vectors, names, shared=True)
    assert nearest(shared, query, "text", 3) == [("image", "a", pytest.approx(1.0)), ("text", "t", pytest.approx(0.8)),
                                                  ("image", "b", pytest.approx(0.6))]
    assert len(nearest(shared, query, "text", 10)) == 4
    apart = Index(None, vectors, names, shared=False)
    assert [name for _, name, _ in nearest(apart, query, "image", 10)] == ["a", "b", "c"]
    assert nearest(apart, torch.tensor([1.0, 1.0]), "image", 1)[0][2] == pytest.approx(1.4 / math.sqrt(2))
    with pytest.raises(MMKitError, match="a query is compared with rows of its own kind, not audio"):
        nearest(apart, query, "audio", 1)
