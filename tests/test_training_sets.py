"""Loaders for class-labelled folders and the RSVQA official split format, the training mixture, derived
captions and the ground-resolution conditioning, on small fixtures written in those formats."""
from __future__ import annotations

import json
import math
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
    carry the image's ground resolution, are the same on every run, and a class without listed facts gets none."""
    from training.answer_head import record_label
    from training.data.class_vqa import CLASS_FACTS, class_key, derive_class_vqa

    records = load_class_folder(_class_folder(tmp_path / "eurosat", with_sentences=False, gsd=10.0), split="train")
    questions = derive_class_vqa(records, per_image=10)
    assert questions == derive_class_vqa(records, per_image=10)
    assert {(q.ground_resolution_m, q.width) for q in questions} == {(10.0, 64)}  # the image's, as its record says
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


# ------------------------------------------------------------------------------------------ EuroSAT mosaics
_MOSAIC_COLOURS = {"AnnualCrop": (200, 150, 100), "Forest": (20, 60, 30), "River": (30, 40, 120)}


def _eurosat_like(root: Path) -> Path:
    """Three EuroSAT classes (one linear), one flat colour each, three patches per split."""
    images = []
    for klass, colour in _MOSAIC_COLOURS.items():
        (root / "images" / klass).mkdir(parents=True)
        for i, split in enumerate(("train",) * 3 + ("val",) * 3):
            name = f"{klass}/{klass}_{i}.jpg"
            Image.fromarray(np.full((64, 64, 3), colour, np.uint8)).save(root / "images" / name, quality=95)
            images.append({"filename": name, "class": klass, "split": split})
    (root / "dataset.json").write_text(json.dumps({"dataset": "eurosat", "classes": list(_MOSAIC_COLOURS),
                                                   "ground_resolution_m": 10, "image_size": 64, "images": images}))
    return root


def test_mosaic_captions_name_the_main_cover_then_the_others_by_area() -> None:
    from training.data.mosaics import main_class, mosaic_captions

    cells = ["AnnualCrop"] * 10 + ["River"] * 4 + ["Forest"] * 2
    assert main_class(cells) == "AnnualCrop"
    assert mosaic_captions(cells) == ["This is a rural area of farmland with a river and a forest.",
                                      "Farmland with a river and a forest.",
                                      "A river and a forest in a rural area of farmland."]
    assert mosaic_captions(["Forest"] * 16) == list(EUROSAT_CAPTIONS["Forest"])
    # crops, pasture and orchards are one cover (farmland), whose area decides the main cover
    mixed = ["Forest"] * 7 + ["Pasture"] * 4 + ["AnnualCrop"] * 3 + ["PermanentCrop"] * 1 + ["HerbaceousVegetation"]
    assert mosaic_captions(mixed)[0] == "This is a rural area of farmland with a forest and grassland."
    assert mosaic_captions(["Pasture"] * 12 + ["AnnualCrop"] * 4)[0] == "This is a rural area of farmland."
    assert mosaic_captions(["Residential"] * 9 + ["Pasture"] * 7)[0] == "This is an urban area of houses with farmland."
    # a linear class is never the main cover, even on a tie
    assert main_class(["River"] * 8 + ["Forest"] * 8) == "Forest"


def test_captions_are_checked_against_the_covers_of_a_mosaics_cells() -> None:
    from training.data.mosaics import COVER_NAMES, COVER_OF_CLASS, COVER_WORDS, covers_named, mosaic_covers

    assert set(COVER_OF_CLASS) == set(COVER_WORDS) and set(COVER_OF_CLASS.values()) == set(COVER_NAMES)
    assert mosaic_covers(["Pasture", "AnnualCrop", "River", "SeaLake", "Forest"]) == {"farmland", "water", "forest"}
    assert covers_named("This is a rural area of farmland with a river and a forest.") == {
        "farmland", "water", "forest"}
    assert covers_named("Many green trees and some buildings are near a seaside road .") == {
        "forest", "built-up", "road"}  # "seaside" is not the sea
    assert covers_named("Herbaceous vegetation cover the area.") == {"grassland"}
    assert covers_named("A bare desert.") == set()


