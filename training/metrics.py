"""Caption metrics (COCO caption toolkit) and VQA accuracy.

Captions: BLEU-1..4, METEOR, ROUGE-L and CIDEr (CIDEr-D as implemented by ``pycocoevalcap``; its document
frequencies come from the references of the evaluated set). SPICE is left out: it downloads Stanford
CoreNLP at run time, which these machines cannot do.

Normalisation, identical for candidates and references (:func:`normalize_caption`): lower-case, apostrophes
dropped ("it's" -> "its"), every other punctuation or symbol character replaced by a space (so "ground ."
-> "ground", "blue-green" -> "blue green"), whitespace collapsed. This simple normaliser is used instead of
pycocoevalcap's ``PTBTokenizer``, which starts a JVM per call and writes temporary files into the installed
package; on these captions (plain English, only "." and "-" as punctuation) the two differ only on
hyphenated words.

METEOR runs ``meteor-1.5.jar`` (shipped in pycocoevalcap) in a JVM with a serial garbage collector and a
bounded heap, one process per :func:`caption_metrics` call, which is always closed (also on errors). Java
must be on PATH: otherwise :class:`MetricsUnavailableError` says so (``caption_metrics(..., meteor=False)``
skips it).

VQA: exact match after :func:`normalize_answer` (lower-case, punctuation stripped, articles dropped, number
words -> digits); a gold ``yes``/``no`` is compared with the first word of the prediction ("Yes, there is"
counts as yes). Missing predictions count as wrong and are reported.

RSVQA (:func:`rsvqa_accuracy`): the generated text is first put into the dataset's own answer vocabulary by
:func:`normalize_rsvqa_answer`, per question type (``presence`` / ``comp``: ``yes`` | ``no``; ``rural_urban``:
``rural`` | ``urban``; ``count``: an integer such as ``3``; ``area``: square metres such as ``120m2``), then
counts and areas are right when they fall in the reference's RSVQA bucket (0, 1-10, 11-100, 101-1000, >1000;
:func:`rsvqa_bucket`) and the other types on exact match. Accuracy is reported per type, as the average over
the types (RSVQA's "AA") and over all questions ("OA").
"""
from __future__ import annotations

import importlib.util
import logging
import re
import shutil
import subprocess
import tempfile
import unicodedata
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from engine.errors import RSMoEError, UserInputError
from training.data.records import VQARecord
from training.data.vocab import NUMBER_WORDS

log = logging.getLogger(__name__)

CAPTION_METRICS: tuple[str, ...] = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


class MetricsUnavailableError(RSMoEError):
    """A metric cannot run on this machine (e.g. METEOR without Java)."""

    exit_code = 7
    http_status = 503


# --------------------------------------------------------------------------- normalisation
def _is_punct(ch: str) -> bool:
    return unicodedata.category(ch)[0] in ("P", "S")


def normalize_caption(text: str) -> str:
    """Lower-case, drop apostrophes, punctuation/symbols -> space, collapse whitespace."""
    text = str(text).lower().replace("'", "").replace("\u2019", "").replace("`", "")
    text = "".join(" " if _is_punct(ch) else ch for ch in text)
    return " ".join(text.split())


_ARTICLES = {"a", "an", "the"}


def normalize_answer(text: str) -> str:
    """VQA answer normalisation: caption normalisation, articles dropped, number words -> digits."""
    words = [w for w in normalize_caption(text).split() if w not in _ARTICLES]
    return " ".join(str(NUMBER_WORDS[w]) if w in NUMBER_WORDS and w != "single" else w for w in words)


# --------------------------------------------------------------------------- METEOR
def _meteor_jar() -> Path:
    spec = importlib.util.find_spec("pycocoevalcap.meteor.meteor")
    if spec is None or spec.origin is None:
        raise MetricsUnavailableError("pycocoevalcap is not installed: pip install pycocoevalcap==1.2")
    jar = Path(spec.origin).parent / "meteor-1.5.jar"
    if not jar.is_file():
        raise MetricsUnavailableError(f"METEOR jar not found at {jar}; reinstall pycocoevalcap")
    return jar


