"""training.metrics: caption scorer normalisation, METEOR process handling, VQA accuracy."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from engine.errors import UserInputError
from training.data.records import VQARecord
from training.metrics import (
    MeteorScorer,
    MetricsUnavailableError,
    caption_metrics,
    naming_scores,
    normalize_answer,
    normalize_caption,
    vqa_accuracy,
)

REFS = {
    1: ["There are four black storage tanks arranged neatly on the ground .",
        "Four same storage tanks are on the ground ."],
    2: ["This is a dense residential area with houses and roads .",
        "Lots of houses are pressed together ."],
}
SAME = {1: REFS[1][0], 2: REFS[2][0]}


def test_normalize_caption() -> None:
    assert normalize_caption("This is a Beach .") == "this is a beach"
    assert normalize_caption("Lots of plants scattered on the ground. .") == "lots of plants scattered on the ground"
    assert normalize_caption("A blue-green sea; it's calm!") == "a blue green sea its calm"


def test_identical_candidate_scores_one_and_wrong_less() -> None:
    same = caption_metrics(SAME, REFS, meteor=False)
    assert set(same) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"}
    assert same["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert same["ROUGE-L"] == pytest.approx(1.0, abs=1e-6)
    wrong = caption_metrics({1: "a river goes through the forest", 2: "many boats in the harbor"}, REFS, meteor=False)
    assert wrong["BLEU-4"] < 0.1 and wrong["CIDEr"] < same["CIDEr"] and wrong["ROUGE-L"] < same["ROUGE-L"]


def test_case_and_punctuation_do_not_matter() -> None:
    shouty = {k: v.upper().replace(" .", "!!!") for k, v in SAME.items()}
    lowered_refs = {k: [normalize_caption(r) for r in v] for k, v in REFS.items()}
    assert caption_metrics(shouty, REFS, meteor=False) == caption_metrics(SAME, lowered_refs, meteor=False)


def test_mismatched_ids_and_empty_candidates() -> None:
    with pytest.raises(UserInputError, match="same images"):
        caption_metrics({1: "x"}, REFS, meteor=False)
    with pytest.raises(UserInputError, match="no predictions"):
        caption_metrics({}, REFS, meteor=False)
    scores = caption_metrics({1: "", 2: "..."}, REFS, meteor=False)
    assert scores["BLEU-1"] == pytest.approx(0.0, abs=1e-6) and scores["CIDEr"] == 0.0


def test_missing_java_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(MetricsUnavailableError, match="Java"):
        caption_metrics(SAME, REFS)


@pytest.mark.skipif(shutil.which("java") is None, reason="java not installed")
def test_meteor_scores_and_closes_its_jvm() -> None:
    scorer = MeteorScorer()
    proc = scorer._proc
    try:
        same = caption_metrics(SAME, REFS, meteor_scorer=scorer)
        wrong = caption_metrics({1: "a river goes through the forest", 2: "many boats"}, REFS, meteor_scorer=scorer)
    finally:
        scorer.close()
    assert same["METEOR"] > 0.9 and wrong["METEOR"] < same["METEOR"]
    assert list(same) == ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"]
    assert proc is not None and proc.poll() is not None  # the JVM has exited
    scorer.close()  # idempotent


def _vqa(qid: int | str, answer: str, qtype: str) -> VQARecord:
    return VQARecord(Path("x.png"), "q?", answer, qtype, qid, "test")


def test_normalize_answer() -> None:
    assert normalize_answer("Four.") == "4"
    assert normalize_answer("a Dense residential area") == "dense residential area"
    assert normalize_answer("Yes!") == "yes"


def test_vqa_accuracy_overall_and_per_type() -> None:
    records = [
        _vqa(1, "yes", "presence"),
        _vqa(2, "no", "presence"),
        _vqa(3, "4", "count"),
        _vqa(4, "two", "count"),
        _vqa(5, "dense residential area", "scene"),
        _vqa("6", "urban", "rural_urban"),
    ]
    predictions = {1: "Yes, there is.", 2: "yes", 3: "four", 4: "2", 5: "A dense residential area.", 6: "Urban"}
    result = vqa_accuracy(records, predictions)
    assert result["per_type"] == {"count": 1.0, "presence": 0.5, "rural_urban": 1.0, "scene": 1.0}
    assert result["overall"] == pytest.approx(5 / 6) and result["count"] == 6 and result["missing"] == 0
    partial = vqa_accuracy(records, {"1": "yes"})  # string ids match int ids; missing ones are wrong
    assert partial["missing"] == 5 and partial["overall"] == pytest.approx(1 / 6)
    with pytest.raises(UserInputError):
        vqa_accuracy([], {})


def test_naming_scores_count_names_right_wrong_and_missing() -> None:
    named = [{"farmland", "water"}, {"forest"}, {"farmland"}, set()]
    shown = [{"farmland", "forest"}, {"forest"}, {"farmland", "water"}, {"water"}]
    scores = naming_scores(named, shown)
    assert scores["images"] == 4
    assert scores["recall"] == pytest.approx(3 / 6) and scores["precision"] == pytest.approx(3 / 4)
    assert scores["all_named"] == pytest.approx(1 / 4) and scores["exact"] == pytest.approx(1 / 4)
    assert scores["mixed"]["images"] == 2 and scores["mixed"]["recall"] == pytest.approx(2 / 4)
    assert scores["per_name"]["water"] == {"shown": 2, "named": 1, "recall": 0.0, "precision": 0.0}
    assert scores["per_name"]["forest"]["recall"] == 0.5 and scores["per_name"]["farmland"]["precision"] == 1.0
    with pytest.raises(ValueError):
        naming_scores(named, shown[:2])
