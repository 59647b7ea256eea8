"""``rsmoe evaluate`` on every data-set format: detection, the RSVQA answer normaliser and buckets, the
scene-head class predictions, the ground resolution passed to the model, and the output files' shapes.

The data sets are tiny ones written here (generated images; never copies of AID / RSICD / RSVQA files) in the
layouts of ``../shared/data``: a Karpathy caption set with classes (UCM / AID-like), a class-only set
(EuroSAT-like) and an RSVQA folder in the official split format (GeoTIFF tiles in EPSG:3857).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.cli import main
from engine.errors import InputNotFoundError, UserInputError
from engine.model import RSMoEModel
from engine.model.routing import MoEInference
from tests.tiny_models import randomize_adapters, write_tiny_model_dir
from training.evaluate import class_map, detect_set, image_seen_resolution, predict_classes
from training.metrics import normalize_rsvqa_answer, rsvqa_accuracy, rsvqa_answers_match, rsvqa_bucket

CLASSES = ["AnnualCrop", "Forest", "River", "SeaLake"]  # EuroSAT spelling; phrases via class_phrase
HEAD = ["forest", "beach", "river", "annual cropland"]  # a head that lacks "sea or lake"


# --------------------------------------------------------------------------- tiny sets
def _image(path: Path, size: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)


def write_class_set(root: Path, sentences: bool, per_class: int = 2, with_imgid: bool = True) -> Path:
    """A Karpathy/class-labelled set: ``dataset.json`` + ``images/<Class>/<file>.jpg`` (48 px, 10 m)."""
    images = []
    for c, name in enumerate(CLASSES):
        for k in range(per_class * 2):
            rel = f"{name}/{name}_{k}.jpg"
            _image(root / "images" / rel, 48, c * 10 + k)
            item = {"filename": rel, "class": name, "split": "val" if k % 2 else "train"}
            if with_imgid:
                item["imgid"] = 100 + len(images)
            if sentences:
                item["sentences"] = [{"raw": f"a {name.lower()} scene with trees .", "tokens": []},
                                     {"raw": "some green fields and a road .", "tokens": []}]
            images.append(item)
    (root / "dataset.json").write_text(json.dumps(
        {"dataset": root.name, "classes": CLASSES, "ground_resolution_m": 10, "image_size": 48, "images": images}))
    return root


RSVQA_QA = [  # (type, question, answer)
    ("presence", "Is there a building?", "yes"),
    ("comp", "Are there more roads than buildings?", "no"),
    ("count", "How many buildings are there?", "12"),
    ("rural_urban", "Is it a rural or an urban area", "rural"),
    ("area", "What is the area covered by buildings?", "120m2"),
]


def write_rsvqa_set(root: Path, prefix: str = "LR_", images: int = 3, size: int = 40) -> Path:
    """An RSVQA folder: ``<prefix>split_val_{images,questions,answers}.json`` + ``images/<id>.tif`` GeoTIFFs
    (``size`` px a side, EPSG:3857, 10 m nominal); image 11 is inactive; image 12 has no ``res_x`` (its
    resolution comes from the georeferencing); one question is inactive."""
    import rasterio
    from affine import Affine

    (root / "images").mkdir(parents=True)
    image_rows, questions, answers = [], [], []
    qid = 1000
    for img_id in range(10, 10 + images):
        data = np.random.default_rng(img_id).integers(0, 255, (3, size, size), dtype=np.uint8)
        with rasterio.open(root / "images" / f"{img_id}.tif", "w", driver="GTiff", width=size, height=size, count=3,
                           dtype="uint8", crs="EPSG:3857", transform=Affine(10, 0, 600000, 0, -10, 6900000)) as dst:
            dst.write(data)
        row = {"id": img_id, "active": img_id != 11, "questions_ids": []}
        if img_id != 12:
            row["res_x"] = "10m"
        image_rows.append(row)
        for qtype, question, answer in RSVQA_QA:
            questions.append({"id": qid, "img_id": img_id, "type": qtype, "question": question, "active": True})
            answers.append({"id": qid, "question_id": qid, "answer": answer, "active": True})
            row["questions_ids"].append(qid)
            qid += 1
    questions[0]["active"] = False
    for kind, rows in (("images", image_rows), ("questions", questions), ("answers", answers)):
        (root / f"{prefix}split_val_{kind}.json").write_text(json.dumps({kind: rows}))
    return root


# --------------------------------------------------------------------------- tiny models
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model_dir(tmp_path_factory.mktemp("tiny-eval"))


def _with_head(tiny_dir: Path, out: Path, router: bool = False, views: int = 2) -> Path:
    """The tiny model with a scene head over HEAD whose bias favours "beach" (not a class of the sets), then
    "river"; saved with ``scene_views`` views (and trained-looking adapters when ``router``)."""
    model = RSMoEModel.from_pretrained(tiny_dir)
    if router:
        randomize_adapters(model)
    head = torch.nn.Linear(model.vision.num_features, len(HEAD))
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([0.0, 5.0, 1.0, 0.5]))
    model.set_scene_head(HEAD, head)
    model.config.vision.scene_views = views
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def head_dir(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _with_head(tiny_dir, tmp_path_factory.mktemp("head") / "m")


@pytest.fixture(scope="module")
def router_dir(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _with_head(tiny_dir, tmp_path_factory.mktemp("router") / "m", router=True)


def _evaluate(model: Path, data: Path, out: Path, *extra: str) -> int:
    return main(["-q", "evaluate", "--model", str(model), "--data", str(data), "--split", "val", "--out", str(out),
                 "--no-meteor", "--batch-size", "3", *extra])


def _read(path: Path):
    return json.loads(path.read_text())


# --------------------------------------------------------------------------- detection
def test_detect_set_tells_the_formats_apart_and_refuses_unknown_ones(tmp_path: Path) -> None:
    both = detect_set(write_class_set(tmp_path / "aid", sentences=True))
    assert (both.format, both.captions, both.classes) == ("karpathy", True, CLASSES)
    only = detect_set(write_class_set(tmp_path / "eurosat", sentences=False))
    assert (only.format, only.captions, only.classes) == ("karpathy", False, CLASSES)
    assert detect_set(tmp_path / "eurosat" / "dataset.json").root == tmp_path / "eurosat"  # a file works too
    lr = detect_set(write_rsvqa_set(tmp_path / "lr"))
    hr = detect_set(write_rsvqa_set(tmp_path / "hr", prefix="USGS_", images=1))
    assert (lr.format, lr.name, hr.name) == ("rsvqa", "rsvqa_lr", "rsvqa_hr")

    # UCM: a "class" per image and no "classes" list is class-labelled too (classes as spelled in the file)
    ucm = tmp_path / "ucm"
    ucm.mkdir()
    (ucm / "dataset.json").write_text(json.dumps({"dataset": "ucm", "images": [
        {"filename": "1.png", "imgid": 0, "split": "val", "class": "beach", "sentences": [{"raw": "sand ."}]},
        {"filename": "2.png", "imgid": 1, "split": "val", "class": "agricultural", "sentences": [{"raw": "a field ."}]},
    ]}))
    assert detect_set(ucm).classes == ["agricultural", "beach"] and detect_set(ucm).captions

    with pytest.raises(InputNotFoundError, match="data not found"):
        detect_set(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match="not a data set"):
        detect_set(tmp_path / "empty")
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "dataset.json").write_text(json.dumps({"images": [{"filename": "x.jpg", "split": "val"}]}))
    with pytest.raises(UserInputError, match="neither reference sentences nor classes"):
        detect_set(tmp_path / "bare")
    (tmp_path / "bare" / "dataset.json").write_text("[1, 2]")
    with pytest.raises(UserInputError, match="'images' list"):
        detect_set(tmp_path / "bare")


# --------------------------------------------------------------------------- RSVQA answers
@pytest.mark.parametrize("text, qtype, expected", [
    ("Yes, there is.", "presence", "yes"),
    ("yes", "presence", "yes"),
    ("No.", "presence", "no"),
    ("There are no buildings.", "presence", "no"),
    ("There is a road next to the houses.", "presence", "yes"),
    ("green trees", "presence", "no"),  # unparseable: the default
    ("", "comp", "no"),
    ("There are more roads.", "comp", "yes"),
    ("It is an urban area.", "rural_urban", "urban"),
    ("a rural area with farmland", "rural_urban", "rural"),
    ("not urban", "rural_urban", "rural"),
    ("trees", "rural_urban", "rural"),
    ("There are about twelve buildings", "count", "12"),
    ("twenty-three", "count", "23"),
    ("1,200 cars", "count", "1200"),
    ("a hundred and five", "count", "105"),
    ("There is a house.", "count", "1"),
    ("There are none.", "count", "0"),
    ("many", "count", "0"),
    ("3", "count", "3"),
    ("about 120 m2", "area", "120m2"),
    ("120 square metres", "area", "120m2"),
    ("120 square meters", "area", "120m2"),
    ("120m\u00b2", "area", "120m2"),
    ("1351m2", "area", "1351m2"),
    ("2 hectares", "area", "20000m2"),
    ("0.5 km2", "area", "500000m2"),
    ("about 45", "area", "45m2"),
    ("nothing", "area", "0m2"),
    ("0m2", "area", "0m2"),
    ("The Beach.", "scene", "beach"),  # other types: normalize_answer
])
def test_rsvqa_answers_are_normalised_into_the_datasets_vocabulary(text: str, qtype: str, expected: str) -> None:
    assert normalize_rsvqa_answer(text, qtype) == expected
    assert normalize_rsvqa_answer(expected, qtype) == expected  # idempotent: references map to themselves


def test_counts_and_areas_are_scored_in_rsvqa_buckets() -> None:
    assert [rsvqa_bucket(v) for v in (0, 1, 10, 11, 100, 101, 1000, 1001, 1e6)] == [0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert rsvqa_answers_match("There are three buildings.", "10", "count")
    assert not rsvqa_answers_match("There are eleven.", "10", "count")
    assert not rsvqa_answers_match("one", "0", "count")
    assert rsvqa_answers_match("about 900 square metres", "120m2", "area")
    assert not rsvqa_answers_match("0m2", "5m2", "area")
    assert rsvqa_answers_match("Yes, there is.", "yes", "presence")
    assert not rsvqa_answers_match("yes", "no", "comp")

    from training.data.records import VQARecord

    records = [VQARecord(Path("1.tif"), "q", a, t, i, "val") for i, (t, a) in enumerate(
        [("presence", "yes"), ("presence", "no"), ("count", "4"), ("area", "1351m2"), ("rural_urban", "urban")])]
    result = rsvqa_accuracy(records, {0: "Yes.", 1: "Yes.", 2: "7", 3: "2000 m2"})  # question 4 unanswered
    assert result["per_type"] == {"area": 1.0, "count": 1.0, "presence": 0.5, "rural_urban": 0.0}
    assert result["average"] == pytest.approx(2.5 / 4) and result["overall"] == pytest.approx(3 / 5)
    assert result["missing"] == 1 and result["count"] == 5
    with pytest.raises(UserInputError):
        rsvqa_accuracy([], {})


# --------------------------------------------------------------------------- classes and resolution
def test_classes_are_the_argmax_among_the_sets_own_phrases() -> None:
    mapping = class_map(CLASSES, HEAD)
    assert mapping.names == ["AnnualCrop", "Forest", "River"] and mapping.columns == [3, 0, 2]
    assert mapping.missing == ["SeaLake"]
    logits = np.array([[0.0, 9.0, 1.0, 0.5],  # "beach" is best, but no class of the set: river
                       [3.0, 9.0, 1.0, 0.5],  # forest
                       [0.0, 0.0, 0.0, 2.0]])  # annual cropland
    assert predict_classes(logits, mapping) == ["River", "Forest", "AnnualCrop"]
    assert predict_classes(torch.tensor(logits), mapping) == ["River", "Forest", "AnnualCrop"]


def test_seen_resolution_comes_from_the_set_the_file_or_the_georeferencing(tmp_path: Path) -> None:
    _image(tmp_path / "a.jpg", 64, 0)
    assert image_seen_resolution(tmp_path / "a.jpg", 10.0, 64, 224) == pytest.approx(10 * 64 / 224)
    assert image_seen_resolution(tmp_path / "a.jpg", 10.0, None, 32) == pytest.approx(20.0)  # width from the file
    assert image_seen_resolution(tmp_path / "a.jpg", None, 64, 224) is None  # unknown stays unknown
    write_rsvqa_set(tmp_path / "lr", images=3)
    tile = tmp_path / "lr" / "images" / "12.tif"
    assert image_seen_resolution(tile, None, None, 40) is None  # not asked to read the georeferencing
    true_m = 10 * math.cos(math.radians(52.5))  # EPSG:3857's nominal 10 m at about 52.5 N
    assert image_seen_resolution(tile, None, None, 40, from_georeference=True) == pytest.approx(true_m, rel=0.02)


# --------------------------------------------------------------------------- end to end (tiny models)
def test_evaluate_predicts_the_classes_of_a_class_only_set(head_dir: Path, tiny_dir: Path, tmp_path: Path) -> None:
    data = write_class_set(tmp_path / "eurosat", sentences=False, per_class=3)
    out = tmp_path / "out"
    assert _evaluate(head_dir, data, out) == 0
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "predictions.json"]
    predictions = _read(out / "predictions.json")
    dataset = _read(data / "dataset.json")
    val = [i["filename"] for i in dataset["images"] if i["split"] == "val"]
    assert [p["filename"] for p in predictions] == val
    assert all(set(p) == {"filename", "class"} and p["class"] in CLASSES for p in predictions)
    assert {p["class"] for p in predictions} == {"River"}  # the head's best ("beach") is no class of the set
    metrics = _read(out / "metrics.json")
    scene = metrics["scene"]
    assert scene["images"] == metrics["images"] == len(val) == 12
    assert scene["accuracy"] == 0.25 and scene["correct"] == 3 and scene["views"] == 2
    assert scene["unpredictable_classes"] == ["SeaLake"] and scene["per_class"]["River"]["accuracy"] == 1.0
    assert metrics["format"] == "karpathy" and "captions" not in metrics

    limited = tmp_path / "limited"
    assert _evaluate(head_dir, data, limited, "--limit", "4") == 0  # evenly spaced: one image of each class
    assert [p["filename"].split("/")[0] for p in _read(limited / "predictions.json")] == CLASSES

    assert _evaluate(tiny_dir, data, tmp_path / "nohead") == 2  # no scene head: nothing to evaluate
    assert not (tmp_path / "nohead").exists()
    assert _evaluate(head_dir, data, tmp_path / "vqa", "--vqa") == 2  # no captions to derive questions from


def test_evaluate_writes_captions_and_predictions_for_a_set_with_both(
        head_dir: Path, tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = write_class_set(tmp_path / "aid", sentences=True, with_imgid=False)
    seen: list[list] = []
    original = MoEInference.caption_features

    def spy(self, visual, style="detailed", scene_logits=None, resolutions=None):
        seen.append(list(resolutions))
        return original(self, visual, style, scene_logits, resolutions)

    monkeypatch.setattr(MoEInference, "caption_features", spy)
    out = tmp_path / "out"
    assert _evaluate(head_dir, data, out, "--limit", "4") == 0
    assert {"captions.json", "predictions.json", "metrics.json", "scenes.json", "segments.json"} <= {
        p.name for p in out.iterdir()}
    dataset = _read(data / "dataset.json")
    index = {i["filename"]: k for k, i in enumerate(dataset["images"])}  # no imgid: the index in dataset.json
    predictions = _read(out / "predictions.json")
    captions = _read(out / "captions.json")
    assert [c["image_id"] for c in captions] == [index[p["filename"]] for p in predictions]
    assert all(set(c) == {"image_id", "caption"} and isinstance(c["caption"], str) for c in captions)
    metrics = _read(out / "metrics.json")
    assert {"BLEU-4", "CIDEr"} <= set(metrics["captions"]) and metrics["scene"]["images"] == 4
    assert metrics["plan_scene"]["source"] == "none (template router)"
    assert metrics["decoding"] == {"num_beams": 1, "length_penalty": 1.0, "repetition_penalty": 1.0}  # the tiny config
    tiny_size = RSMoEModel.from_pretrained(head_dir).config.image.image_size
    assert [r for batch in seen for r in batch] == pytest.approx([10 * 48 / tiny_size] * 4)

    # a model without a scene head: captions still written, the class error recorded, no predictions
    out = tmp_path / "nohead"
    assert _evaluate(tiny_dir, data, out, "--limit", "2") == 0
    assert (out / "captions.json").is_file() and not (out / "predictions.json").exists()
    scene = _read(out / "metrics.json")["scene"]
    assert scene["accuracy"] is None and "no scene head" in scene["error"]


def test_evaluate_answers_every_active_rsvqa_question_in_its_vocabulary(
        router_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = write_rsvqa_set(tmp_path / "lr", images=4)
    seen: list = []
    original = MoEInference.ask_features

    def spy(self, visual, questions, scene_logits=None, resolutions=None, region_probabilities=None):
        assert scene_logits is not None and len(scene_logits) == len(questions)  # generative router: the head's
        seen.extend(resolutions)
        return original(self, visual, questions, scene_logits, resolutions, region_probabilities)

    monkeypatch.setattr(MoEInference, "ask_features", spy)
    out = tmp_path / "out"
    assert _evaluate(router_dir, data, out) == 0
    answers = _read(out / "answers.json")
    questions = _read(data / "LR_split_val_questions.json")["questions"]
    active = [q["id"] for q in questions if q["active"] and q["img_id"] != 11]  # image 11 is inactive
    assert [a["question_id"] for a in answers] == active and len(active) == 14
    assert all(set(a) == {"question_id", "answer"} for a in answers)
    types = {q["id"]: q["type"] for q in questions}
    vocab = {"presence": {"yes", "no"}, "comp": {"yes", "no"}, "rural_urban": {"rural", "urban"}}
    for a in answers:
        kind = types[a["question_id"]]
        if kind in vocab:
            assert a["answer"] in vocab[kind]
        elif kind == "count":
            assert a["answer"].isdigit()
        else:
            assert a["answer"].endswith("m2") and a["answer"][:-2].isdigit()
    metrics = _read(out / "metrics.json")
    assert metrics["format"] == "rsvqa" and metrics["images"] == 3 and metrics["questions"] == 14
    rsvqa = metrics["rsvqa"]
    assert set(rsvqa["per_type"]) == {"presence", "comp", "count", "rural_urban", "area"}
    assert rsvqa["average"] == pytest.approx(sum(rsvqa["per_type"].values()) / 5) and rsvqa["count"] == 14
    raw = _read(out / "answers_raw.json")
    assert [r["answer"] for r in raw] == [a["answer"] for a in answers] and {"generated", "reference"} <= set(raw[0])
    size = RSMoEModel.from_pretrained(router_dir).config.image.image_size
    true_m = 10 * math.cos(math.radians(52.5))
    expected = {10: 10 * 40 / size, 12: true_m * 40 / size, 13: 10 * 40 / size}  # 12: from the georeferencing
    by_image = [q["img_id"] for q in questions if q["id"] in set(active)]
    assert seen == pytest.approx([expected[i] for i in by_image], rel=0.02)

    limited = tmp_path / "limited"
    assert _evaluate(router_dir, data, limited, "--limit", "1") == 0  # all questions of one image
    ids = [a["question_id"] for a in _read(limited / "answers.json")]
    assert ids == [q["id"] for q in questions if q["img_id"] == 10 and q["active"]]


def write_mosaic_set(root: Path, cells: list[list[str]]) -> Path:
    """A EuroSAT mosaic folder as training writes it: class-labelled, each image with its ``cells``."""
    images = []
    for k, row in enumerate(cells):
        _image(root / "images" / f"val_{k:05d}.png", 64, k)
        images.append({"filename": f"val_{k:05d}.png", "class": row[0], "split": "val", "cells": row})
    (root / "dataset.json").write_text(json.dumps({"dataset": "eurosat_mosaic", "classes": CLASSES,
                                                   "ground_resolution_m": 10, "images": images}))
    return root


def test_evaluate_scores_the_covers_named_on_mosaics_against_their_cells(head_dir: Path, tmp_path: Path) -> None:
    from training.data.mosaics import covers_named, mosaic_covers
    from training.metrics import naming_scores

    cells = [["Forest"] * 4, ["AnnualCrop", "AnnualCrop", "River", "Forest"], ["SeaLake"] * 3 + ["AnnualCrop"]]
    data = write_mosaic_set(tmp_path / "mosaics", cells)
    assert detect_set(data).describe() == "classes + land covers (derived)"
    out = tmp_path / "out"
    assert _evaluate(head_dir, data, out) == 0
    captions = {c["image_id"]: c["caption"] for c in _read(out / "captions.json")}
    assert len(captions) == 3 and (out / "predictions.json").is_file()
    covers = _read(out / "metrics.json")["covers"]
    expected = naming_scores([covers_named(captions[i]) for i in range(3)], [mosaic_covers(c) for c in cells])
    assert covers["references"].startswith("derived") and covers["images"] == 3
    assert {k: covers[k] for k in expected} == expected
    assert covers["mixed"]["images"] == 2 and covers["per_name"]["water"]["shown"] == 2

    cells[0][0] = "Glacier"  # not a EuroSAT class: no land cover to score
    assert _evaluate(head_dir, write_mosaic_set(tmp_path / "bad", cells), tmp_path / "bad-out") == 2


def test_evaluate_refuses_bad_input_with_exit_code_2(head_dir: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    data = write_class_set(tmp_path / "eurosat", sentences=False, per_class=1)
    rsvqa = write_rsvqa_set(tmp_path / "lr", images=1)
    (tmp_path / "other").mkdir()
    capsys.readouterr()
    for bad in ([data, "--split", "test"], [rsvqa, "--split", "test"], [tmp_path / "other"],
                [tmp_path / "missing"], [data, "--limit", "0"]):
        args = ["-q", "evaluate", "--model", str(head_dir), "--data", str(bad[0]), "--out", str(tmp_path / "o"),
                "--split", "val", *[str(b) for b in bad[1:]]]
        assert main(args) == 2, bad
        err = capsys.readouterr().err.strip()
        assert err and len(err.splitlines()) == 1, err  # one actionable line, no traceback
    assert not (tmp_path / "o").exists()