class MeteorScorer:
    """METEOR 1.5 over its ``-stdio`` protocol, as pycocoevalcap does, in a context-managed JVM.

    Differences from ``pycocoevalcap.meteor.Meteor``: the JVM is closed deterministically (``close`` /
    ``with``), its stderr goes to a temporary file (a full stderr pipe cannot block it, and a crash is
    reported with its message), it uses the serial GC (no GC thread per core on a shared 2-core machine)
    and a missing ``java`` raises :class:`MetricsUnavailableError`.
    """

    def __init__(self, max_heap: str = "2G") -> None:
        java = shutil.which("java")
        if java is None:
            raise MetricsUnavailableError(
                "METEOR needs Java, and no 'java' is on PATH: install a JRE (e.g. apt-get install "
                "openjdk-17-jre-headless) or compute the other metrics with meteor=False"
            )
        jar = _meteor_jar()
        self._stderr = tempfile.TemporaryFile()
        cmd = [java, "-XX:+UseSerialGC", f"-Xmx{max_heap}", "-jar", str(jar),
               "-", "-", "-stdio", "-l", "en", "-norm"]
        self._proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            cmd, cwd=str(jar.parent), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr
        )

    def _readline(self) -> str:
        assert self._proc is not None and self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            self._stderr.seek(0)
            err = self._stderr.read().decode(errors="replace").strip()[-2000:]
            raise MetricsUnavailableError(f"METEOR (java) stopped unexpectedly: {err or 'no message'}")
        return line.decode().strip()

    def _send(self, line: str) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        try:
            self._proc.stdin.write((line + "\n").encode())
            self._proc.stdin.flush()
        except BrokenPipeError as exc:
            self._readline()  # raises with the JVM's message
            raise MetricsUnavailableError("METEOR (java) closed its input") from exc

    def compute_score(self, gts: Mapping[Any, list[str]], res: Mapping[Any, list[str]]) -> tuple[float, list[float]]:
        """Same contract as pycocoevalcap scorers: corpus score and per-image scores."""
        if self._proc is None:
            raise RuntimeError("MeteorScorer is closed")
        ids = list(gts.keys())
        stats = []
        for i in ids:
            hyp = res[i][0].replace("|||", "").replace("  ", " ")
            refs = [r.replace("|||", "") for r in gts[i]]
            self._send(" ||| ".join(("SCORE", " ||| ".join(refs), hyp)))
            stats.append(self._readline())
        self._send("EVAL ||| " + " ||| ".join(stats))
        scores = [float(self._readline()) for _ in ids]
        return float(self._readline()), scores

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                if proc.stdin is not None:
                    proc.stdin.close()
                proc.wait(timeout=10)
            except (subprocess.TimeoutExpired, OSError):
                proc.kill()
                proc.wait()
            finally:
                if proc.stdout is not None:
                    proc.stdout.close()
        self._stderr.close()

    def __enter__(self) -> "MeteorScorer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # last resort; close() is the normal path
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


# --------------------------------------------------------------------------- captions
def _prepare(predictions: Mapping[Any, str], references: Mapping[Any, Sequence[str]]) -> tuple[dict, dict]:
    if not predictions:
        raise UserInputError("no predictions to score")
    missing_refs = [k for k in predictions if k not in references]
    missing_preds = [k for k in references if k not in predictions]
    if missing_refs or missing_preds:
        raise UserInputError(
            "predictions and references must cover the same images: "
            f"{len(missing_preds)} without a prediction (e.g. {missing_preds[:5]}), "
            f"{len(missing_refs)} without references (e.g. {missing_refs[:5]})"
        )
    gts: dict[Any, list[str]] = {}
    res: dict[Any, list[str]] = {}
    for key in predictions:
        refs = [normalize_caption(r) for r in references[key]]
        refs = [r for r in refs if r]
        if not refs:
            raise UserInputError(f"image {key!r} has no non-empty reference caption")
        gts[key] = refs
        # an empty candidate scores 0 but must not break the scorers' tokenisation
        res[key] = [normalize_caption(predictions[key]) or "<empty>"]
    return gts, res


