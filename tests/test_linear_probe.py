"""linear_probe: the fit is scikit-learn's logistic regression, the penalty is chosen on a
held-out share and refitted on everything, separable features are classified perfectly, and a
run (or `mmkit eval` of another task's run) probes frozen weights without a gradient step."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from sklearn.linear_model import LogisticRegression

from conftest import TINY_IMAGE_TEXT, run_mmkit
from mmkit import build, load_run
from mmkit.engine.run import Run
from mmkit.errors import MMKitError
from mmkit.metrics.classification import macro_auroc
from mmkit.recipe import load_recipe
from mmkit.samples import DatasetInfo
from mmkit.tasks.linear_probe import SPLIT_SEED, fit_logistic, holdout_split

SINGLE = DatasetInfo(keys=("id", "image", "label"), class_names=("cat", "dog", "fox"), label_kind="single")
MULTI = DatasetInfo(keys=("id", "image", "label"), class_names=("cat", "dog", "fox"), label_kind="multi")


def tiny_probe(data: DatasetInfo = SINGLE, **params):
    encoder = build("image_encoders", "timm", model_name="test_resnet", image_size=32)
    return build("tasks", "linear_probe", encoders={"image": encoder}, data=data, **params)


def noisy(n: int, dim: int, seed: int, multi_label: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Features whose first dimensions carry the (noisy) class, the rest noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64)
    if multi_label:
        return x, torch.stack([x[:, 0] > 0, x[:, 1] + x[:, 2] > 0.3, x[:, 3] > 0.8], dim=1).long()
    signal = x[:, 0] + 0.7 * torch.randn(n, generator=g, dtype=torch.float64)
    return x, (signal > -0.4).long() + (x[:, 1] > 0.6).long()


@pytest.mark.parametrize("l2", [1e-3, 0.1, 1.0])
def test_the_fit_is_scikit_learns_multinomial_logistic_regression(l2):
    x, y = noisy(60, 5, 0)
    weight, bias = fit_logistic(x, y, 3, l2, multi_label=False, max_iter=500)
    ours = (x @ weight + bias).softmax(dim=1)
    sklearn = LogisticRegression(C=1 / (len(x) * l2), tol=1e-10, max_iter=10_000).fit(x.numpy(), y.numpy())
    assert torch.allclose(ours, torch.tensor(sklearn.predict_proba(x.numpy())), atol=1e-5)


@pytest.mark.parametrize("l2", [1e-2, 1.0])
def test_multi_label_fits_each_label_as_its_own_logistic_regression(l2):
    x, y = noisy(60, 5, 1, multi_label=True)
    weight, bias = fit_logistic(x, y, 3, l2, multi_label=True, max_iter=500)
    ours = (x @ weight + bias).sigmoid()
    for label in range(3):
        sklearn = LogisticRegression(C=1 / (len(x) * l2), tol=1e-10, max_iter=10_000).fit(x.numpy(), y[:, label].numpy())
        assert torch.allclose(ours[:, label], torch.tensor(sklearn.predict_proba(x.numpy())[:, 1]), atol=1e-5)


def test_an_unknown_label_is_left_out_of_that_labels_fit():
    x, y = noisy(60, 5, 4, multi_label=True)
    unknown = torch.rand(60, 3, generator=torch.Generator().manual_seed(5)) < 0.3
    targets = y.double().masked_fill(unknown, float("nan"))
    l2 = 0.05
    weight, bias = fit_logistic(x, targets, 3, l2, multi_label=True, max_iter=500)
    ours = (x @ weight + bias).sigmoid()
    for label in range(3):  # mean loss over all 60 rows, the unknown ones adding nothing: C = 1 / (60 * l2) on the known
        rows = ~unknown[:, label]
        sklearn = LogisticRegression(C=1 / (len(x) * l2), tol=1e-10, max_iter=10_000).fit(
            x[rows].numpy(), y[rows, label].numpy())
        assert torch.allclose(ours[:, label], torch.tensor(sklearn.predict_proba(x.numpy())[:, 1]), atol=1e-5)


def test_the_held_out_share_is_a_fixed_random_fifth_disjoint_from_the_rest():
    rest, held = holdout_split(10, 0.2, seed=0)
    assert len(held) == 2 and len(rest) == 8
    assert sorted(rest.tolist() + held.tolist()) == list(range(10))
    assert torch.equal(held, holdout_split(10, 0.2, seed=0)[1]) and held.tolist() == sorted(held.tolist())
    assert any(not torch.equal(held, holdout_split(10, 0.2, seed=s)[1]) for s in range(1, 5))
    assert [len(part) for part in holdout_split(2, 0.9, seed=0)] == [1, 1]  # each part keeps one item
    assert [len(part) for part in holdout_split(3, 0.01, seed=0)] == [2, 1]


@pytest.mark.parametrize("data", [SINGLE, MULTI], ids=["single", "multi"])
def test_the_penalty_is_chosen_on_the_held_out_share_then_refitted_on_every_sample(data):
    task = tiny_probe(data, l2=[1e-3, 10.0, 0.1])
    multi = data.label_kind == "multi"
    x, y = noisy(90, task.linear.in_features, 2, multi)
    fitted = task.fit({"features": x.float(), "labels": y})

    rest, held = holdout_split(90, 0.2, SPLIT_SEED)
    expected = {}
    for l2 in (10.0, 0.1, 1e-3):
        w, b = fit_logistic(x[rest], y[rest], 3, l2, multi, 500)
        p = x[held] @ w + b
        expected[l2] = macro_auroc(p, y[held].bool()) if multi else (p.argmax(1) == y[held]).double().mean().item()
    best = max(expected, key=lambda l2: (expected[l2], l2))
    measure = "val_auroc_macro" if multi else "val_accuracy"
    assert fitted["l2"] == best and fitted["samples"] == 90
    assert fitted[measure] == pytest.approx(expected[best])
    assert {k: v for k, v in fitted.items() if "/" in k} == pytest.approx({f"{measure}/l2={l2:g}": v for l2, v in expected.items()})
    assert task.l2_scores.tolist() == pytest.approx([expected[10.0], expected[0.1], expected[1e-3]])
    weight, bias = fit_logistic(x, y, 3, best, multi, 500)  # on all 90, not only the fitted share
    assert torch.allclose(task.linear.weight.double(), weight.T, atol=1e-4)
    assert torch.allclose(task.linear.bias.double(), bias, atol=1e-4)


def test_separable_features_are_classified_perfectly_and_a_tie_takes_the_stronger_penalty():
    task = tiny_probe(l2=[1e-4, 1e-2])
    dim = task.linear.in_features

    def clusters(n, seed):
        g = torch.Generator().manual_seed(seed)
        labels = torch.arange(n) % 3
        features = torch.randn(n, dim, generator=g) * 0.05
        features[torch.arange(n), labels] += 3.0
        return features, labels

    fitted = task.fit(dict(zip(("features", "labels"), clusters(60, 0))))
    assert fitted["val_accuracy/l2=0.01"] == fitted["val_accuracy/l2=0.0001"] == 1.0
    assert fitted["l2"] == 1e-2  # both perfect: the stronger penalty
    features, labels = clusters(30, 1)  # held-out items the fit never saw
    with torch.no_grad():
        scores = task.linear(features).softmax(dim=1)
    metrics = task.evaluate({"scores": scores, "labels": labels})
    assert metrics["accuracy"] == 1.0 and metrics["auroc_macro"] == 1.0 and metrics["chance/accuracy"] == pytest.approx(1 / 3)


def test_the_encoder_is_frozen_and_nothing_trains_by_gradient():
    task = tiny_probe()
    assert not any(p.requires_grad for p in task.parameters())
    task.train()
    assert not task.encoders["image"].training  # batch-norm statistics stay as loaded


@pytest.mark.parametrize("params, message", [
    ({"l2": []}, "l2 lists the penalties to try"),
    ({"val_fraction": 1.0}, "val_fraction is a share of the training set"),
])
def test_bad_settings_fail_in_one_line(params, message):
    with pytest.raises(MMKitError, match=message):
        tiny_probe(**params)


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
    """A tiny finished clip_retrieval run whose image tower the probes take."""
    folder = tmp_path_factory.mktemp("clip")
    recipe = folder / "tiny.toml"
    recipe.write_text(textwrap.dedent(TINY_IMAGE_TEXT.format(runs=folder / "runs")))
    Run(load_recipe(recipe, ["train.checkpoint_every=0", "eval.every=0"])).fit()
    return folder / "runs" / "tiny"


def probe_recipe(clip_run, tmp_path, *overrides: str, source: Path | None = None) -> str:
    """The clip run's recipe, image tower only (init_from ``source``, by default the clip run),
    probed on colour labels (with ``overrides``)."""
    recipe = (clip_run / "recipe.toml").read_text()
    path = tmp_path / "probe.toml"
    path.write_text(recipe)
    return load_recipe(path, [f"run.output_dir={tmp_path}", "run.name=probe", "data.label_by=colour",
                              'model={image={name="timm", model_name="test_vit", image_size=32, '
                              f'init_from="{source or clip_run}"}}}}', 'task={name="linear_probe"}', *overrides])


def test_a_probe_run_fits_on_frozen_weights_and_eval_reproduces_it(clip_run, tmp_path):
    summary = Run(probe_recipe(clip_run, tmp_path)).fit()
    run = tmp_path / "probe"
    assert summary["steps"] == 0 and summary["parameters"]["task"]["trainable"] == 0
    assert summary["fit"]["samples"] == 64 and summary["fit"]["l2"] in (1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8)
    assert summary["metrics"]["accuracy"] > summary["chance"]["accuracy"]
    probed, trained = load_file(run / "model.safetensors"), load_file(clip_run / "model.safetensors")
    image = [k for k in trained if k.startswith("encoders.image.")]
    assert image and all(torch.equal(probed[k], trained[k]) for k in image)  # the tower is the clip run's, untouched
    assert (run / "l2_sweep.png").exists() and (run / "confusion_matrix.png").exists()
    assert not (run / "training_curves.png").exists()  # no step, no curve
    assert "fitted on the training set in " in (run / "report.html").read_text()

    done = run_mmkit("eval", run)
    assert done.returncode == 0, done.stderr[-3000:]
    again = json.loads((run / "eval" / "summary.json").read_text())
    assert again["metrics"] == summary["metrics"] and "fit" not in again  # its own classifier, not refitted


def test_a_run_loads_and_evaluates_after_its_init_from_source_is_gone(clip_run, tmp_path):
    source = tmp_path / "copied_clip_run"
    shutil.copytree(clip_run, source)
    summary = Run(probe_recipe(clip_run, tmp_path, source=source)).fit()
    shutil.rmtree(source)  # the run moved to another machine, or its source deleted
    run = tmp_path / "probe"
    loaded = load_run(run)
    scores = loaded.classify(images=[loaded.val_set[i]["image"] for i in range(4)])
    assert scores.shape == (4, len(loaded.class_names))
    again = Run(load_recipe(run / "recipe.toml")).evaluate(run)
    assert again["metrics"] == summary["metrics"]


def test_a_probe_run_refuses_train_profile_before_its_folder_as_it_takes_no_step(clip_run, tmp_path):
    recipe = probe_recipe(clip_run, tmp_path, "train.profile=[1,2]")
    with pytest.raises(MMKitError, match=r"train.profile \[1, 2\]: nothing in the model trains by gradient \(the "
                                         r"task 'linear_probe' takes no optimizer steps\).*remove train.profile"):
        Run(recipe).fit()
    assert not (tmp_path / "probe").exists()


def test_eval_probes_another_tasks_run_as_a_probe_run_of_it_would(clip_run, tmp_path):
    own = Run(probe_recipe(clip_run, tmp_path)).fit()
    done = run_mmkit("eval", clip_run, 'task={name="linear_probe", modality="image"}', "data.label_by=colour")
    assert done.returncode == 0, done.stderr[-3000:]
    folder = sorted(clip_run.glob("eval*"), key=lambda p: p.stat().st_mtime)[-1]
    probed = json.loads((folder / "summary.json").read_text())
    assert probed["metrics"] == own["metrics"] and probed["fit"]["l2"] == own["fit"]["l2"]  # the same features, the same fit
    assert probed["skipped_samples"]["train"]["samples"] == 0 and (folder / "l2_sweep.png").exists()

    other = run_mmkit("eval", clip_run, 'task={name="linear_probe", modality="image"}', "model.image.image_size=64")
    assert other.returncode == 2 and other.stderr.count("\n") == 1
    assert (f"{clip_run / 'model.safetensors'}: model.image: the weights do not fit the model: other shape: "
            "model.pos_embed (1, 5, 64) (the model has (1, 17, 64))") in other.stderr


def test_a_held_out_share_without_a_label_of_both_classes_is_refused():
    task = tiny_probe(MULTI, l2=[1.0, 0.1])
    x, y = noisy(10, task.linear.in_features, 3, multi_label=True)
    y[holdout_split(10, 0.2, SPLIT_SEED)[1]] = 1  # every held-out label present: no AUROC to choose by
    with pytest.raises(MMKitError, match="held-out share .2 of 10 training samples. has no label with both"):
        task.fit({"features": x.float(), "labels": y})


@pytest.mark.parametrize("data, bad, message", [
    (MULTI, -1, "multi-label targets must be 0, 1 or NaN"),
    (SINGLE, 3, r"class indices 0 to 2 \(3 classes\); found 3"),
])
def test_the_fit_refuses_labels_it_cannot_learn(data, bad, message):
    task = tiny_probe(data, l2=[1.0])
    x, y = noisy(20, task.linear.in_features, 3, multi_label=data is MULTI)
    y[0] = bad
    with pytest.raises(MMKitError, match=message):
        task.fit({"features": x.float(), "labels": y})
