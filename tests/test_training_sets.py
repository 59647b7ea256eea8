"""Loaders for class-labelled folders and the RSVQA official split format, the training mixture, derived
captions and the ground-resolution conditioning, on small fixtures written in those formats."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.errors import UserInputError
from engine.model.config import ResolutionConfig
from training.data.derived import EUROSAT_CAPTIONS, presence_object, rsvqa_captions, rsvqa_image_records, with_derived_captions
from training.data.loaders import load_class_folder, load_rsvqa_split, rsvqa_split_prefix
from training.data.records import VQARecord, seen_resolution
from training.data.sets import SET_ID_OFFSETS, load_mixture, scene_index, scene_vocabulary


def _class_folder(root: Path, with_sentences: bool, gsd: float | None = 10.0) -> Path:
    images = []
    for klass in ("Forest", "SeaLake", "Residential"):
        (root / "images" / klass).mkdir(parents=True)
        for i, split in enumerate(("train", "train", "val")):
            name = f"{klass}/{klass}_{i}.jpg"
            Image.fromarray(np.full((64, 64, 3), 40 * i, np.uint8)).save(root / "images" / name)
            item = {"filename": name, "class": klass, "split": split}
            if with_sentences:
                item["sentences"] = [{"raw": f"a picture of {klass.lower()} ."}]
            images.append(item)
    data = {"dataset": root.name, "classes": ["Forest", "SeaLake", "Residential"], "image_size": 64, "images": images}
    if gsd is not None:
        data["ground_resolution_m"] = gsd
    (root / "dataset.json").write_text(json.dumps(data))
    return root


def _rsvqa_folder(root: Path, prefix: str = "LR_") -> Path:
    import rasterio
    from rasterio.transform import from_origin

    (root / "images").mkdir(parents=True)
    for image_id in (1, 2):
        with rasterio.open(root / "images" / f"{image_id}.tif", "w", driver="GTiff", width=32, height=32, count=3,
                           dtype="uint8", crs="EPSG:3857", transform=from_origin(560000, 6860000, 16.3, 16.3)) as dst:
            dst.write(np.full((3, 32, 32), 90, np.uint8))
    for split in ("train", "val"):
        images = [{"id": 1, "active": True, "res_x": "10m", "questions_ids": [10, 11, 12]},
                  {"id": 2, "active": split == "train", "questions_ids": [20]}]
        questions = [
            {"id": 10, "img_id": 1, "type": "presence", "question": "Is there a road?", "active": True},
            {"id": 11, "img_id": 1, "type": "rural_urban", "question": "Is it a rural or an urban area", "active": True},
            {"id": 12, "img_id": 1, "type": "count", "question": "How many buildings are there?", "active": False},
            {"id": 20, "img_id": 2, "type": "presence", "question": "Is a water area present?", "active": True},
        ]
        answers = [{"id": q["id"], "question_id": q["id"], "answer": a, "active": True}
                   for q, a in zip(questions, ("yes", "rural", "3", "no"))]
        for kind, items in (("images", images), ("questions", questions), ("answers", answers)):
            (root / f"{prefix}split_{split}_{kind}.json").write_text(json.dumps({kind: items}))
    return root


def test_class_folder_keeps_images_without_sentences_with_class_and_resolution(tmp_path: Path) -> None:
    records = load_class_folder(_class_folder(tmp_path / "eurosat", with_sentences=False), split="train")
    assert len(records) == 6 and all(r.captions == [] for r in records)
    assert {r.class_name for r in records} == {"Forest", "SeaLake", "Residential"}
    assert all(r.ground_resolution_m == 10.0 and r.width == 64 for r in records)
    aid = load_class_folder(_class_folder(tmp_path / "aid", with_sentences=True, gsd=None), split="val")
    assert [r.captions for r in aid][0] == ["a picture of forest ."] and aid[0].ground_resolution_m is None


def test_class_folder_without_a_class_is_a_clear_error(tmp_path: Path) -> None:
    root = _class_folder(tmp_path / "bad", with_sentences=False)
    data = json.loads((root / "dataset.json").read_text())
    del data["images"][0]["class"]
    (root / "dataset.json").write_text(json.dumps(data))
    with pytest.raises(UserInputError, match="no 'class'"):
        load_class_folder(root)


def test_rsvqa_split_keeps_active_questions_of_active_images(tmp_path: Path) -> None:
    root = _rsvqa_folder(tmp_path / "lr")
    assert rsvqa_split_prefix(root) == "LR_" and rsvqa_split_prefix(tmp_path) is None
    train = load_rsvqa_split(root, "train")
    assert sorted(q.question_id for q in train) == [10, 11, 20]  # 12 is inactive
    val = load_rsvqa_split(root, "val")
    assert [q.question_id for q in val] == [10, 11]  # image 2 is inactive in val
    assert val[0].answer == "yes" and val[0].image == "1.tif" and val[0].ground_resolution_m == 10.0
    assert val[0].dataset == "rsvqa_lr"
    with pytest.raises(UserInputError, match="no split 'test'"):
        load_rsvqa_split(root, "test")


def test_mixture_offsets_ids_per_set_and_the_vocabulary_is_the_union_of_phrases(tmp_path: Path) -> None:
    euro = _class_folder(tmp_path / "eurosat", with_sentences=False)
    aid = _class_folder(tmp_path / "aid", with_sentences=True, gsd=None)
    mix = load_mixture({"eurosat": str(euro), "aid": str(aid), "rsvqa_lr": str(_rsvqa_folder(tmp_path / "lr"))},
                       "train", limits={"eurosat": 3})
    by_set = mix.by_set()
    assert len(by_set["eurosat"]) == 3 and len(by_set["aid"]) == 6
    assert all(r.image_id >= SET_ID_OFFSETS["eurosat"] for r in by_set["eurosat"])
    assert len({r.image_id for r in mix.captions}) == len(mix.captions)
    assert {q.extra["image_id"] for q in mix.questions} == {SET_ID_OFFSETS["rsvqa_lr"] + 1, SET_ID_OFFSETS["rsvqa_lr"] + 2}
    phrases = scene_vocabulary(mix.captions)
    assert phrases == ["forest", "residential area", "sea or lake"]  # one scene per phrase across sets
    assert len(set(scene_index(mix.captions, phrases))) == 3
    with pytest.raises(UserInputError, match="unknown data set"):
        load_mixture({"nwpu": "x"}, "train")


def test_derived_captions_name_only_what_the_answers_say_is_there(tmp_path: Path) -> None:
    def q(text: str, answer: str, kind: str = "presence") -> VQARecord:
        return VQARecord(Path("1.tif"), text, answer, kind, 0, "train")

    assert presence_object("Is a water area present?") == "water area"
    assert presence_object("Is there a small road at the top of a building?") is None
    captions = rsvqa_captions([q("Is there a road?", "yes"), q("Is a water area present?", "no"),
                               q("Is there a farmland?", "yes"), q("Is it a rural or an urban area", "rural", "rural_urban")])
    assert captions[0] == "A rural area with farmland and roads."
    assert all("water" not in c for c in captions) and len(set(captions)) == 3
    assert rsvqa_captions([q("How many roads are there?", "3", "count")]) == []
    records = rsvqa_image_records([VQARecord(p, "Is there a road?", "yes", "presence", 1, "train", image="1.tif",
                                             dataset="rsvqa_lr", extra={"image_id": 7})
                                   for p in [_rsvqa_folder(tmp_path / "lr") / "images" / "1.tif"]], 224)
    assert records[0].image_id == 7 and records[0].width == 32
    assert records[0].ground_resolution_m == pytest.approx(10.0, rel=0.05)  # 16.3 m of EPSG:3857 at 52.4 N


def test_eurosat_records_get_their_class_sentences(tmp_path: Path) -> None:
    record = load_class_folder(_class_folder(tmp_path / "eurosat", with_sentences=False))[0]
    derived = with_derived_captions(record.__class__(**{**record.__dict__, "dataset": "eurosat"}))
    assert derived.captions == list(EUROSAT_CAPTIONS[record.class_name])


def test_resolution_phrase_rounds_to_a_few_steps_and_is_off_by_default() -> None:
    assert seen_resolution(10.0, 64, 224) == pytest.approx(2.857, rel=1e-3)
    assert seen_resolution(None, 64, 224) is None
    config = ResolutionConfig(prompt="Ground resolution: {resolution} per pixel.", min_m=0.3, max_m=12.0)
    assert config.phrase(11.43) == "Ground resolution: about 10 m per pixel. "
    assert config.phrase(0.348) == "Ground resolution: about 0.3 m per pixel. "
    assert config.phrase(None) == "" and ResolutionConfig().phrase(10.0) == ""
    assert config.outside(0.05) == "finer" and config.outside(40.0) == "coarser" and config.outside(5.0) is None


def test_class_derived_questions_state_only_the_facts_of_the_class(tmp_path: Path) -> None:
    """Closed questions follow from the class (a SeaLake tile has water and no river, a Residential tile is urban),
    are the same on every run, and a class without listed facts gets none."""
    from training.answer_head import record_label
    from training.data.class_vqa import CLASS_FACTS, class_key, derive_class_vqa

    records = load_class_folder(_class_folder(tmp_path / "eurosat", with_sentences=False), split="train")
    questions = derive_class_vqa(records, per_image=10)
    assert questions == derive_class_vqa(records, per_image=10)
    assert {q.dataset for q in questions} == {"class-derived VQA"}
    by_class = {}
    for q in questions:
        klass = next(r.class_name for r in records if r.image_path == q.image_path)
        by_class.setdefault(klass, set()).add((q.question_id.rsplit(":", 1)[1], q.answer))
        assert record_label(q) is not None  # every derived question is one the answer head learns
    assert ("water", "yes") in by_class["SeaLake"] and ("river", "no") in by_class["SeaLake"]
    assert ("setting", "urban") in by_class["Residential"] and ("building", "yes") in by_class["Residential"]
    assert by_class["Forest"] == {(k, v) for k, v in CLASS_FACTS["forest"].items()}
    assert class_key("Sea Lake") == class_key("sea_lake") == "sealake"
    unknown = [records[0].__class__(**{**records[0].__dict__, "class_name": "Volcano"})]
    assert derive_class_vqa(unknown) == []