def caption_metrics(
    predictions: Mapping[int, str],
    references: Mapping[int, Sequence[str]],
    meteor: bool = True,
    meteor_scorer: MeteorScorer | None = None,
) -> dict[str, float]:
    """BLEU-1..4, METEOR, ROUGE-L, CIDEr for ``{image_id: caption}`` against ``{image_id: [refs]}``.

    METEOR starts a JVM (15-30 s on 2 busy cores); pass an open ``meteor_scorer`` to reuse one across
    calls (the caller closes it), or ``meteor=False`` to skip it.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts, res = _prepare(predictions, references)
    out: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for n, value in enumerate(bleu, start=1):
        out[f"BLEU-{n}"] = float(value)
    if meteor_scorer is not None:
        out["METEOR"] = float(meteor_scorer.compute_score(gts, res)[0])
    elif meteor:
        with MeteorScorer() as scorer:
            out["METEOR"] = float(scorer.compute_score(gts, res)[0])
    out["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return {k: out[k] for k in CAPTION_METRICS if k in out}


def per_image_cider(predictions: Mapping[int, str], references: Mapping[int, Sequence[str]]) -> dict[int, float]:
    """Each image's CIDEr (its mean over the images is :func:`caption_metrics`' CIDEr: IDF over them all)."""
    from pycocoevalcap.cider.cider import Cider

    gts, res = _prepare(predictions, references)
    _, scores = Cider().compute_score(gts, res)
    return {key: float(score) for key, score in zip(gts, scores)}


def naming_scores(named: Sequence[set[str]], shown: Sequence[set[str]]) -> dict[str, Any]:
    """How well captions name what images show (one set of names per image on each side): ``recall`` (of the
    shown names, the share named), ``precision`` (of the named ones, the share shown), ``all_named`` (images
    whose shown names are all named), ``exact`` (images named exactly), ``per_name`` recall / precision, and
    ``images``; over the images with two names or more shown too (``mixed``)."""
    if len(named) != len(shown):
        raise ValueError("one set of names per image on each side")

    def scores(pairs: list[tuple[set[str], set[str]]]) -> dict[str, Any]:
        right = sum(len(n & s) for n, s in pairs)
        n_named, n_shown = sum(len(n) for n, _ in pairs), sum(len(s) for _, s in pairs)
        return {"images": len(pairs), "recall": right / n_shown if n_shown else None,
                "precision": right / n_named if n_named else None,
                "all_named": sum(s <= n for n, s in pairs) / len(pairs) if pairs else None,
                "exact": sum(s == n for n, s in pairs) / len(pairs) if pairs else None}

    pairs = list(zip(named, shown))
    per_name = {}
    for name in sorted(set().union(*named, *shown)):
        as_shown = [n for n, s in pairs if name in s]
        as_named = [s for n, s in pairs if name in n]
        per_name[name] = {"shown": len(as_shown), "named": len(as_named),
                          "recall": sum(name in n for n in as_shown) / len(as_shown) if as_shown else None,
                          "precision": sum(name in s for s in as_named) / len(as_named) if as_named else None}
    return {**scores(pairs), "mixed": scores([(n, s) for n, s in pairs if len(s) > 1]), "per_name": per_name}


# --------------------------------------------------------------------------- VQA
def answers_match(prediction: str, gold: str) -> bool:
    """Exact match after :func:`normalize_answer`; yes/no gold compared with the prediction's first word."""
    p, g = normalize_answer(prediction), normalize_answer(gold)
    if g in ("yes", "no"):
        return p.split()[:1] == [g]
    return p == g


def vqa_accuracy(records: Sequence[VQARecord], predictions: Mapping[Any, str]) -> dict[str, Any]:
    """Accuracy overall and per question type; ``predictions`` maps ``question_id`` to the answer.

    Returns ``{"overall", "per_type": {type: acc}, "count", "per_type_count", "missing"}``. Question ids are
    matched as given, or as strings when the two sides disagree on int vs str.
    """
    if not records:
        raise UserInputError("no VQA records to score")
    return score_by_type(records, predictions, lambda pred, r: answers_match(pred, r.answer))


def score_by_type(records: Sequence[VQARecord], predictions: Mapping[Any, str],
                  match: Callable[[str, VQARecord], bool]) -> dict[str, Any]:
    """``overall`` and ``per_type`` accuracy of ``predictions`` (question id -> answer; ids matched as given or as
    strings) under ``match``, with ``count``, ``per_type_count`` and ``missing`` (no prediction: wrong)."""
    by_str = {str(k): v for k, v in predictions.items()}
    correct: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    missing = 0
    for r in records:
        pred = predictions.get(r.question_id, by_str.get(str(r.question_id)))
        total[r.question_type] += 1
        if pred is None:
            missing += 1
        elif match(pred, r):
            correct[r.question_type] += 1
    if missing:
        log.warning("%d of %d questions have no prediction (counted as wrong)", missing, len(records))
    n = sum(total.values())
    return {
        "overall": sum(correct.values()) / n,
        "per_type": {t: correct[t] / total[t] for t in sorted(total)},
        "count": n,
        "per_type_count": dict(sorted(total.items())),
        "missing": missing,
    }


# --------------------------------------------------------------------------- RSVQA
#: RSVQA question types and the answer each gets when the generated text names none (the commoner or the
#: safest answer: ``no``, ``rural``, ``0``, ``0m2``).
RSVQA_DEFAULTS: dict[str, str] = {"presence": "no", "comp": "no", "rural_urban": "rural", "count": "0", "area": "0m2"}
#: Upper bounds of the RSVQA buckets for counts and areas: 0, 1-10, 11-100, 101-1000, >1000.
RSVQA_BUCKETS: tuple[float, ...] = (0, 10, 100, 1000)
NUMERIC_TYPES: frozenset[str] = frozenset({"count", "area"})