def test_a_patchwork_is_themed_by_all_its_covers_and_a_pure_mosaic_by_its_class() -> None:
    """The theme expert learns a mosaic of several covers as the sentence naming them all (it had learnt to stop
    after the main cover, "This is an annual cropland."); the other experts draw on the other sentences."""
    from training.data.mosaics import MOSAIC_SET, mosaic_captions
    from training.data.records import CaptionRecord
    from training.data.subtasks import targets_for_record

    def record(cells: list[str]) -> CaptionRecord:
        return CaptionRecord(0, Path("m.png"), "train", cells[0], mosaic_captions(cells), MOSAIC_SET, parts=cells)

    patchwork = targets_for_record(record(["AnnualCrop"] * 10 + ["River"] * 4 + ["Forest"] * 2))
    assert patchwork.theme == "This is a rural area of farmland with a river and a forest."
    assert patchwork.sources["theme"] == 0
    assert patchwork.theme not in (patchwork.objects, patchwork.relations)
    assert {patchwork.sources["objects"], patchwork.sources["relations"]} <= {1, 2, None}
    assert targets_for_record(record(["Forest"] * 16)).theme in EUROSAT_CAPTIONS["Forest"]


def test_mosaics_lay_their_cells_patches_out_at_the_sentinel2_tile_scale(tmp_path: Path) -> None:
    from training.data.mosaics import FINE_GRID, GRID, load_mosaics, write_mosaics

    eurosat = _eurosat_like(tmp_path / "eurosat")
    out = write_mosaics(eurosat, tmp_path / "mosaics", {"train": 12, "val": 4}, seed=3)
    cells = {i["filename"]: i["cells"] for i in json.loads((out / "dataset.json").read_text())["images"]}
    records = load_mosaics(out, "train")
    assert len(records) == 12 and len(load_mosaics(out, "val")) == 4
    assert {r.dataset for r in records} == {"eurosat_mosaic"}
    assert any(len(set(c)) == 1 for c in cells.values()) and any(len(set(c)) > 1 for c in cells.values())
    # whole patches (4 x 4, pure mosaics among them) and fine patchworks of crops (8 x 8, no river in them)
    assert {len(c) for c in cells.values()} == {GRID * GRID, FINE_GRID * FINE_GRID}
    assert all("River" not in c for c in cells.values() if len(c) == FINE_GRID ** 2)
    for r in records:
        image = np.asarray(Image.open(r.image_path).convert("RGB")).astype(int)
        assert image.shape == (256, 256, 3) and r.width == 256 and r.ground_resolution_m == 10
        layout = cells[r.filename]
        grid = math.isqrt(len(layout))
        side = 256 // grid
        for index, klass in enumerate(layout):  # every cell holds a patch (or a crop) of its class
            row, col = divmod(index, grid)
            cell = image[row * side:(row + 1) * side, col * side:(col + 1) * side].reshape(-1, 3).mean(axis=0)
            assert np.abs(cell - _MOSAIC_COLOURS[klass]).max() < 6, (r.filename, index, klass)
        assert r.class_name == min(set(layout), key=lambda k: (-layout.count(k), k == "River", k))
        if len(set(layout)) > 1:
            words = {"AnnualCrop": "farmland", "Forest": "forest", "River": "river"}
            assert all(all(words[k] in c.lower() for k in set(layout)) for c in r.captions)
    assert seen_resolution(records[0].ground_resolution_m, records[0].width, 224) == pytest.approx(11.43, abs=0.01)
    # the same request keeps the folder; another rewrites it
    stamp = (out / "dataset.json").stat().st_mtime_ns
    write_mosaics(eurosat, out, {"train": 12, "val": 4}, seed=3)
    assert (out / "dataset.json").stat().st_mtime_ns == stamp
    write_mosaics(eurosat, out, {"train": 5, "val": 4}, seed=3)
    assert len(load_mosaics(out, "train")) == 5
    with pytest.raises(UserInputError, match="no test patches"):
        write_mosaics(eurosat, tmp_path / "other", {"test": 2})
    rivers = tmp_path / "rivers"
    (rivers / "images").mkdir(parents=True)
    (eurosat / "images" / "River").rename(rivers / "images" / "River")
    index = json.loads((eurosat / "dataset.json").read_text())
    index["images"] = [i for i in index["images"] if i["class"] == "River"]
    (rivers / "dataset.json").write_text(json.dumps(index))
    with pytest.raises(UserInputError, match="two classes or more"):
        write_mosaics(rivers, tmp_path / "other", {"train": 2})
    # in the mixture: ids offset like every set's
    mix = load_mixture({"eurosat_mosaic": str(out)}, "val")
    assert sorted(r.image_id for r in mix.captions) == [SET_ID_OFFSETS["eurosat_mosaic"] + i for i in range(5, 9)]


