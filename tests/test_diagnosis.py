"""synthetic_diagnosis: deterministic, split by patient, reports that agree with the findings
(negations and hedges included), and images that show them."""

from __future__ import annotations

import numpy as np
import pytest

from mmkit import build
from mmkit.data.diagnosis import FINDINGS

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


@pytest.mark.parametrize("params", [{"num_samples": 0}, {"image_size": 16}, {"prevalence": 1.5}])
def test_bad_settings_are_refused(params):
    with pytest.raises(ValueError):
        dataset(**params)