_YES = frozenset({"yes", "yeah", "yep", "true", "correct", "indeed", "certainly"})
_NO = frozenset({"no", "not", "none", "nothing", "nope", "false", "neither", "nor", "zero", "0", "without",
                 "isnt", "arent", "dont", "doesnt", "cannot", "cant", "absent", "never"})
_AFFIRM = frozenset({"there", "is", "are", "present", "exists", "exist", "has", "have", "some", "more", "less",
                     "fewer"})
_URBAN = frozenset({"urban", "suburban", "city", "town", "downtown", "built", "residential"})
_RURAL = frozenset({"rural", "countryside", "village", "farmland", "farmlands", "agricultural", "farm", "farms",
                    "fields", "field", "forest", "meadow", "cropland"})
_SMALL_NUMBERS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen".split())} | {"single": 1}
_TENS = {w: 10 * i for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split(), start=2)}
_SCALES = {"hundred": 100, "thousand": 1000, "million": 1_000_000}
_AREA_UNITS = {"unitkm": 1_000_000.0, "unitha": 10_000.0, "unitm": 1.0}
# spellings of area units -> placeholder tokens (km before m; "m2" inside "120m2" too)
_UNIT_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(?:(?<![a-z])km\s*(?:2|\u00b2|\^2)|sq\.?\s*km\b|square\s+kilomet(?:er|re)s?)"), " unitkm "),
    (re.compile(r"(?:\bhectares?\b|(?<=\d)\s*ha\b)"), " unitha "),
    (re.compile(r"(?:(?<![a-z])m\s*(?:2|\u00b2|\^2)(?!\d)|\bsq\.?\s*m\b|\bsqm\b|square\s+met(?:er|re)s?"
                r"|(?<=\d)\s*m\b)"), " unitm "),
)
_TOKEN = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d*\.\d+|\d+|[a-z]+")


def _number_tokens(text: str) -> list[str]:
    text = str(text).lower().replace("\u2019", "").replace("'", "")
    for pattern, token in _UNIT_PATTERNS:
        text = pattern.sub(token, text)
    return _TOKEN.findall(text)


def _is_digits(token: str) -> bool:
    return token[:1].isdigit() or (token[:1] == "." and token[1:2].isdigit())


def _is_number_word(tokens: Sequence[str], i: int) -> bool:
    t = tokens[i]
    if t in _SMALL_NUMBERS or t in _TENS:
        return True
    follows = tokens[i + 1] if i + 1 < len(tokens) else ""
    return t in ("a", "an") and (follows in _SCALES or follows == "dozen")


def _number_at(tokens: Sequence[str], i: int) -> tuple[float, int]:
    """The number starting at ``tokens[i]`` (digits, or number words such as "twenty three", "a hundred",
    "two thousand five hundred") and the index after it; "1.2 thousand" scales too."""
    if _is_digits(tokens[i]):
        value, j = float(tokens[i].replace(",", "")), i + 1
        if j < len(tokens) and tokens[j] in _SCALES:
            value, j = value * _SCALES[tokens[j]], j + 1
        return value, j
    total, current, j = 0.0, 0.0, i
    if tokens[j] in ("a", "an"):
        current, j = 1.0, j + 1
    while j < len(tokens):
        word = tokens[j]
        if word in _SMALL_NUMBERS:
            current += _SMALL_NUMBERS[word]
        elif word in _TENS:
            current += _TENS[word]
        elif word == "dozen":
            current = (current or 1.0) * 12
        elif word == "hundred":
            current = (current or 1.0) * 100
        elif word in _SCALES:
            total, current = total + (current or 1.0) * _SCALES[word], 0.0
        elif not (word == "and" and j + 1 < len(tokens) and _is_number_word(tokens, j + 1)):
            break
        j += 1
    return total + current, j


def parse_quantity(text: str) -> tuple[float, str | None] | None:
    """The first number in ``text`` and the area unit placeholder right after it (``unitm``, ``unitha``,
    ``unitkm`` or None); None when the text holds no number."""
    tokens = _number_tokens(text)
    for i in range(len(tokens)):
        if _is_digits(tokens[i]) or _is_number_word(tokens, i):
            value, j = _number_at(tokens, i)
            unit = tokens[j] if j < len(tokens) and tokens[j] in _AREA_UNITS else None
            return value, unit
    return None


def _first_of(words: Sequence[str], *groups: frozenset[str]) -> int | None:
    """Which group the earliest word of ``words`` that is in one of ``groups`` belongs to."""
    for word in words:
        for k, group in enumerate(groups):
            if word in group:
                return k
    return None


