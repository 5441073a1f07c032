"""synthetic_diagnosis: scan-like grayscale images, a free-text report written from what is
drawn, and multi-label findings; several studies per patient, no patient in two splits."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from torch.utils.data import Dataset

from mmkit.data.synthetic import SPLIT_STREAMS
from mmkit.samples import UNCERTAIN, DatasetInfo

FINDINGS = ("nodule", "effusion", "consolidation", "cardiomegaly", "pneumothorax")
SIDES = ("right", "left")  # the patient's right is the image's left, as on a frontal radiograph
ZONES = ("upper", "middle", "lower")
NEGATIONS = {"nodule": "No focal nodule.", "effusion": "No pleural effusion.",
             "consolidation": "No consolidation.", "cardiomegaly": "Heart size is normal.",
             "pneumothorax": "No pneumothorax."}
IMPRESSIONS = {"nodule": "pulmonary nodule", "effusion": "pleural effusion", "consolidation": "consolidation",
               "cardiomegaly": "cardiomegaly", "pneumothorax": "pneumothorax"}


class SyntheticDiagnosis(Dataset):
    """Frontal-chest-like grayscale images with a report and findings, for diagnosis experiments.

    Each patient has 1 to 3 studies and a build of their own (body and heart width); each study
    shows any of five findings (nodule, effusion, consolidation, cardiomegaly, pneumothorax),
    each with its side, zone, size and count drawn into the image and written into the report:
    present findings as statements, or hedged ("possible small nodule") when faint; absent ones
    negated ("No pleural effusion.") or left unmentioned; a study without findings reads "No
    acute cardiopulmonary abnormality." ``label`` is the multi-hot findings vector, ``patient``
    the patient id. A hedged finding is uncertain, as a report labeler would mark it (CheXpert's
    -1): ``uncertain`` says what its label holds. Deterministic from the seed; patients are
    numbered per split, so no patient is in two splits.

    Args:
        num_samples: studies in this split.
        split: "train", "val" or "test".
        image_size: side of the square images in pixels; at least 32.
        seed: selects the whole set.
        prevalence: the chance of each finding in a study.
        uncertain: the label of a hedged finding: "positive" (what is drawn: it is there),
            "negative", or "ignore" (NaN: left out of the loss and metrics).
    """

    def __init__(self, num_samples: int = 2000, split: Literal["train", "val", "test"] = "train",
                 image_size: int = 64, seed: int = 0, prevalence: float = 0.2,
                 uncertain: Literal["negative", "positive", "ignore"] = "positive"):
        if num_samples < 1 or image_size < 32 or not 0 <= prevalence <= 1:
            raise ValueError(f"need num_samples >= 1, image_size >= 32 and 0 <= prevalence <= 1, got "
                             f"{num_samples}, {image_size} and {prevalence}")
        self.num_samples, self.split, self.image_size, self.seed = num_samples, split, image_size, seed
        self.prevalence, self.uncertain = prevalence, UNCERTAIN[uncertain]
        self.studies = patient_studies(num_samples, seed, split)
        self.info = DatasetInfo(keys=("id", "image", "text", "label", "patient"), label_kind="multi",
                                class_names=FINDINGS)

    def __len__(self) -> int:
        return self.num_samples

    def stream(self, *key: int) -> np.random.Generator:
        """The random numbers of one part of the set: (1, patient) a build, (2, patient, study)
        the findings, 3 the report's wording, 4 the image's noise."""
        return np.random.default_rng([self.seed, SPLIT_STREAMS[self.split], *key])

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        patient, study = self.studies[index]
        findings = draw_findings(self.stream(2, patient, study), self.prevalence)
        # the noise and the wording draw from streams of their own: the report does not hang on the image size
        image = draw_scan(self.stream(1, patient), self.stream(4, patient, study), self.image_size, findings)
        return {"id": f"{self.split}-{patient:05d}-{study}", "patient": f"{self.split}-{patient:05d}",
                "image": image, "text": write_report(self.stream(3, patient, study), findings),
                "label": torch.tensor([self.uncertain if hedged(name, findings) else float(name in findings)
                                       for name in FINDINGS])}


def hedged(name: str, findings: dict[str, dict[str, Any]]) -> bool:
    """Whether the report hedges a finding ("Possible ..."): a faint one; never cardiomegaly."""
    return name in findings and findings[name]["faint"] and name != "cardiomegaly"


def patient_studies(num_samples: int, seed: int, split: str) -> list[tuple[int, int]]:
    """(patient, study) of each sample: patients in order, each with 1 to 3 studies."""
    studies: list[tuple[int, int]] = []
    patient = 0
    while len(studies) < num_samples:
        count = int(np.random.default_rng([seed, SPLIT_STREAMS[split], 0, patient]).integers(1, 4))
        studies += [(patient, study) for study in range(count)]
        patient += 1
    return studies[:num_samples]


def draw_findings(rng: np.random.Generator, prevalence: float) -> dict[str, dict[str, Any]]:
    """Which findings a study has, each with where and how it shows."""
    findings = {}
    for name in FINDINGS:
        if rng.random() < prevalence:
            findings[name] = {"side": SIDES[int(rng.integers(2))], "zone": ZONES[int(rng.integers(3))],
                              "size": float(rng.uniform(0.5, 1.0)), "count": int(rng.integers(1, 3)),
                              "faint": bool(rng.random() < 0.25)}
    return findings


def lung_box(side: str, size: int) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of one lung field in pixels; the patient's right lung is on the image's left."""
    left = 0.14 if side == "right" else 0.56
    return left * size, 0.16 * size, (left + 0.30) * size, 0.84 * size


