"""The answer head: closed answers from the image and the question, without decoding.

Questions whose answer is a word from a small closed set (yes / no, rural / urban, a count, an area) are what
RSVQA asks and what GIS users ask most ("Is there a river?", "How many buildings are there?"). Decoding them
with the experts was wrong more often than a question-only prior (RSVQA val); a small classifier over
(the question's words, the Q-Former's question-aware queries, the mean visual token, the scene head's
probabilities) answers them better and in one pass. Counts and areas are answered as RSVQA's buckets
(0, 1-10, 11-100, 101-1000, more than 1000), the precision the training answers support.

The head is plain numpy (weights in ``answer_head.safetensors`` next to the model's config), so the torch and
ONNX Runtime backends run the same code; its vocabulary of question words travels in the file's metadata.
:func:`question_kind` decides from the question's wording which questions the head answers; every other
question goes to the experts.

Rural / urban is a question about a whole region (RSVQA-LR calls a 2.5 km tile urban when it holds more than
about 500 buildings), which one look at the region, magnified from 10 m, reads poorly. Where the head holds a
*region classifier* (``region_w``, ``region_b``; the tile size ``region_tile_m`` and the built-up scenes
``region_scenes`` in the metadata), a region that spans two or more such tiles is answered from its built-up
share instead: the mean over its tiles, each seen at the scale the scene head knows best, of the scene head's
probability for a built-up scene (:func:`built_up_share`), through a logistic regression on its log.
A head with ``region_inputs`` also sees, beside the image, the log of its region's scene probabilities averaged
over such tiles (:func:`region_inputs`; the image's own where it spans about one tile).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from engine.errors import ModelDirError

ANSWER_HEAD_FILE = "answer_head.safetensors"

#: The closed answer kinds, and the labels of each (the head's output units, in this order).
BUCKET_TEXTS: tuple[str, ...] = ("0", "between 1 and 10", "between 11 and 100", "between 101 and 1000",
                                 "1,001 or more")
KIND_LABELS: dict[str, tuple[str, ...]] = {
    "yes_no": ("no", "yes"),
    "rural_urban": ("rural", "urban"),
    "count": tuple(f"count:{k}" for k in range(len(BUCKET_TEXTS))),
    "area": tuple(f"area:{k}" for k in range(len(BUCKET_TEXTS))),
}
LABELS: tuple[str, ...] = tuple(label for labels in KIND_LABELS.values() for label in labels)

#: Words a closed question may hold beside those of the head's vocabulary (they name no object).
GENERIC_WORDS = frozenset("picture photo photograph scene image tile region view visible see seen here shown "
                          "please any some in on at of the this that these it".split())
_AUXILIARIES = frozenset("is are was were does do did has have can could will would should".split())
_WORD = re.compile(r"[a-z]+")


def question_kind(question: str) -> str | None:
    """Which closed kind a question asks for (``yes_no``, ``rural_urban``, ``count``, ``area``), or None for
    an open question (the experts answer it). Decided from the wording alone."""
    words = _WORD.findall(question.lower())
    if not words:
        return None
    text = " ".join(words)
    if "rural" in words and "urban" in words:
        return "rural_urban"
    if text.startswith(("how many", "what is the number of", "what is the amount of", "what number of")):
        return "count"
    if "area" in words and text.startswith(("what is the area", "how large", "what area", "how big")):
        return "area"
    if words[0] in _AUXILIARIES and " or " not in f" {text} ":
        return "yes_no"
    return None


def _singular(word: str) -> str:
    """A plural's singular, roughly ("rivers" -> "river", "buildings" -> "building"); short words and words
    ending in ss / is / us ("grass", "this", "bus") kept."""
    if len(word) > 3 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "is", "us")):
        return word[:-1]
    return word


def question_tokens(question: str) -> list[str]:
    """The head's text features of a question: its words (singular) and word pairs."""
    words = [_singular(w) for w in _WORD.findall(question.lower())]
    return words + [f"{a}_{b}" for a, b in zip(words, words[1:])]


def answer_text(label: str) -> str:
    """The answer a user reads for a label (a bucket reads as its range; areas in square metres)."""
    kind, _, bucket = label.partition(":")
    if not bucket:
        return label
    text = BUCKET_TEXTS[int(bucket)]
    return f"{text} m2" if kind == "area" else text


def bag_of_words(questions: Sequence[str], index: dict[str, int]) -> np.ndarray:
    """Which of the vocabulary's tokens (``index``: token -> column) each question holds (B, len(index))."""
    bag = np.zeros((len(questions), len(index)), dtype=np.float32)
    for row, question in enumerate(questions):
        for token in question_tokens(question):
            column = index.get(token)
            if column is not None:
                bag[row, column] = 1.0
    return bag


@dataclass
class HeadAnswer:
    """One closed answer: its text, its kind, the head's probability for it among the kind's labels, and its
    label (:data:`LABELS`)."""

    text: str
    kind: str
    confidence: float
    label: str


