"""The answer head: which questions it takes, what its answers read as, its file, its training and its use
by both backends."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.errors import ModelDirError
from engine.model import RSMoEModel
from engine.pipeline import Pipeline
from engine.model.answer_head import (
    ANSWER_HEAD_FILE,
    KIND_LABELS,
    LABELS,
    AnswerHead,
    HeadAnswer,
    answer_text,
    combine_tile_answers,
    question_kind,
    question_tokens,
    built_up_share,
    region_grid,
)
from tests.engine_helpers import tiny_dir  # noqa: F401 - the shared tiny model fixture
from training.answer_head import head_accuracy, record_label, train_answer_head
from training.config import AnswerHeadTraining
from training.data.records import VQARecord
from training.region_classifier import BUILT_UP_SCENES, fit_logistic, urban_threshold, with_fitted_classifier
from training.metrics import normalize_rsvqa_answer, rsvqa_bucket

DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize("question, kind", [
    ("Is there a road?", "yes_no"),
    ("Are there any rivers?", "yes_no"),
    ("Is the number of buildings equal to the number of roads?", "yes_no"),
    ("Is it a rural or an urban area", "rural_urban"),
    ("How many residential buildings are there?", "count"),
    ("What is the amount of roads?", "count"),
    ("What is the area covered by small buildings?", "area"),
    ("What is in the image?", None),
    ("Is it forest or farmland?", None),  # a choice between open words: the experts answer it
    ("Describe the scene.", None),
    ("?!", None),
])
def test_question_kind_from_the_wording(question: str, kind: str | None) -> None:
    assert question_kind(question) == kind


def test_question_tokens_are_singular_words_and_pairs() -> None:
    assert question_tokens("Are there rivers?") == ["are", "there", "river", "are_there", "there_river"]
    assert {"grass", "this"} <= set(question_tokens("Is there grass in this image?"))  # ss, is: not plurals


@pytest.mark.parametrize("kind", ["count", "area"])
def test_every_bucket_answer_reads_back_into_its_bucket(kind: str) -> None:
    """What a user reads for a count or area bucket is scored in that bucket by RSVQA's rules."""
    question_type = kind
    for k, label in enumerate(KIND_LABELS[kind]):
        text = answer_text(label) + "."
        value = float(normalize_rsvqa_answer(text, question_type).removesuffix("m2"))
        assert rsvqa_bucket(value) == k, text
    assert answer_text("area:2") == "between 11 and 100 m2" and answer_text("yes") == "yes"


def _answer(label: str, confidence: float) -> HeadAnswer:
    kind = next(k for k, labels in KIND_LABELS.items() if label in labels)
    return HeadAnswer(answer_text(label), kind, confidence, label)


def test_tile_answers_combine_into_one_answer_for_the_region() -> None:
    """Yes when a tile is sure of yes; rural / urban by majority; counts add up across tiles."""
    sure_yes = combine_tile_answers([_answer("no", 0.9), _answer("yes", 0.8), _answer("yes", 0.95)], 0.6)
    assert (sure_yes.label, sure_yes.confidence) == ("yes", 0.95)
    unsure_yes = combine_tile_answers([_answer("no", 0.9), _answer("yes", 0.55)], 0.6)
    assert unsure_yes.label == "no" and unsure_yes.confidence == pytest.approx(0.45)
    setting = combine_tile_answers([_answer("rural", 0.9), _answer("urban", 0.99), _answer("rural", 0.7)], 0.6)
    assert setting.label == "rural" and setting.confidence == pytest.approx((0.9 + 0.7) / 3)
    counts = combine_tile_answers([_answer("count:1", 0.9)] * 3 + [_answer("count:0", 0.7)], 0.6)
    assert counts.label == "count:2" and counts.text == "between 11 and 100" and counts.confidence == 0.7
    assert combine_tile_answers([_answer("area:0", 0.8)] * 4, 0.6).label == "area:0"


def test_head_leaves_questions_about_unknown_words_to_the_experts() -> None:
    head = _random_head(["is", "there", "a", "river", "how", "many", "building", "are"], width=5)
    assert head.knows("Is there a river?") and head.knows("Is there a river in this picture?")
    assert head.knows("How many buildings are there?")
    assert not head.knows("Is there a desert?")


