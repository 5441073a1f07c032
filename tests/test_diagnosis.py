"""synthetic_diagnosis: deterministic, split by patient, reports that agree with the findings
(negations and hedges included), and images that show them."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest

from mmkit import build
from mmkit.data.diagnosis import FINDINGS, SIDES, ZONES, draw_scan

KEYWORD = {"nodule": "nodule", "effusion": "effusion", "consolidation": "onsolidation",
           "cardiomegaly": "eart", "pneumothorax": "pneumothorax"}


def dataset(**params):
    return build("datasets", "synthetic_diagnosis", **{"num_samples": 300, "image_size": 64, **params})


def test_the_same_seed_gives_the_same_studies_and_another_seed_others():
    a, b, c = dataset(num_samples=5), dataset(num_samples=5), dataset(num_samples=5, seed=1)
    for i in range(5):
        assert a[i]["text"] == b[i]["text"] and a[i]["image"].tobytes() == b[i]["image"].tobytes()
    assert any(a[i]["image"].tobytes() != c[i]["image"].tobytes() for i in range(5))
    assert a.info.label_kind == "multi" and a.info.class_names == FINDINGS and "patient" in a.info.keys


def test_a_patient_has_several_studies_and_never_appears_in_two_splits():
    patients = {split: [s["patient"] for s in dataset(split=split, num_samples=120)] for split in ("train", "val", "test")}
    assert not set(patients["train"]) & set(patients["val"]) and not set(patients["val"]) & set(patients["test"])
    assert not set(patients["train"]) & set(patients["test"])
    counts = np.unique(patients["train"], return_counts=True)[1]
    assert counts.max() >= 2 and counts.min() >= 1 and counts.max() <= 3
    ids = [s["id"] for s in dataset(num_samples=120)]
    assert len(set(ids)) == 120
    assert patients["train"] == sorted(patients["train"])  # a patient's studies are consecutive


def test_each_report_states_or_hedges_every_finding_present_and_never_affirms_one_absent():
    hedged = negated = normal = 0
    for sample in dataset():
        report, labels = sample["text"], sample["label"].tolist()
        body, impression = report.split(" Impression: ")
        sentences = body.split(". ")
        for name, present in zip(FINDINGS, labels):
            mentions = [s for s in sentences if KEYWORD[name] in s]
            if present:
                assert mentions and not any(s.startswith("No ") or s.startswith("Heart size is normal") for s in mentions), report
                assert name in impression, report
                hedged += any(s.startswith("Possible") for s in mentions)
            else:
                assert all(s.startswith("No ") or s.startswith("Heart size is normal") for s in mentions), report
                negated += bool(mentions)
                assert name not in impression, report
        if not any(labels):
            assert impression == "no acute cardiopulmonary abnormality.", report
            normal += 1
    assert hedged > 10 and negated > 300 and normal > 50  # every kind of sentence occurs


def test_the_images_show_the_findings():
    data = dataset(num_samples=200)
    pixels = np.stack([np.asarray(s["image"], dtype=np.float32) for s in data])
    labels = np.stack([s["label"].numpy() for s in data]).astype(bool)
    heart = (pixels[:, 36:54, 22:42] > 140).mean(axis=(1, 2))  # the heart's band below the middle
    assert heart[labels[:, 3]].mean() > heart[~labels[:, 3]].mean() + 0.1  # cardiomegaly: a wider heart
    bases = np.maximum(pixels[:, 46:53, 10:27].mean(axis=(1, 2)), pixels[:, 46:53, 37:54].mean(axis=(1, 2)))
    assert bases[labels[:, 1]].mean() > bases[~labels[:, 1]].mean() + 15  # effusion: a brighter lung base
    apices = np.minimum(pixels[:, 12:26, 10:14].mean(axis=(1, 2)), pixels[:, 12:26, 51:55].mean(axis=(1, 2)))
    assert apices[labels[:, 4]].mean() < apices[~labels[:, 4]].mean() - 15  # pneumothorax: a dark apex


def test_every_finding_drawn_shows_none_painted_over_by_another():
    drawn = ("effusion", "pneumothorax", "consolidation", "nodule", "cardiomegaly")
    for side, zone, size, count, *shown in itertools.product(SIDES, ZONES, (0.5, 1.0), (1, 2), *[(None, False, True)] * 4,
                                                             (None, False)):
        findings = {name: {"side": side, "zone": zone, "size": size, "count": count, "faint": faint}
                    for name, faint in zip(drawn, shown) if faint is not None}  # any of them, faint or not, in one place
        scan = lambda shown: np.asarray(draw_scan(np.random.default_rng(1), np.random.default_rng(2), 64, shown),
                                        dtype=np.float32)
        whole = scan(findings)
        for name in findings:
            without = scan({n: where for n, where in findings.items() if n != name})
            assert (np.abs(whole - without) >= 20).sum() >= 3, (name, findings)


def test_the_report_does_not_depend_on_the_image_size():
    assert [s["text"] for s in dataset(num_samples=40, image_size=32)] == [s["text"] for s in dataset(num_samples=40)]


def test_a_hedge_names_the_place_the_finding_is_drawn():
    places = {"effusion": re.compile(r"^Possible (small|moderate) (right|left) pleural effusion$"),
              "pneumothorax": re.compile(r"^Possible (small )?(right|left) apical pneumothorax$"),
              "nodule": re.compile(r"^Possible ((small )?nodule|two nodules) in the (right|left) (upper|middle|lower) zone$"),
              "consolidation": re.compile(r"^Possible consolidation in the (right|left) (upper|middle|lower) zone$")}
    hedges = [s for sample in dataset(num_samples=600) for s in sample["text"].split(". ") if s.startswith("Possible")]
    for name, place in places.items():
        mine = [s for s in hedges if KEYWORD[name] in s]
        assert mine and all(place.match(s) for s in mine), mine


@pytest.mark.parametrize("params", [{"num_samples": 0}, {"image_size": 16}, {"prevalence": 1.5}])
def test_bad_settings_are_refused(params):
    with pytest.raises(ValueError):
        dataset(**params)


@pytest.mark.parametrize("policy, value", [("positive", 1.0), ("negative", 0.0), ("ignore", None)])
def test_a_hedged_finding_takes_the_uncertain_policy(policy, value):
    hedges = 0
    for plain, sample in zip(dataset(num_samples=150), dataset(num_samples=150, uncertain=policy)):
        for index, name in enumerate(FINDINGS):
            is_hedged = any(s.startswith("Possible") and KEYWORD[name] in s for s in sample["text"].split(". "))
            label = sample["label"][index].item()
            if is_hedged:
                hedges += 1
                assert (np.isnan(label) if value is None else label == value), sample["text"]
                assert plain["label"][index].item() == 1.0  # the truth: a faint finding is drawn
            else:
                assert label == plain["label"][index].item()
    assert hedges > 5


# CheXpert / MIMIC-CXR-JPG layout: one row per study, a frontal and a lateral image, findings and
# impression text, one column per finding holding 1, 0, -1 (uncertain) or nothing.
CHEXPERT = """Path,Lateral,Findings,Impression,Cardiomegaly,Edema,split
s1/frontal.png,s1/lateral.png,Heart is enlarged.,Cardiomegaly.,1.0,-1.0,train
s2/frontal.png,,Lungs are clear.,No acute process.,0.0,,train
s3/frontal.png,s3/lateral.png,,Possible edema.,-1.0,1.0,train
s4/frontal.png,,Clear.,Normal.,0.0,0.0,val
"""


@pytest.fixture
def chexpert(tmp_path):
    from PIL import Image

    (tmp_path / "chexpert.csv").write_text(CHEXPERT)
    for study in ("s1", "s2", "s3", "s4"):
        (tmp_path / study).mkdir()
        for view in ("frontal", "lateral"):
            Image.new("L", (8, 8), 100).save(tmp_path / study / f"{view}.png")
    return tmp_path / "chexpert.csv"


def chexpert_manifest(path, **params):
    return build("datasets", "manifest", path=str(path), label_columns=["Cardiomegaly", "Edema"],
                 columns={"image": ["Path", "Lateral"], "text": ["Findings", "Impression"]}, join_text=" ", **params)


@pytest.mark.parametrize("policy, uncertain", [("positive", 1.0), ("negative", 0.0), ("ignore", float("nan"))])
def test_a_chexpert_layout_reads_both_views_the_joined_report_and_the_uncertain_policy(chexpert, policy, uncertain):
    data = chexpert_manifest(chexpert, uncertain=policy)
    samples = [data[i] for i in range(len(data))]
    assert [s["id"] for s in samples] == ["2#Path", "2#Lateral", "3#Path", "4#Path", "4#Lateral"]
    assert samples[0]["text"] == "Heart is enlarged. Cardiomegaly." and samples[3]["text"] == "Possible edema."
    assert samples[0]["image"].size == (8, 8) and data.info.class_names == ("Cardiomegaly", "Edema")
    assert data.info.label_kind == "multi"
    expected = [[1.0, uncertain], [1.0, uncertain], [0.0, 0.0], [uncertain, 1.0], [uncertain, 1.0]]
    for sample, label in zip(samples, expected):
        assert sample["label"].tolist() == pytest.approx(label, nan_ok=True)
    assert chexpert_manifest(chexpert, uncertain=policy, split="val")[0]["label"].tolist() == [0.0, 0.0]


def test_uncertain_findings_without_a_policy_are_refused_naming_the_column_and_line(chexpert):
    from mmkit.errors import MMKitError

    with pytest.raises(MMKitError, match=r"2 uncertain findings \(-1\), the first in row 2, column 'Edema'; set uncertain"):
        chexpert_manifest(chexpert)
    chexpert.write_text(CHEXPERT.replace("-1.0,1.0", "yes,1.0"))
    data = chexpert_manifest(chexpert, uncertain="ignore")
    with pytest.raises(MMKitError, match=r"row 4: bad value: column 'Cardiomegaly' holds 'yes'"):
        data[3]


@pytest.mark.parametrize("params, message", [
    ({"uncertain": "zero"}, "uncertain = 'zero'; use one of 'negative', 'positive', 'ignore'"),
    ({"uncertain": "ignore", "label_columns": None}, "uncertain applies to label_columns"),
    ({"columns": {"image": "Path", "text": "Findings"}, "uncertain": "ignore"}, "join_text joins the text columns"),
])
def test_chest_xray_options_that_do_not_fit_together_are_refused(chexpert, params, message):
    from mmkit.data.manifest import Manifest
    from mmkit.errors import MMKitError

    base = {"path": str(chexpert), "label_columns": ["Cardiomegaly", "Edema"], "join_text": " ",
            "columns": {"image": "Path", "text": ["Findings", "Impression"]}}
    with pytest.raises(MMKitError, match=message):
        Manifest(**{**base, **params})  # from Python: a recipe's type check would catch the first earlier


def test_the_policies_change_the_loss_and_the_metrics_as_stated(chexpert):
    import torch

    from mmkit.metrics.classification import multi_label_metrics
    from mmkit.tasks.classification import masked_bce

    logits = torch.tensor([[2.0, -1.0], [1.0, 0.5], [-2.0, -1.0], [0.0, 1.5], [-0.5, 2.0]])
    labels = {policy: torch.stack([s["label"] for s in chexpert_manifest(chexpert, uncertain=policy)])
              for policy in ("positive", "negative", "ignore")}
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    ignored = labels["ignore"].isnan()
    assert ignored.sum() == 4
    assert masked_bce(logits, labels["ignore"], None) == pytest.approx(
        bce(logits[~ignored], labels["positive"][~ignored]).item())  # the mean over the 6 known entries
    for policy in ("positive", "negative"):
        assert masked_bce(logits, labels[policy], None) == pytest.approx(bce(logits, labels[policy]).item())
    assert masked_bce(logits, labels["positive"], None) != pytest.approx(masked_bce(logits, labels["negative"], None))
    scores, names, half = logits.sigmoid().double(), ("Cardiomegaly", "Edema"), torch.full((2,), 0.5).double()
    metrics = {policy: multi_label_metrics(scores, labels[policy].double(), half, names) for policy in labels}
    # Edema: said present (logit >= 0) in rows 1, 3, 4; uncertain in rows 0 and 1
    assert metrics["positive"]["f1/Edema"] == pytest.approx(2 * 3 / (3 + 4))  # 4 present, 3 of them said
    assert metrics["negative"]["f1/Edema"] == pytest.approx(2 * 2 / (3 + 2))  # 2 present, both said, row 1 a false alarm
    assert metrics["ignore"]["f1/Edema"] == pytest.approx(1.0)  # rows 2-4 only: 2 present, both said, no other
    assert metrics["positive"]["auroc/Edema"] == pytest.approx(3.5 / 4)  # row 0 (logit -1) ties the negative
    assert metrics["ignore"]["auroc/Edema"] == pytest.approx(1.0)