def test_recipe_mosaics_need_eurosat_and_counts_per_split() -> None:
    from training.config import TrainConfig

    with pytest.raises(UserInputError, match="needs data.eurosat"):
        TrainConfig.from_dict({"data": {"eurosat_mosaics": {"train": 10}}})
    with pytest.raises(UserInputError, match="train / val counts"):
        TrainConfig.from_dict({"data": {"eurosat": "x", "eurosat_mosaics": {"test": 10}}})
    config = TrainConfig.from_dict({"data": {"eurosat": "x", "eurosat_mosaics": {"train": 10}}, "cache_dir": "c"})
    assert config.set_roots()["eurosat_mosaic"] == str(Path("c") / "eurosat_mosaics")


def test_a_linear_class_runs_along_a_whole_row_or_column() -> None:
    import random

    from training.data.mosaics import GRID, mosaic_layout

    rng = random.Random(0)
    seen = 0
    for _ in range(200):
        cells = mosaic_layout(["AnnualCrop", "Forest", "River"], rng, pure_share=0.0)
        grid = [cells[r * GRID:(r + 1) * GRID] for r in range(GRID)]
        if "River" not in cells:
            continue
        seen += 1
        # a later block may cover part of it; what is left lies on one row or one column
        river = {(r, c) for r in range(GRID) for c in range(GRID) if grid[r][c] == "River"}
        assert len({r for r, _ in river}) == 1 or len({c for _, c in river}) == 1, grid
    assert seen > 20


def test_a_mosaics_derived_questions_follow_its_cells_not_its_main_class() -> None:
    from training.data.class_vqa import combined_facts, derive_class_vqa
    from training.data.records import CaptionRecord

    facts = combined_facts(["AnnualCrop"] * 12 + ["River"] * 4)
    # the main class alone would say "no river, no water"; its river cells say otherwise
    assert facts["river"] == "yes" and facts["water"] == "yes" and facts["farmland"] == "yes"
    assert facts["setting"] == "rural" and facts["tennis court"] == "no"
    assert "forest" not in facts  # AnnualCrop says no forest, River says nothing about it
    mixed = combined_facts(["Residential"] * 10 + ["Forest"] * 6)
    assert "setting" not in mixed and mixed["forest"] == "yes" and mixed["building"] == "yes"
    assert combined_facts(["Forest", "NoSuchClass"]) == {}
    record = CaptionRecord(image_id=1, image_path=Path("m.png"), split="train", class_name="AnnualCrop", captions=[],
                           dataset="eurosat_mosaic", parts=["AnnualCrop"] * 12 + ["River"] * 4)
    questions = derive_class_vqa([record], per_image=20)
    assert len(questions) == len(facts)
    assert {q.question_id.split(":")[-1]: q.answer for q in questions} == facts


def test_trained_resolutions_are_recorded_per_set_and_per_scene_class(tmp_path: Path) -> None:
    from engine.model.config import RSMoEConfig
    from training.data.records import CaptionRecord
    from training.train import record_trained_resolutions

    def record(i: int, dataset: str, class_name: str | None) -> CaptionRecord:
        return CaptionRecord(i, tmp_path / f"{i}.png", "train", class_name, [], dataset=dataset)

    train = [record(1, "ucm", "golfcourse"), record(2, "ucm", "beach"), record(3, "aid", "Beach"),
             record(4, "eurosat", "SeaLake"), record(5, "eurosat_mosaic", "SeaLake"), record(6, "rsvqa_lr", None)]
    seen = {1: 0.33, 2: 0.35, 3: None, 4: 2.857, 5: 11.429, 6: 11.429}
    config = RSMoEConfig()
    record_trained_resolutions(config, train, seen)
    resolution = config.resolution
    assert resolution.trained_m == {"aid": [None, None], "eurosat": [2.857, 2.857], "eurosat_mosaic": [11.429, 11.429],
                                    "rsvqa_lr": [11.429, 11.429], "ucm": [0.33, 0.35]}
    assert resolution.min_m == 0.33 and resolution.max_m == 11.429
    # a class also learnt on images of unknown resolution (AID's beaches) has no known range: never left out
    assert resolution.scene_m == {"beach": [None, None], "golf course": [0.33, 0.33], "sea or lake": [2.857, 11.429]}
    assert not resolution.scene_plausible("golf course", 11.4) and resolution.scene_plausible("beach", 11.4)
    assert resolution.scene_plausible("sea or lake", 0.8) and not resolution.scene_plausible("sea or lake", 0.6)