def _random_head(vocabulary: list[str], width: int, seed: int = 0) -> AnswerHead:
    rng = np.random.default_rng(seed)
    n = len(vocabulary) + width
    return AnswerHead(vocabulary, {"mean": rng.normal(size=n), "std": rng.uniform(0.5, 2, size=n),
                                   "w1": rng.normal(size=(8, n)), "b1": rng.normal(size=8),
                                   "w2": rng.normal(size=(len(LABELS), 8)), "b2": rng.normal(size=len(LABELS))})


def test_head_file_round_trip_and_answers_within_the_kind(tmp_path: Path) -> None:
    head = _random_head(["road", "river", "there"], width=5)
    head.save(tmp_path / ANSWER_HEAD_FILE)
    loaded = AnswerHead.load(tmp_path / ANSWER_HEAD_FILE)
    features = np.random.default_rng(1).normal(size=(4, 8)).astype(np.float32)
    assert loaded.vocabulary == head.vocabulary
    assert np.allclose(loaded.logits(features), head.logits(features))
    np.testing.assert_array_equal(loaded.words(["Is there a river?"]), [[0, 1, 1]])
    kinds = ["yes_no", "rural_urban", "count", "area"]
    for answer, kind in zip(loaded.answer(features, kinds), kinds):
        assert answer.kind == kind and answer.text in {answer_text(label) for label in KIND_LABELS[kind]}
        assert 1 / len(KIND_LABELS[kind]) <= answer.confidence <= 1
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelDirError, match="cannot read the answer head"):
        AnswerHead.load(tmp_path / "bad.safetensors")


def _bright_and_dark_questions(folder: Path) -> list[VQARecord]:
    """Closed questions whose answers follow the image: bright images have a river, 3 buildings and are
    urban; dark ones have none and are rural."""
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    rng = np.random.default_rng(0)
    for i in range(12):
        bright = i % 2 == 0
        base = 200 if bright else 30
        path = folder / f"{i}.png"
        Image.fromarray(np.clip(rng.normal(base, 10, (40, 40, 3)), 0, 255).astype(np.uint8)).save(path)
        for j, (question, qtype, answer) in enumerate([
                ("Is there a river?", "presence", "yes" if bright else "no"),
                ("How many buildings are there?", "count", "3" if bright else "0"),
                ("Is it a rural or an urban area?", "rural_urban", "urban" if bright else "rural")]):
            records.append(VQARecord(path, question, answer, qtype, f"{i}-{j}", "train", path.name, "fixture"))
    return records


def test_trained_head_answers_closed_questions_and_the_experts_the_rest(tiny_dir: Path, tmp_path: Path) -> None:
    """Trained on closed questions, the head answers them from the image (through ``ask_features``, in one
    pass, no decoding); an open question still goes to the experts; the head survives a save and reload;
    answers under ``answer_head.min_confidence`` are marked unsure."""
    model = RSMoEModel.from_pretrained(tiny_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model.set_scene_head(["beach", "forest"], torch.nn.Linear(model.vision.num_features, 2))
    records = _bright_and_dark_questions(tmp_path / "images")
    assert record_label(records[0]) == ("yes_no", LABELS.index("yes"))
    assert record_label(records[1]) == ("count", LABELS.index("count:1"))
    train_answer_head(model, records, AnswerHeadTraining(hidden=16, epochs=80, batch_size=8, dropout=0.0), seed=0)
    assert model.config.answer_head.enabled and "river" in model.answer_head.vocabulary
    assert head_accuracy(model, records) == {"fixture": 1.0}

    visual = model.encode_images(model.preprocess([str(records[0].image_path), str(records[3].image_path)]))
    results = model.ask_features(visual, ["Is there a river?", "Is there a river?"])
    assert [r.text for r in results] == ["Yes.", "No."]
    assert all(r.router == "answer_head" and r.segments == [] and r.answer_confidence > 0.5 for r in results)
    counts = model.ask_features(visual, ["How many buildings are there?", "What is near the river?"])
    assert counts[0].text == "Between 1 and 10." and counts[0].router == "answer_head"
    assert counts[1].router != "answer_head" and counts[1].segments  # the experts answered the open question

    model.save_pretrained(tmp_path / "m")
    loaded = RSMoEModel.from_pretrained(tmp_path / "m")
    assert [r.text for r in loaded.ask_features(visual, ["Is it a rural or an urban area?"] * 2)] == ["Urban.", "Rural."]
    loaded.config.answer_head.min_confidence = 1.01
    (unsure,) = loaded.ask_features(visual[:1], ["Is there a river?"])
    assert unsure.uncertain and unsure.uncertainty[0].startswith("answer unsure")

    # a region seen coarser than the trained range: the closed question is answered on a grid of tiles
    pipeline = Pipeline(loaded, batch_size=4)
    loaded.config.answer_head.min_confidence = 0.6
    seen_whole = 10.0 * 512 / loaded.config.image.image_size  # tests/data/s2_crop512.tif: 512 px at 10 m
    loaded.config.resolution.min_m, loaded.config.resolution.max_m = seen_whole / 20, seen_whole / 4
    tiled = pipeline.ask(str(DATA / "s2_crop512.tif"), "Is there a river?")
    assert tiled.result.router == "answer_head" and tiled.result.text in ("Yes.", "No.")
    assert tiled.result.model_resolution_m == pytest.approx(seen_whole / 6, rel=0.02)  # 6 x 6 tiles (the most)
    assert not any("coarser" in reason for reason in tiled.result.uncertainty)
    whole = pipeline.ask(str(DATA / "s2_crop512.tif"), "What is near the river?")  # open: as one image
    assert whole.result.model_resolution_m == pytest.approx(seen_whole, rel=0.02)
    assert any("coarser" in reason for reason in whole.result.uncertainty)

    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / ANSWER_HEAD_FILE).unlink()
    with pytest.raises(ModelDirError, match="answer_head.safetensors is missing"):
        RSMoEModel.from_pretrained(tmp_path / "m")
    assert config["answer_head"]["enabled"] is True


