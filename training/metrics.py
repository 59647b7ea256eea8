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
"""
from __future__ import annotations

import importlib.util
import logging
import shutil
import subprocess
import tempfile
import unicodedata
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping, Sequence

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
    by_str = {str(k): v for k, v in predictions.items()}
    correct: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    missing = 0
    for r in records:
        pred = predictions.get(r.question_id, by_str.get(str(r.question_id)))
        total[r.question_type] += 1
        if pred is None:
            missing += 1
            continue
        if answers_match(pred, r.answer):
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