def normalize_rsvqa_answer(text: str, question_type: str) -> str:
    """A generated (or reference) answer in RSVQA's own vocabulary for its question type.

    - ``presence`` / ``comp``: ``yes`` | ``no``. A leading yes-word or no-word decides ("Yes, there is." ->
      ``yes``); else any negation ("there are no buildings", "none") -> ``no``; else a statement of presence
      or comparison ("There is a road.", "more roads") -> ``yes``; else ``no``.
    - ``rural_urban``: ``rural`` | ``urban``, from the first word that names either ("an urban area", "a
      city", "countryside"; "not urban" -> ``rural``); else ``rural``.
    - ``count``: the first number as an integer, digits or words ("There are about twelve buildings" ->
      ``12``, "1,200" -> ``1200``); no number: a negation -> ``0``, "there is a/an ..." -> ``1``, else ``0``.
    - ``area``: the first number in square metres, rounded, with RSVQA's ``m2`` suffix ("about 120 m2", "120
      square metres", "120m²" -> ``120m2``; "2 hectares" -> ``20000m2``; "0.5 km2" -> ``500000m2``; a bare
      number counts as m2); no number -> ``0m2``.
    - any other type: :func:`normalize_answer`.
    The function is idempotent: a reference answer ("yes", "3", "120m2") maps to itself.
    """
    question_type = str(question_type)
    words = normalize_caption(text).split()
    if question_type in ("presence", "comp"):
        if words and words[0] in _YES:
            return "yes"
        if words and words[0] in _NO:
            return "no"
        if any(w in _NO for w in words):
            return "no"
        if any(w in _YES or w in _AFFIRM for w in words):
            return "yes"
        return RSVQA_DEFAULTS[question_type]
    if question_type == "rural_urban":
        for i, word in enumerate(words):
            negated = i > 0 and words[i - 1] in ("not", "non", "nor")
            if word in _URBAN:
                return "rural" if negated else "urban"
            if word in _RURAL:
                return "urban" if negated else "rural"
        return RSVQA_DEFAULTS["rural_urban"]
    if question_type in NUMERIC_TYPES:
        quantity = parse_quantity(text)
        if quantity is None:  # "there is a house": one; anything else without a number: the default 0
            one = re.search(r"\bthere\s+is\s+(?:a|an)\b", " ".join(words)) and not any(w in _NO for w in words)
            value = 1.0 if question_type == "count" and one else 0.0
        else:
            value = quantity[0] * (_AREA_UNITS[quantity[1]] if question_type == "area" and quantity[1] else 1.0)
        number = str(int(round(max(value, 0.0))))
        return number + "m2" if question_type == "area" else number
    return normalize_answer(text)


def rsvqa_bucket(value: float) -> int:
    """RSVQA's bucket of a count or an area: 0 -> 0, 1-10 -> 1, 11-100 -> 2, 101-1000 -> 3, >1000 -> 4."""
    if value <= 0:
        return 0
    for k, upper in enumerate(RSVQA_BUCKETS[1:], start=1):
        if value <= upper:
            return k
    return len(RSVQA_BUCKETS)


def rsvqa_answers_match(prediction: str, gold: str, question_type: str) -> bool:
    """Both sides normalised for the type; counts and areas by bucket, the rest by exact match."""
    p = normalize_rsvqa_answer(prediction, question_type)
    g = normalize_rsvqa_answer(gold, question_type)
    if question_type in NUMERIC_TYPES:
        return rsvqa_bucket(float(p.removesuffix("m2"))) == rsvqa_bucket(float(g.removesuffix("m2")))
    return p == g


def rsvqa_accuracy(records: Sequence[VQARecord], predictions: Mapping[Any, str]) -> dict[str, Any]:
    """RSVQA accuracy: ``per_type`` ({type: accuracy}), ``average`` (the mean over types, RSVQA's AA),
    ``overall`` (over all questions, OA), ``count``, ``per_type_count``, ``missing`` (no prediction: wrong)
    and the ``buckets`` counts and areas are scored in. ``predictions`` maps ``question_id`` to an answer
    (raw or already normalised)."""
    if not records:
        raise UserInputError("no RSVQA questions to score")
    scores = score_by_type(records, predictions, lambda pred, r: rsvqa_answers_match(pred, r.answer, r.question_type))
    per_type = scores["per_type"]
    return {
        "average": sum(per_type.values()) / len(per_type),
        **scores,
        "buckets": "count and area: 0, 1-10, 11-100, 101-1000, >1000",
    }