def test_onnx_backend_gives_the_torch_answers(tiny_dir: Path, tmp_path: Path) -> None:
    """The exported model answers closed questions with the same head, inputs and texts as torch."""
    from engine.backends.onnx import OnnxRSMoE
    from export.exporter import ExportOptions, export_model

    model = RSMoEModel.from_pretrained(tiny_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model.set_scene_head(["beach", "forest"], torch.nn.Linear(model.vision.num_features, 2))
    records = _bright_and_dark_questions(tmp_path / "images")
    train_answer_head(model, records, AnswerHeadTraining(hidden=16, epochs=20, batch_size=8), seed=0)
    model.save_pretrained(tmp_path / "m")
    export_model(tmp_path / "m", options=ExportOptions(variants=["fp32"]))
    onnx_model = OnnxRSMoE.from_model_dir(tmp_path / "m", device="cpu", variant="fp32")
    torch_model = RSMoEModel.from_pretrained(tmp_path / "m")
    images = [str(r.image_path) for r in records[::3][:4]]
    questions = ["Is there a river?", "How many buildings are there?", "Is it a rural or an urban area?",
                 "Is there a river?"]
    expected = torch_model.ask_features(torch_model.encode_images(torch_model.preprocess(images)), questions)
    got = onnx_model.ask_features(onnx_model.encode_images(onnx_model.preprocess(images)), questions)
    assert [r.text for r in got] == [r.text for r in expected]
    assert [r.router for r in got] == ["answer_head"] * 4
    for g, e in zip(got, expected):
        assert g.answer_confidence == pytest.approx(e.answer_confidence, abs=1e-4)
    shutil.rmtree(tmp_path / "m")


# --------------------------------------------------------------------------- the region classifier
def test_built_up_share_and_region_grid() -> None:
    """The share is the mean over tiles of the built-up scenes' summed probability; the grid cuts a region into
    tiles of about the size."""
    probabilities = np.array([[0.6, 0.3, 0.1], [0.1, 0.1, 0.8]])
    assert built_up_share(probabilities, ["forest", "residential area", "industrial area"],
                          ["industrial area", "residential area", "stadium"]) == pytest.approx((0.4 + 0.9) / 2)
    with pytest.raises(ModelDirError, match="knows none"):
        built_up_share(probabilities, ["forest", "beach", "river"], ["industrial area"])
    assert region_grid(2560, 2560, 640, 6) == 4  # an RSVQA-LR tile: 256 px at 10 m
    assert region_grid(5120, 2000, 640, 6) == 6  # the longer side, at most max_grid
    assert region_grid(77, 77, 640, 6) == 1 and region_grid(None, 100, 640, 6) == 1


def test_logistic_fit_minimises_the_penalised_log_loss() -> None:
    """The fit is the optimum of its objective (zero gradient) and separates separable data."""
    rng = np.random.default_rng(0)
    labels = (np.arange(40) % 2).astype(np.float32)
    features = rng.normal(size=(40, 3)).astype(np.float32)
    features[:, 2] += 3 * labels
    weight, bias = fit_logistic(features, labels, c=0.5)
    w = torch.tensor(weight, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(bias, dtype=torch.float64, requires_grad=True)
    x, y = torch.from_numpy(features.astype(np.float64)), torch.from_numpy(labels.astype(np.float64))
    loss = (torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y, reduction="sum")
            + (w * w).sum() / (2 * 0.5))
    loss.backward()
    assert float(w.grad.abs().max()) < 1e-3 and abs(float(b.grad)) < 1e-3
    assert ((features @ weight + bias > 0) == (labels > 0.5)).mean() > 0.9 and np.argmax(np.abs(weight)) == 2


def test_region_classifier_is_urban_above_a_built_up_share_and_survives_the_file(tmp_path: Path) -> None:
    shares = np.array([0.01, 0.02, 0.03, 0.04, 0.2, 0.3, 0.4, 0.5], np.float32)
    labels = (shares > 0.1).astype(np.float32)
    head = with_fitted_classifier(_random_head(["rural", "urban"], width=5), shares, labels, c=10.0)
    assert 0.04 < urban_threshold(head) < 0.2
    assert [head.region_answer(s).label for s in (0.01, 0.5)] == ["rural", "urban"]
    assert head.region_answer(urban_threshold(head)).confidence == pytest.approx(0.5, abs=1e-3)
    assert with_fitted_classifier(head, shares[:3], np.array([1, 0, 0], np.float32)) is None  # too few urban
    head.save(tmp_path / ANSWER_HEAD_FILE)
    loaded = AnswerHead.load(tmp_path / ANSWER_HEAD_FILE)
    assert (loaded.region_tile_m, loaded.region_scenes) == (640.0, list(BUILT_UP_SCENES))
    answer = loaded.region_answer(0.3)
    assert (answer.label, answer.text, answer.kind) == ("urban", "urban", "rural_urban")
    assert answer.confidence == pytest.approx(head.region_answer(0.3).confidence, abs=1e-6)
    with pytest.raises(ModelDirError, match="no region classifier"):
        _random_head(["a"], 5).region_answer(0.3)
    with pytest.raises(ModelDirError, match="incomplete"):
        AnswerHead(["a"], {**head.tensors}, region_tile_m=None)


def test_rural_urban_about_a_large_region_comes_from_its_built_up_share(
        tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``ask`` answers rural / urban about a region of several region tiles with the region classifier (as
    ``rsmoe evaluate`` does for RSVQA); a small or unreferenced image still goes to the answer head."""
    from tests.test_evaluate_sets import write_rsvqa_set
    from engine.cli import main

    model = RSMoEModel.from_pretrained(tiny_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model.set_scene_head(["forest", "residential area"], torch.nn.Linear(model.vision.num_features, 2))
    train_answer_head(model, _bright_and_dark_questions(tmp_path / "images"),
                      AnswerHeadTraining(hidden=16, epochs=20, batch_size=8), seed=0)
    pipeline = Pipeline(model, batch_size=8)
    raster = str(DATA / "s2_crop512.tif")  # 512 px at 10 m: 6 x 6 tiles (the most) of 640 m
    probabilities = pipeline.region_scene_probabilities(raster, 640.0)
    assert probabilities.shape == (36, 2) and np.allclose(probabilities.sum(axis=1), 1.0)
    assert pipeline.region_scene_probabilities(raster, 640.0, window=[0, 0, 80, 80]) is None  # 800 m: one tile
    assert pipeline.region_scene_probabilities(str(DATA / "s2_plain.png"), 640.0) is None  # no resolution
    assert pipeline.region_scene_probabilities(raster, 640.0, window=[0, 0, 90, 90],
                                               ground_resolution_m=100.0) is None  # 9 km in 90 px: tiles too small

    question = "Is it a rural or an urban area?"
    share = built_up_share(probabilities, ["forest", "residential area"], BUILT_UP_SCENES)
    for bias, text in ((4.0, "Urban."), (-4.0, "Rural.")):
        model.answer_head = model.answer_head.with_region_classifier(0.0, bias, 640.0, BUILT_UP_SCENES)
        region = pipeline.ask(raster, question).result
        assert (region.text, region.router) == (text, "answer_head")
        assert region.answer_confidence == pytest.approx(1 / (1 + np.exp(-4.0)), abs=1e-6)
        assert region.model_resolution_m == pytest.approx(10.0 * 512 / 6 / model.config.image.image_size, rel=0.02)
    for margin, text in ((0.01, "Urban."), (-0.01, "Rural.")):  # the threshold just below / above this share
        model.answer_head = model.answer_head.with_region_classifier(1.0, margin - np.log(share + 1e-3), 640.0,
                                                                     BUILT_UP_SCENES)
        assert pipeline.ask(raster, question).result.text == text
    calls: list = []
    monkeypatch.setattr(AnswerHead, "region_answer", lambda self, share: calls.append(share))
    assert pipeline.ask(str(DATA / "s2_plain.png"), question).result.router == "answer_head" and not calls
    monkeypatch.undo()

    data = write_rsvqa_set(tmp_path / "lr", images=3, size=192)  # 1.2-1.9 km: 2 x 2 or 3 x 3 tiles
    for bias, answer in ((4.0, "urban"), (-4.0, "rural")):  # the classifier decides, whatever the head says
        model.answer_head = model.answer_head.with_region_classifier(0.0, bias, 640.0, BUILT_UP_SCENES)
        model.save_pretrained(tmp_path / answer)
        out = tmp_path / f"out-{answer}"
        assert main(["-q", "evaluate", "--model", str(tmp_path / answer), "--data", str(data), "--split", "val",
                     "--out", str(out), "--no-meteor", "--batch-size", "3"]) == 0
        raw = json.loads((out / "answers_raw.json").read_text())
        assert [r["answer"] for r in raw if r["question_type"] == "rural_urban"] == [answer, answer]


def test_a_head_with_region_inputs_sees_the_region_tiles_where_the_region_spans_several(
        tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A head learnt with ``region_inputs`` sees each image's region averaged over 640 m tiles: ``ask`` on a
    large region hands the head the tiles' mean scene probabilities, a small image its own; the flag survives
    the head's file."""
    from engine.model.routing import MoEInference

    model = RSMoEModel.from_pretrained(tiny_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model.set_scene_head(["forest", "residential area"], torch.nn.Linear(model.vision.num_features, 2))
    records = _bright_and_dark_questions(tmp_path / "images")
    head = train_answer_head(model, records, AnswerHeadTraining(hidden=16, epochs=20, batch_size=8,
                                                                region_inputs=True), seed=0)
    assert head.region_inputs and head.region_tile_m == 640.0 and head.region_scenes == []
    head.save(tmp_path / ANSWER_HEAD_FILE)
    assert AnswerHead.load(tmp_path / ANSWER_HEAD_FILE).region_inputs

    visual = model.encode_images(model.preprocess([str(records[0].image_path), str(records[3].image_path)]))
    questions, kinds = ["How many buildings are there?"] * 2, ["count"] * 2
    own = model.region_probabilities(visual, [None, None])
    assert [a.confidence for a in model.head_answers(visual, questions, kinds)] == \
        [a.confidence for a in model.head_answers(visual, questions, kinds, own)]  # None: the image's own
    swapped = model.head_answers(visual, questions, kinds, own[:, ::-1].copy())
    assert [a.confidence for a in swapped] != [a.confidence for a in model.head_answers(visual, questions, kinds)]

    seen: list = []
    original = MoEInference.ask_features

    def spy(self, visual, questions, scene_logits=None, resolutions=None, region_probabilities=None):
        seen.append(region_probabilities)
        return original(self, visual, questions, scene_logits, resolutions, region_probabilities)

    monkeypatch.setattr(MoEInference, "ask_features", spy)
    pipeline = Pipeline(model, batch_size=8)
    raster = str(DATA / "s2_crop512.tif")  # 512 px at 10 m, within the tiny model's range: 6 x 6 tiles
    model.config.resolution.min_m, model.config.resolution.max_m = 0.01, 1e5  # as one image, not coarser
    pipeline.ask(raster, "How many buildings are there?")
    expected = pipeline.region_scene_probabilities(raster, 640.0).mean(axis=0)
    np.testing.assert_allclose(seen[-1], expected[None], rtol=1e-5)
    pipeline.ask(raster, "How many buildings are there?", window=[0, 0, 64, 64])  # 640 m: its own
    assert seen[-1] is None
    assert not head.has_region_classifier  # region inputs alone: rural / urban is the head's, with the region's tiles
    setting = pipeline.ask(raster, "Is it a rural or an urban area?").result
    assert setting.router == "answer_head" and setting.text in ("Rural.", "Urban.")
    np.testing.assert_allclose(seen[-1], expected[None], rtol=1e-5)
