"""training.data: loaders, image dataset, sub-task and router targets, UCM-derived VQA."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.errors import InputNotFoundError, UserInputError
from engine.model.image_processing import ImageProcessor, ImageProcessorConfig
from engine.model.router_plan import RouterPlan, format_router_plan, parse_router_plan
from training.data import (
    AugmentConfig,
    CaptionRecord,
    ImageRecordDataset,
    VQARecord,
    augment_array,
    clean_sentence,
    collate_records,
    derive_subtask_targets,
    derive_ucm_vqa,
    infer_scene,
    load_karpathy,
    load_rsicap,
    load_rsvqa,
    load_ucm_captions,
    object_mentions,
    router_target,
    router_target_for_record,
    spatial_phrases,
    targets_for_record,
    vqa_statistics,
    write_rsvqa_json,
)
from training.data.ucm_vqa import agreed_counts, mentioned_objects

FIXTURES = Path(__file__).resolve().parent / "data" / "training"
IMAGES = FIXTURES / "images"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
UCM = SHARED / "ucm_captions"
needs_ucm = pytest.mark.skipif(not (UCM / "dataset.json").is_file(), reason="shared UCM-captions not available")


@pytest.fixture(scope="module")
def mini() -> list[CaptionRecord]:
    return load_karpathy(FIXTURES / "karpathy_mini.json", images_dir=IMAGES)


@pytest.fixture(scope="module")
def by_class(mini: list[CaptionRecord]) -> dict[str, CaptionRecord]:
    return {r.class_name: r for r in mini}


@pytest.fixture(scope="module")
def ucm_all() -> list[CaptionRecord]:
    if not (UCM / "dataset.json").is_file():
        pytest.skip("shared UCM-captions not available")
    return load_ucm_captions(UCM, check_images=False)


# --------------------------------------------------------------------------- loaders
def test_karpathy_records(mini: list[CaptionRecord]) -> None:
    assert [r.filename for r in mini] == ["613.jpg", "1943.jpg", "2042.jpg"]
    first = mini[0]
    assert first.image_id == 612 and first.class_name == "denseresidential" and first.split == "train"
    assert first.image_path == IMAGES / "613.jpg" and first.image_path.is_file()
    assert len(first.captions) == 5 and first.captions[0] == "This is a dense residential area with houses and roads ."
    assert first.dataset == "ucm_mini"


def test_karpathy_split_filter(mini: list[CaptionRecord]) -> None:
    assert {r.split for r in mini} == {"train", "val", "test"}
    val = load_karpathy(FIXTURES / "karpathy_mini.json", split="val")
    assert [r.filename for r in val] == ["1943.jpg"]
    assert len(load_karpathy(FIXTURES / "karpathy_mini.json", split=["train", "test"])) == 2
    with pytest.raises(UserInputError, match="no records in split"):
        load_karpathy(FIXTURES / "karpathy_mini.json", split="restval")


def test_karpathy_missing_image_is_named() -> None:
    with pytest.raises(InputNotFoundError) as info:
        load_karpathy(FIXTURES / "karpathy_missing_image.json", images_dir=IMAGES)
    message = str(info.value)
    assert "9999.jpg" in message and "1 of 2" in message and "613.jpg" not in message
    # without an images dir (or with check_images=False) nothing is checked
    assert len(load_karpathy(FIXTURES / "karpathy_missing_image.json")) == 2
    assert len(load_karpathy(FIXTURES / "karpathy_missing_image.json", images_dir=IMAGES, check_images=False)) == 2


def test_loader_file_errors(tmp_path: Path) -> None:
    with pytest.raises(InputNotFoundError, match="annotation file not found"):
        load_karpathy(tmp_path / "nope.json")
    with pytest.raises(InputNotFoundError, match="images directory not found"):
        load_karpathy(FIXTURES / "karpathy_mini.json", images_dir=tmp_path / "no_images")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserInputError, match="not valid JSON"):
        load_karpathy(bad)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps([{"filename": "a.jpg", "caption": "x"}]))
    with pytest.raises(UserInputError, match="Karpathy"):
        load_karpathy(wrong)
    with pytest.raises(UserInputError, match="RSVQA"):
        load_rsvqa(FIXTURES / "karpathy_mini.json")


def test_rsicap_list_and_wrapped(tmp_path: Path) -> None:
    records = load_rsicap(FIXTURES / "rsicap_mini.json", images_dir=IMAGES)
    assert [r.filename for r in records] == ["613.jpg", "1943.jpg", "2042.jpg"]
    assert all(r.split == "train" and r.class_name is None and len(r.captions) == 1 for r in records)
    assert records[1].image_path == IMAGES / "1943.jpg"
    items = json.loads((FIXTURES / "rsicap_mini.json").read_text())
    wrapped = tmp_path / "rsieval.json"
    wrapped.write_text(json.dumps({"annotations": items + [{"filename": "613.jpg", "caption": "A second caption."}]}))
    merged = load_rsicap(wrapped, split="test")
    assert len(merged) == 3 and merged[0].captions[1] == "A second caption." and merged[0].split == "test"
    with pytest.raises(InputNotFoundError, match="613.jpg"):
        load_rsicap(wrapped, images_dir=tmp_path)  # empty dir: all three missing


def test_rsvqa_split_and_fields(tmp_path: Path) -> None:
    records = load_rsvqa(FIXTURES / "rsvqa_test_mini.json", images_dir=IMAGES)
    assert len(records) == 4 and {r.split for r in records} == {"test"}  # from the file name
    count = records[2]
    assert isinstance(count, VQARecord)
    assert (count.question_type, count.answer, count.question_id) == ("count", "4", 103)
    assert count.image_path == IMAGES / "1943.jpg" and count.dataset == "fixture"
    # records without a split field take the caller's split (the file name is only a default)
    assert {r.split for r in load_rsvqa(FIXTURES / "rsvqa_test_mini.json", split="val")} == {"val"}
    items = json.loads((FIXTURES / "rsvqa_test_mini.json").read_text())
    items[0]["split"] = "val"
    wrapped = tmp_path / "questions.json"
    wrapped.write_text(json.dumps({"questions": items}))
    loaded = load_rsvqa(wrapped)
    assert [r.split for r in loaded] == ["val", "all", "all", "all"]
    with pytest.raises(InputNotFoundError, match="3 of 3 images"):
        load_rsvqa(wrapped, images_dir=tmp_path)
    # records that carry a split are filtered by it
    for item in items:
        item["split"] = "val"
    wrapped.write_text(json.dumps(items))
    assert len(load_rsvqa(wrapped, split="val")) == 4
    with pytest.raises(UserInputError, match="no records in split"):
        load_rsvqa(wrapped, split="train")


@pytest.mark.skipif(not (SHARED / "annotations").is_dir(), reason="shared annotations not available")
def test_real_sydney_and_rsvqa_files() -> None:
    sydney = load_karpathy(SHARED / "annotations" / "sydney_captions" / "dataset_sydney.json")
    assert len(sydney) == 613 and Counter(r.split for r in sydney) == {"train": 497, "val": 58, "test": 58}
    assert all(r.class_name is None and r.captions for r in sydney)
    lr = load_rsvqa(SHARED / "annotations" / "rsvqa_lr_qa" / "test_qa.json")
    assert len(lr) == 10004 and {r.split for r in lr} == {"test"}
    assert set(Counter(r.question_type for r in lr)) == {"comp", "presence", "count", "rural_urban"}


# --------------------------------------------------------------------------- images
def test_dataset_uses_the_engine_processor(mini: list[CaptionRecord]) -> None:
    dataset = ImageRecordDataset(mini)
    item = dataset[0]
    assert item["pixel_values"].shape == (3, 224, 224) and item["record"] is mini[0]
    expected = ImageProcessor()([mini[0].image_path])[0]
    assert torch.equal(item["pixel_values"], expected)
    small = ImageRecordDataset(mini, processor=ImageProcessorConfig(image_size=64))
    batch = collate_records([small[i] for i in range(len(small))])
    assert batch["pixel_values"].shape == (3, 3, 64, 64) and batch["indices"] == [0, 1, 2]


def test_augmentation_is_off_by_default_and_dihedral(mini: list[CaptionRecord]) -> None:
    array = ImageProcessor().to_array(mini[0].image_path)
    assert augment_array(array, AugmentConfig()) is array
    assert not AugmentConfig().enabled
    variants = [np.rot90(a, k) for a in (array, array[:, ::-1]) for k in range(4)]
    config = AugmentConfig(hflip=True, vflip=True, rot90=True)
    seen = set()
    generator = torch.Generator().manual_seed(0)
    for _ in range(24):
        out = augment_array(array, config, generator)
        assert out.dtype == np.uint8 and out.flags["C_CONTIGUOUS"]
        matches = [i for i, v in enumerate(variants) if np.array_equal(out, v)]
        assert matches
        seen.add(matches[0])
    assert len(seen) > 2
    a = augment_array(array, config, torch.Generator().manual_seed(5))
    b = augment_array(array, config, torch.Generator().manual_seed(5))
    assert np.array_equal(a, b)
    # the dataset applies it before the shared processor
    dataset = ImageRecordDataset(mini, augment=AugmentConfig(hflip=True), generator=torch.Generator().manual_seed(1))
    pixels = dataset[0]["pixel_values"]
    plain = ImageProcessor()([array])[0]
    assert torch.equal(pixels, plain) or torch.equal(pixels, ImageProcessor()([array[:, ::-1].copy()])[0])


# --------------------------------------------------------------------------- sub-task targets
def test_clean_sentence() -> None:
    assert clean_sentence("Lots of plants scattered on the ground. .") == "Lots of plants scattered on the ground."
    assert clean_sentence("  there are  two tennis courts ") == "There are two tennis courts."
    assert clean_sentence("A beach , with sand .") == "A beach, with sand."
    assert clean_sentence("   ") == ""


def test_object_mentions_counts_and_negation() -> None:
    by_name = {m.name: m for m in object_mentions("There are one big and two small airplanes and no car .")}
    assert by_name["airplane"].count == 3 and by_name["car"].negated
    tanks = object_mentions("Four black storage tanks are arranged neatly on the ground .")
    assert [(m.name, m.count) for m in tanks] == [("storage tank", 4)]
    villa = object_mentions("A villa with lush plants surrounded in the mobile home park")
    assert villa[0].name == "house" and villa[0].singular_article
    assert "mobile home" not in {m.name for m in villa}  # "mobile home park" is the scene
    assert "surrounded" in spatial_phrases("A villa with lush plants surrounded")
    assert spatial_phrases("The waves slapping the beach over and over again") == []


def test_dense_residential_targets(by_class: dict[str, CaptionRecord]) -> None:
    targets = targets_for_record(by_class["denseresidential"])
    assert "dense residential area" in targets.theme.lower()
    assert "houses" in targets.objects.lower()
    assert spatial_phrases(targets.relations), targets.relations
    assert len({targets.theme, targets.objects, targets.relations}) == 3
    assert all(t in by_class["denseresidential"].captions for t in
               (s.replace(".", " .") for s in (targets.theme, targets.objects, targets.relations)))


def test_objects_target_keeps_counts_and_relations_layout(by_class: dict[str, CaptionRecord]) -> None:
    tanks = targets_for_record(by_class["storagetanks"])
    assert "four" in tanks.objects.lower() and "storage tanks" in tanks.objects.lower()
    assert "arranged neatly" in tanks.relations
    courts = targets_for_record(by_class["tenniscourt"])
    assert "two tennis courts" in courts.objects.lower()
    assert any(p in courts.relations.lower() for p in ("surrounded", "beside", "arranged"))
    # the tennis-court captions describe objects, not the scene: the theme is the class sentence
    assert courts.theme == "This is a tennis court." and courts.sources["theme"] is None


def test_targets_are_deterministic_sentences_and_never_empty(mini: list[CaptionRecord]) -> None:
    for record in mini:
        a, b = targets_for_record(record), targets_for_record(record)
        assert a == b
        for text in a.as_dict().values():
            assert text and text[0].isupper() and text.endswith(".")
    empty = derive_subtask_targets([], None)
    assert all(empty.as_dict().values())
    no_match = derive_subtask_targets(["There is a piece of farmland ."], "agricultural")
    assert no_match.relations == "The fields cover the whole area." and no_match.sources["relations"] is None
    assert no_match.objects == "There is a piece of farmland."  # farmland is land cover: an object
    assert no_match.theme == "This is an agricultural area."  # the only caption is taken
    unknown = derive_subtask_targets([], "railwaystation")
    assert unknown.theme == "This is a railway station."
    sydney_like = derive_subtask_targets(["A residential area with houses arranged neatly ."], None)
    assert sydney_like.theme == sydney_like.relations == sydney_like.objects  # reused, not invented


def test_theme_fallback_carries_the_scene_character() -> None:
    captions = ["Lots of green trees constitute a dense forest .", "There are lots of trees ."]
    assert derive_subtask_targets(captions, "forest").theme == "This is a dense forest."


def test_router_targets_round_trip(mini: list[CaptionRecord]) -> None:
    for record in mini:
        plan = parse_router_plan(router_target_for_record(record))
        assert plan is not None and plan.experts == ["theme", "objects", "relations"]
    assert router_target_for_record(mini[0]) == "scene: dense residential area | experts: theme, objects, relations"
    assert router_target("forest", "How many trees are there?", "count") == "scene: forest | experts: objects"
    assert router_target(None, "Is this a rural or an urban area?", "rural_urban") == "scene: unknown | experts: theme"
    assert router_target("harbor", "What is next to the boats?") == "scene: harbor | experts: relations"
    assert infer_scene(["A residential area with houses .", "Houses in a residential area ."]) == "residential area"
    assert infer_scene(["Nothing to see ."]) is None


@pytest.mark.parametrize(
    ("text", "scene", "experts"),
    [
        ("scene: dense residential area | experts: theme, objects, relations", "dense residential area",
         ["theme", "objects", "relations"]),
        ("Scene: Forest; Experts: Relationships and objects</s> trailing", "forest", ["relations", "objects"]),
        ("scene: unknown | experts: theme", None, ["theme"]),
        ("scene = parking lot\nexpert = objects, objects", "parking lot", ["objects"]),
        ("scene: harbor experts: layout", "harbor", ["relations"]),
    ],
)
def test_parse_router_plan_is_tolerant(text: str, scene: str | None, experts: list[str]) -> None:
    assert parse_router_plan(text) == RouterPlan(scene=scene, experts=experts)


@pytest.mark.parametrize("garbage", ["", None, "hello world", "scene: forest", "experts:", "scene: x | experts: banana"])
def test_parse_router_plan_garbage_is_none(garbage: str | None) -> None:
    assert parse_router_plan(garbage) is None


def test_router_plan_format_round_trip() -> None:
    plan = RouterPlan(scene="Dense Residential Area.", experts=["theme", "relations"])
    text = format_router_plan(plan)
    assert text == "scene: dense residential area | experts: theme, relations"
    assert parse_router_plan(text) == RouterPlan("dense residential area", ["theme", "relations"])
    assert parse_router_plan("scene: a | experts: custom, theme", known_experts=["custom", "theme"]).experts == [
        "custom", "theme"]


# --------------------------------------------------------------------------- UCM-derived VQA
def test_derived_vqa_on_fixture(mini: list[CaptionRecord], tmp_path: Path) -> None:
    questions = derive_ucm_vqa(mini)
    assert questions == derive_ucm_vqa(mini)  # deterministic
    by_image: dict[str, dict[tuple[str, str], str]] = {}
    for q in questions:
        by_image.setdefault(q.image, {})[(q.question_type, q.question)] = q.answer
    tanks = by_image["1943.jpg"]
    assert tanks[("scene", "What type of scene is this?")] == "storage tank area"
    assert tanks[("rural_urban", "Is this a rural or an urban area?")] == "urban"
    assert tanks[("count", "How many storage tanks are there?")] == "4"
    assert by_image["2042.jpg"][("count", "How many tennis courts are there?")] == "2"
    assert by_image["613.jpg"][("scene", "What type of scene is this?")] == "dense residential area"
    split_of = {r.filename: r.split for r in mini}
    assert all(q.split == split_of[q.image] for q in questions)
    assert len({q.question_id for q in questions}) == len(questions)

    path = write_rsvqa_json(questions, tmp_path / "ucm_vqa.json")
    loaded = load_rsvqa(path, images_dir=IMAGES)
    assert [(r.question, r.answer, r.split, r.question_type) for r in loaded] == [
        (q.question, q.answer, q.split, q.question_type) for q in questions]
    assert all(r.dataset == "UCM-derived VQA" for r in loaded)
    assert [r.question for r in load_rsvqa(path, split="val")] == [q.question for q in questions if q.split == "val"]


def test_agreed_counts_need_agreement() -> None:
    assert agreed_counts(["There are four tanks .", "Four tanks on the ground ."]) == {"storage tank": 4}
    assert agreed_counts(["There are four tanks .", "Three tanks on the ground ."]) == {}
    assert agreed_counts(["There are four tanks .", "Some tanks ."]) == {}  # one number is not enough
    assert agreed_counts(["Two courts .", "two tennis courts", "two tennis courts", "a tennis court"]) == {}


@needs_ucm
def test_derived_vqa_on_ucm_is_consistent_with_captions(ucm_all: list[CaptionRecord]) -> None:
    questions = derive_ucm_vqa(ucm_all)
    stats = vqa_statistics(questions)
    assert stats["per_split"]["test"] == {"count": 36, "presence": 572, "rural_urban": 170, "scene": 210}
    assert stats["per_split"]["val"] == {"count": 33, "presence": 572, "rural_urban": 170, "scene": 210}
    assert stats["per_split"]["train"] == {"count": 228, "presence": 4544, "rural_urban": 1360, "scene": 1680}
    assert stats["answers"]["presence"]["yes"] == stats["answers"]["presence"]["no"]

    records = {r.filename: r for r in ucm_all}
    by_question = {}
    from training.data.ucm_vqa import count_question, presence_question

    for r in ucm_all:
        for name in mentioned_objects(r.captions):
            by_question[(r.filename, presence_question(name))] = name
    from training.data.vocab import OBJECT_TERMS

    names = {presence_question(t.name): t.name for t in OBJECT_TERMS if t.presence}
    counts = {count_question(t.name): t.name for t in OBJECT_TERMS if t.countable}
    for q in questions:
        record = records[q.image]
        assert q.split == record.split
        if q.question_type == "presence":
            mentioned = names[q.question] in mentioned_objects(record.captions)
            assert mentioned == (q.answer == "yes"), (q, record.captions)
        elif q.question_type == "count":
            assert agreed_counts(record.captions)[counts[q.question]] == int(q.answer)


@needs_ucm
def test_ucm_targets_over_the_whole_set(ucm_all: list[CaptionRecord]) -> None:
    dense = [r for r in ucm_all if r.class_name == "denseresidential"]
    targets = [targets_for_record(r) for r in dense]
    assert sum("house" in t.objects.lower() for t in targets) >= 0.9 * len(dense)
    assert sum(bool(spatial_phrases(t.relations)) for t in targets) >= 0.9 * len(dense)
    for r in ucm_all[::7]:
        t = targets_for_record(r)
        assert all(s and s.endswith(".") for s in t.as_dict().values())


def test_evenly_spaced_subsets_cover_every_class_of_an_ordered_split() -> None:
    from training.data.records import evenly_spaced

    split = [f"class{i // 10}-{i % 10}" for i in range(210)]  # 21 classes x 10, in a row (UCM val/test)
    subset = evenly_spaced(split, 42)
    assert len(subset) == 42 and len(set(subset)) == 42
    assert {s.split("-")[0] for s in subset} == {f"class{i}" for i in range(21)}  # the first 42 would hold 5
    assert evenly_spaced(split, None) == split and evenly_spaced(split, 500) == split