#: A count or an area bucket's typical value, for adding up the answers of several tiles.
_BUCKET_TYPICAL = (0.0, 4.0, 40.0, 400.0, 4000.0)


def combine_tile_answers(answers: Sequence[HeadAnswer], min_confidence: float) -> HeadAnswer:
    """One answer for a region from the answers of its tiles (all of one kind): yes when a tile says yes at
    ``min_confidence`` or more (the surest yes), else no (as sure as the tile least sure of no); rural / urban by
    majority (ties: the surer side), as sure as the agreeing tiles' summed probability over all tiles; counts
    and areas add up (each tile's bucket at its typical value), as sure as the least sure tile."""
    kind = answers[0].kind
    if kind == "yes_no":
        yes = [a for a in answers if a.label == "yes"]
        if yes and max(a.confidence for a in yes) >= min_confidence:
            return max(yes, key=lambda a: a.confidence)
        surest_no = min(a.confidence if a.label == "no" else 1.0 - a.confidence for a in answers)
        return HeadAnswer(answer_text("no"), kind, surest_no, "no")
    if kind == "rural_urban":
        sides = {label: [a for a in answers if a.label == label] for label in KIND_LABELS[kind]}
        label = max(sides, key=lambda k: (len(sides[k]), sum(a.confidence for a in sides[k])))
        agreeing = sides[label]
        confidence = sum(a.confidence for a in agreeing) / len(answers)
        return HeadAnswer(answer_text(label), kind, confidence, label)
    total = sum(_BUCKET_TYPICAL[int(a.label.partition(":")[2])] for a in answers)
    bucket = 0 if total <= 0 else 1 if total <= 10 else 2 if total <= 100 else 3 if total <= 1000 else 4
    label = f"{kind}:{bucket}"
    return HeadAnswer(answer_text(label), kind, min(a.confidence for a in answers), label)


#: A region's built-up share is floored at this before its log is the region classifier's input.
SHARE_FLOOR = 1e-3


def region_feature(share: float) -> float:
    """The region classifier's input for a built-up share: its log (floored)."""
    return float(np.log(share + SHARE_FLOOR))


def built_up_share(tile_probabilities: np.ndarray, scene_classes: Sequence[str],
                   built_up_scenes: Sequence[str]) -> float:
    """A region's built-up share: the mean over its tiles (tiles, S: the scene head's probabilities over
    ``scene_classes``) of the probability of a scene of ``built_up_scenes``."""
    built_up = set(built_up_scenes)
    columns = [i for i, scene in enumerate(scene_classes) if scene in built_up]
    if not columns:
        raise ModelDirError("the scene head knows none of the region classifier's built-up scenes; fit it again")
    return float(np.asarray(tile_probabilities)[:, columns].sum(axis=1).mean())


def region_inputs(region_probabilities: np.ndarray) -> np.ndarray:
    """What a head with ``region_inputs`` sees of each image's region (B, S): the log of the scene
    probabilities averaged over the region's tiles."""
    return np.log(np.asarray(region_probabilities, dtype=np.float32) + 1e-4)


def region_grid(width_m: float | None, height_m: float | None, tile_m: float, max_grid: int) -> int:
    """Tiles per side that cut a region of ``width_m`` x ``height_m`` metres into tiles of about ``tile_m``
    (at most ``max_grid``; 1 where the size is unknown or the region is not much larger than one tile)."""
    if not width_m or not height_m or tile_m <= 0:
        return 1
    return max(1, min(int(max_grid), round(max(width_m, height_m) / tile_m)))


def _gelu(x: np.ndarray) -> np.ndarray:
    """GELU, tanh approximation (what the head is trained with: ``nn.GELU(approximate="tanh")``)."""
    return 0.5 * x * (1.0 + np.tanh(0.7978845608028654 * (x + 0.044715 * x ** 3)))