def draw_scan(build: np.random.Generator, noise: np.random.Generator, size: int,
              findings: dict[str, dict[str, Any]]) -> Image.Image:
    """The body, two dark lung fields, the heart, then each finding (in DRAWERS' order, so
    none hides another), blurred and noised."""
    image = Image.new("L", (size, size), 15)
    draw = ImageDraw.Draw(image)
    body = float(build.uniform(0.04, 0.08)) * size
    draw.ellipse((body, 0.06 * size, size - body, 1.1 * size), fill=95)
    for side in SIDES:
        draw.ellipse(lung_box(side, size), fill=45)
    heart = (0.34 if "cardiomegaly" in findings else 0.2 + float(build.uniform(0.0, 0.04))) * size
    draw.ellipse((size / 2 - heart / 2 - 0.04 * size, 0.5 * size, size / 2 + heart / 2, 0.86 * size), fill=175)
    for name, drawer in DRAWERS.items():
        if name in findings:
            drawer(draw, size, findings[name])
    pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(size / 96)), dtype=np.float32)
    pixels += noise.normal(0, 6, pixels.shape)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "L")


def zone_centre(size: int, where: dict[str, Any]) -> tuple[float, float]:
    left, top, right, bottom = lung_box(where["side"], size)
    row = (ZONES.index(where["zone"]) + 0.5) / 3
    return (left + right) / 2, top + row * (bottom - top)


def draw_nodule(draw: ImageDraw.ImageDraw, size: int, where: dict[str, Any]) -> None:
    x, y = zone_centre(size, where)
    shade = 120 if where["faint"] else 215
    for i in range(where["count"]):
        radius = (0.025 + 0.025 * where["size"]) * size
        dx = (i - (where["count"] - 1) / 2) * 0.12 * size
        draw.ellipse((x + dx - radius, y - radius, x + dx + radius, y + radius), fill=shade)


def draw_effusion(draw: ImageDraw.ImageDraw, size: int, where: dict[str, Any]) -> None:
    left, top, right, bottom = lung_box(where["side"], size)
    height = (0.12 + 0.18 * where["size"]) * (bottom - top)
    draw.rectangle((left, bottom - height, right, bottom), fill=80 if where["faint"] else 165)


def draw_consolidation(draw: ImageDraw.ImageDraw, size: int, where: dict[str, Any]) -> None:
    x, y = zone_centre(size, where)
    half = (0.06 + 0.06 * where["size"]) * size
    draw.ellipse((x - half, y - half * 0.7, x + half, y + half * 0.7), fill=100 if where["faint"] else 140)


def draw_pneumothorax(draw: ImageDraw.ImageDraw, size: int, where: dict[str, Any]) -> None:
    left, top, right, bottom = lung_box(where["side"], size)
    outer = left if where["side"] == "right" else right
    width = (0.25 + 0.25 * where["size"]) * (right - left)  # air without lung markings at the apex
    box = (outer, top, outer + width, top + 0.45 * (bottom - top)) if where["side"] == "right" else \
        (outer - width, top, outer, top + 0.45 * (bottom - top))
    draw.rectangle(box, fill=28 if where["faint"] else 5)


# In the order drawn, the broad ones first: a nodule drawn before an effusion or consolidation in
# its zone was painted over. Cardiomegaly has none: the heart is drawn wide.
DRAWERS = {"effusion": draw_effusion, "pneumothorax": draw_pneumothorax, "consolidation": draw_consolidation,
           "nodule": draw_nodule}


def describe(name: str, where: dict[str, Any]) -> str:
    """One report sentence for a present finding; hedged when it is faint, naming the same
    place (an effusion lies at the base and a pneumothorax at the apex, whatever their zone)."""
    side, zone = where["side"], where["zone"]
    small = "small " if where["size"] < 0.7 else ""
    statements = {
        "nodule": f"{'Two nodules' if where['count'] == 2 else f'A {small}nodule'} in the {side} {zone} zone.",
        "effusion": f"{small.capitalize() or 'Moderate '}{side} pleural effusion.",
        "consolidation": f"Consolidation in the {side} {zone} zone.",
        "cardiomegaly": "The heart is enlarged (cardiomegaly).",
        "pneumothorax": f"{small.capitalize() or ''}{side} apical pneumothorax.".capitalize(),
    }
    statement = statements[name]
    if not hedged(name, {name: where}):
        return statement
    statement = statement.removeprefix("A ")  # "Possible small nodule ...", not "Possible a small nodule ..."
    return f"Possible {statement[0].lower()}{statement[1:]}"


def write_report(rng: np.random.Generator, findings: dict[str, dict[str, Any]]) -> str:
    """Findings (present ones stated or hedged, absent ones negated or not mentioned), then the impression."""
    sentences = ["Frontal chest radiograph."]
    for name in FINDINGS:
        if name in findings:
            sentences.append(describe(name, findings[name]))
        elif rng.random() < 0.6:
            sentences.append(NEGATIONS[name])
    if findings:
        impression = ", ".join(("possible " if hedged(n, findings) else "") + IMPRESSIONS[n]
                               for n in FINDINGS if n in findings)
    else:
        impression = "no acute cardiopulmonary abnormality"
    return " ".join(sentences) + f" Impression: {impression}."