class AnswerHead:
    """A two-layer classifier over ``[question words; query mean; visual mean; scene probabilities]``,
    standardised with the training set's mean and deviation."""

    def __init__(self, vocabulary: Sequence[str], tensors: dict[str, np.ndarray],
                 region_tile_m: float | None = None, region_scenes: Sequence[str] = (),
                 region_inputs: bool = False) -> None:
        self.vocabulary = list(vocabulary)
        self.region_tile_m = region_tile_m
        self.region_scenes = list(region_scenes)
        self.region_inputs = bool(region_inputs)
        self.index = {token: i for i, token in enumerate(self.vocabulary)}
        self.tensors = {k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()}
        t = self.tensors
        if t["w2"].shape[0] != len(LABELS) or t["w1"].shape[1] != t["mean"].shape[0]:
            raise ModelDirError("the answer head's weights do not match its labels; retrain it")
        classifier = {"region_w" in t, "region_b" in t, bool(self.region_scenes)}
        if len(classifier) > 1 or ((True in classifier or self.region_inputs) != (region_tile_m is not None)):
            raise ModelDirError("the answer head's region classifier is incomplete; fit it again")

    # -- files -------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: Path) -> "AnswerHead":
        from safetensors import SafetensorError, safe_open  # the weights file format of every model part

        try:
            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            vocabulary = json.loads(meta["vocabulary"])
            labels = json.loads(meta["labels"])
            region_tile_m = float(meta["region_tile_m"]) if "region_tile_m" in meta else None
            region_scenes = json.loads(meta.get("region_scenes", "[]"))
            with_region_inputs = meta.get("region_inputs") == "true"
        except (OSError, KeyError, ValueError, SafetensorError) as exc:
            raise ModelDirError(f"cannot read the answer head {path}: {exc}") from exc
        if list(labels) != list(LABELS):
            raise ModelDirError(f"{path} answers other labels than this engine knows; retrain it")
        missing = {"mean", "std", "w1", "b1", "w2", "b2"} - set(tensors)
        if missing:
            raise ModelDirError(f"{path} lacks {', '.join(sorted(missing))}; retrain it")
        return cls(vocabulary, tensors, region_tile_m, region_scenes, with_region_inputs)

    def save(self, path: Path) -> None:
        from safetensors.numpy import save_file

        metadata = {"vocabulary": json.dumps(self.vocabulary), "labels": json.dumps(list(LABELS))}
        if self.region_tile_m is not None:
            metadata.update(region_tile_m=str(self.region_tile_m), region_scenes=json.dumps(self.region_scenes),
                            region_inputs=json.dumps(self.region_inputs))
        save_file({k: np.ascontiguousarray(v) for k, v in self.tensors.items()}, str(path), metadata=metadata)

    def with_region_classifier(self, weight: float, bias: float, tile_m: float,
                               scenes: Sequence[str]) -> "AnswerHead":
        """This head with a region classifier: urban with probability sigmoid(``weight`` *
        :func:`region_feature` + ``bias``) of the share of ``scenes`` over tiles of ``tile_m`` metres."""
        tensors = {**self.tensors, "region_w": np.asarray([weight], np.float32),
                   "region_b": np.asarray([bias], np.float32)}
        return AnswerHead(self.vocabulary, tensors, float(tile_m), scenes, self.region_inputs)

    # -- inference ----------------------------------------------------------------------------------------
    def words(self, questions: Sequence[str]) -> np.ndarray:
        """The questions' bag of known tokens (B, vocabulary)."""
        return bag_of_words(questions, self.index)

    def knows(self, question: str) -> bool:
        """Whether every word of the question was seen in training (or is a generic word like "picture"): a
        question about an object the head never learnt ("Is there a desert?") goes to the experts instead."""
        return all(w in self.index or w in GENERIC_WORDS for w in question_tokens(question) if "_" not in w)

    def logits(self, features: np.ndarray) -> np.ndarray:
        t = self.tensors
        x = (np.asarray(features, dtype=np.float32) - t["mean"]) / t["std"]
        return _gelu(x @ t["w1"].T + t["b1"]) @ t["w2"].T + t["b2"]

    @property
    def has_region_classifier(self) -> bool:
        """Whether rural / urban about a region of several region tiles comes from :meth:`region_answer`."""
        return "region_w" in self.tensors

    def region_answer(self, share: float) -> HeadAnswer:
        """Rural or urban for a region from its :func:`built_up_share` over ``region_scenes`` (needs the
        region classifier)."""
        if not self.has_region_classifier:
            raise ModelDirError("this answer head has no region classifier")
        t = self.tensors
        logit = float(t["region_w"][0]) * region_feature(share) + float(t["region_b"][0])
        urban = float(1.0 / (1.0 + np.exp(-logit)))
        label = "urban" if urban >= 0.5 else "rural"
        return HeadAnswer(answer_text(label), "rural_urban", max(urban, 1.0 - urban), label)

    def answer(self, features: np.ndarray, kinds: Sequence[str]) -> list[HeadAnswer]:
        """The best label of each row's kind, with its probability among that kind's labels."""
        logits = self.logits(features)
        answers = []
        for row, kind in zip(logits, kinds):
            columns = [LABELS.index(label) for label in KIND_LABELS[kind]]
            scores = row[columns] - row[columns].max()
            probs = np.exp(scores) / np.exp(scores).sum()
            best = int(probs.argmax())
            label = KIND_LABELS[kind][best]
            answers.append(HeadAnswer(answer_text(label), kind, float(probs[best]), label))
        return answers


def head_features(words: np.ndarray, inputs: np.ndarray) -> np.ndarray:
    """The head's input rows: the questions' words, then what the model sees
    (:meth:`engine.model.routing.MoEInference.answer_head_inputs`): one layout for training and inference."""
    return np.concatenate([words, inputs], axis=1).astype(np.float32)


def load_answer_head(enabled: bool, model_dir: Path | None) -> AnswerHead | None:
    """The model's answer head when its config enables one (``answer_head.enabled``), else None."""
    if not enabled:
        return None
    path = Path(model_dir or ".") / ANSWER_HEAD_FILE
    if not path.is_file():
        raise ModelDirError(f"the config enables an answer head but {path} is missing")
    return AnswerHead.load(path)
