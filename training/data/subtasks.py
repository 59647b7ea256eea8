"""Sub-task targets for the three experts and the Instruction Router, derived from reference captions.

Every target is one clean sentence taken from the image's own reference captions whenever one fits, so it
is fluent, true of the image, and in the style the caption metrics reward. The rules are deterministic (no
randomness; ties go to the earlier caption) and a target is never empty.

Sentence clean-up (:func:`clean_sentence`): whitespace collapsed, no space before punctuation, repeated
final stops merged, first letter capitalised, one final full stop. Spelling is left as written.

theme (scene / land-use type and overall character)
    A caption qualifies if it states the scene: it names it (the class phrase or an alias, e.g.
    ``farmland`` for ``agricultural``, ``airport`` for ``airplane``; without a class, any scene word such
    as ``residential area``, ``forest``, ``harbor``) AND either opens with ``this is`` / ``it is`` /
    ``here is`` / ``there is a(n)`` or opens with the scene noun phrase (``A dense forest with ...``,
    ``A part of a golf course ...``; only articles and adjectives before it). "Two tennis courts are
    surrounded by ..." names the class but describes objects, so it does not qualify. Score: 3, +1 for the
    opener, +1 if the scene word is among the first six words, +0.5 for a character word (dense, sparse,
    busy, peaceful, lush, ...), -0.05 per word (concise wins). If the class is known and no caption
    qualifies, the target is ``This is a <class phrase>.``, with the character word the captions most often
    put right before the scene's name (``Lots of green trees constitute a dense forest`` -> ``This is a
    dense forest.``); without a class every caption qualifies. A patchwork of land covers (a EuroSAT mosaic:
    ``parts`` of several classes) is themed by its first derived caption, which names every cover by area
    (``This is a rural area of farmland with a forest and a river.``), not by the class of most parts.
objects (objects with counts and attributes)
    A caption qualifies if it mentions an object (:data:`training.data.vocab.OBJECT_TERMS`: houses,
    cars, airplanes, storage tanks, trees, ...; land cover such as plants, sand or water counts half).
    Score: +1 per distinct object, +2 per object with a number word (``two``, ``four``), +1 per object
    with a vague quantity (``many``, ``lots of``, ``several``, ``a few``, ``some``), +1 per attribute word
    (colour, size, shape, state; at most 3), -0.1 per word beyond 20.
relations (relationships and layout)
    A caption qualifies if it contains a spatial / layout phrase (:data:`training.data.vocab.SPATIAL_PHRASES`:
    ``next to``, ``beside``, ``surrounded by``, ``along``, ``arranged``, ``in rows``, ``in lines``,
    ``on both sides``, ``neatly``, ``lined``, ``parallel``, ``pressed together``, ``go through``, ...).
    Score: +1 per spatial phrase, +0.5 per distinct object (at most 2; a relation needs things to relate).
    When no caption has one, a caption with a plain locative preposition (``on the``, ``in the``,
    ``at the``, ``into``: "an airplane taxiing on the runway") qualifies with a score below any real one.

Distinct sentences: theme is chosen first, then relations, then objects; relations and objects prefer a
caption not already used. When the only qualifying caption is already used by another target, or none
qualifies, the target is the class-based fallback sentence of :data:`training.data.vocab.UCM_CLASSES`
(e.g. dense residential: ``There are many houses.`` / ``The houses are pressed closely together.``);
without a known class it reuses the best qualifying caption, else the longest caption (still a true
sentence about the image). With no captions and no class: ``This is a remote sensing image.`` and
neutral sentences (documented in :data:`EMPTY_FALLBACKS`).

Router target (:func:`router_target`): the plan line of :mod:`engine.model.router_plan`,
``scene: <class phrase, or the scene words the captions use, or unknown> | experts: <experts>``; a caption
instruction uses all experts (theme, objects, relations); a question uses the experts of its type
(:data:`QUESTION_TYPE_EXPERTS`).
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

from engine.model.router_plan import DEFAULT_EXPERTS, RouterPlan, format_router_plan
from training.data.records import CaptionRecord
from training.data.vocab import (
    ATTRIBUTE_WORDS,
    CHARACTER_WORDS,
    NUMBER_WORDS,
    OBJECT_TERMS,
    SCENE_BLOCKERS,
    SCENE_TERMS,
    SPATIAL_PHRASES,
    UCM_CLASSES,
    VAGUE_QUANTIFIERS,
    WEAK_SPATIAL_PHRASES,
    class_phrase,
    indefinite,
    tokenize,
)

EMPTY_FALLBACKS: dict[str, str] = {
    "theme": "This is a remote sensing image.",
    "objects": "No distinct objects are described.",
    "relations": "No particular layout is described.",
}

#: Which experts answer each question type (RSVQA types and the UCM-derived ones).
QUESTION_TYPE_EXPERTS: dict[str, list[str]] = {
    "scene": ["theme"],
    "rural_urban": ["theme"],
    "presence": ["objects"],
    "count": ["objects"],
    "comp": ["objects"],
    "area": ["objects"],
    "relation": ["relations"],
    "relations": ["relations"],
    "spatial": ["relations"],
}

_OPENERS = ("this is", "it is", "here is", "there is a", "there is an", "this image shows", "the image shows")
_MODIFIER_LOOKBACK = 3


# --------------------------------------------------------------------------- phrase matching
class _PhraseIndex:
    """Longest-first, non-overlapping matching of multi-word phrases over a token list."""

    def __init__(self, phrases: Iterable[tuple[str, object]]) -> None:
        self._by_first: dict[str, list[tuple[tuple[str, ...], object]]] = {}
        for phrase, payload in phrases:
            words = tuple(phrase.split())
            self._by_first.setdefault(words[0], []).append((words, payload))
        for entries in self._by_first.values():
            entries.sort(key=lambda e: -len(e[0]))

    def find(self, tokens: Sequence[str]) -> list[tuple[int, int, object]]:
        out: list[tuple[int, int, object]] = []
        i = 0
        while i < len(tokens):
            for words, payload in self._by_first.get(tokens[i], ()):
                if tuple(tokens[i:i + len(words)]) == words:
                    out.append((i, i + len(words), payload))
                    i += len(words)
                    break
            else:
                i += 1
        return out


_OBJECT_INDEX = _PhraseIndex(
    [(b, None) for b in SCENE_BLOCKERS]
    + [(f, (t, False)) for t in OBJECT_TERMS for f in t.forms_singular]
    + [(f, (t, True)) for t in OBJECT_TERMS for f in t.forms_plural]
)
_SPATIAL_INDEX = _PhraseIndex([(p, (p, True)) for p in SPATIAL_PHRASES] + [(p, (p, False)) for p in WEAK_SPATIAL_PHRASES])
_VAGUE_ENDINGS = {tuple(q.split()) for q in VAGUE_QUANTIFIERS}
_OBJECT_BY_NAME = {t.name: t for t in OBJECT_TERMS}


@dataclass
class ObjectMention:
    """An object named in a caption with the quantity in front of it, if any."""

    name: str
    plural: bool
    count: int | None = None  # from number words ("two", "one big and two small" -> 3)
    singular_article: bool = False  # "a house", "an airplane"
    vague: bool = False  # "many", "lots of", "some", ...
    negated: bool = False  # "no car", "without trees"


def _number(token: str) -> int | None:
    if token.isdigit():
        return int(token)
    return NUMBER_WORDS.get(token)


def _skip_modifiers(tokens: Sequence[str], j: int) -> int:
    """Index of the first token before position ``j`` that is not an attribute word (up to 3 skipped)."""
    skipped = 0
    while j >= 0 and skipped < _MODIFIER_LOOKBACK and tokens[j] in ATTRIBUTE_WORDS:
        j -= 1
        skipped += 1
    return j


def _vague_before(tokens: Sequence[str], j: int) -> bool:
    for ending in _VAGUE_ENDINGS:
        n = len(ending)
        if j - n + 1 >= 0 and tuple(tokens[j - n + 1:j + 1]) == ending:
            return True
    return False


def object_mentions(text: str) -> list[ObjectMention]:
    """Objects a caption mentions, in order, with their quantities."""
    tokens = tokenize(text)
    mentions = []
    for start, _end, payload in _OBJECT_INDEX.find(tokens):
        if payload is None:  # a scene name such as "mobile home park"
            continue
        term, plural = payload
        mention = ObjectMention(term.name, plural)
        j = _skip_modifiers(tokens, start - 1)
        if j >= 0:
            number = _number(tokens[j])
            if number is not None:
                total = number
                # coordination: "one big and two small airplanes"
                if j >= 2 and tokens[j - 1] == "and":
                    k = _skip_modifiers(tokens, j - 2)
                    other = _number(tokens[k]) if k >= 0 else None
                    if other is not None:
                        total += other
                mention.count = total
            elif tokens[j] in ("a", "an") and not plural:
                mention.singular_article = True
            elif _vague_before(tokens, j):
                mention.vague = True
            elif tokens[j] in ("no", "without", "not", "nothing"):
                mention.negated = True
        mentions.append(mention)
    return mentions


def spatial_phrases(text: str, weak: bool = False) -> list[str]:
    """Spatial / layout phrases in a caption (longest match wins); ``weak`` adds plain prepositions."""
    return [p for _s, _e, (p, strong) in _SPATIAL_INDEX.find(tokenize(text)) if strong or weak]


# --------------------------------------------------------------------------- sentences
def clean_sentence(text: str) -> str:
    """Tidy one caption into a sentence: spacing, punctuation, capital letter, one final full stop."""
    text = " ".join(str(text).split())
    text = re.sub(r"\s+([.,;:!?])", r"\1", text)
    text = re.sub(r"([.!?])(?:\s*[.!?])+$", r"\1", text)
    text = text.strip(" ,;:")
    if not text:
        return ""
    text = text[0].upper() + text[1:]
    if text[-1] not in ".!?":
        text += "."
    return text


def _contains_phrase(tokens: Sequence[str], phrase: str) -> int | None:
    words = phrase.split()
    for i in range(len(tokens) - len(words) + 1):
        if tokens[i:i + len(words)] == words:
            return i
    return None


def _scene_terms(class_name: str | None) -> tuple[str, ...]:
    info = UCM_CLASSES.get((class_name or "").lower())
    if info is not None:
        return (info.phrase, *info.aliases)
    phrase = class_phrase(class_name)
    if phrase:
        return (phrase, *phrase.split()[-1:])
    return SCENE_TERMS


_SCENE_PREFIX_WORDS = frozenset({"a", "an", "the", "part", "of", "piece", "very", "this"}) | CHARACTER_WORDS | ATTRIBUTE_WORDS


def _theme_score(caption: str, class_name: str | None) -> tuple[float, bool]:
    """Score of a caption as the theme sentence, and whether it states the scene."""
    tokens = tokenize(caption)
    text = " ".join(tokens)
    positions = [p for p in (_contains_phrase(tokens, t) for t in _scene_terms(class_name)) if p is not None]
    if not positions:
        return -0.05 * len(tokens), False
    first = min(positions)
    opener = text.startswith(_OPENERS)
    # "A dense forest with ...", "A part of a golf course ...": the scene noun phrase opens the caption
    leads = all(t in _SCENE_PREFIX_WORDS for t in tokens[:first])
    states = opener or leads
    score = 3.0 + (1.0 if opener else 0.0) + (1.0 if first < 6 else 0.0)
    if any(t in CHARACTER_WORDS for t in tokens):
        score += 0.5
    score -= 0.05 * len(tokens)
    return score, states


def _scene_adjective(captions: Sequence[str], class_name: str | None, phrase: str) -> str | None:
    """The character word most often written right before the scene's name (``a dense forest``)."""
    votes: dict[str, int] = {}
    first_seen: dict[str, int] = {}
    terms = _scene_terms(class_name)
    for caption in captions:
        tokens = tokenize(caption)
        for term in terms:
            pos = _contains_phrase(tokens, term)
            if pos is not None and pos > 0:
                adj = tokens[pos - 1]
                # size words describe the objects ("small storage tanks"), not the scene
                if adj in CHARACTER_WORDS and adj not in ("small", "large") and adj not in phrase.split():
                    votes[adj] = votes.get(adj, 0) + 1
                    first_seen.setdefault(adj, len(first_seen))
                break
    if not votes:
        return None
    return max(votes, key=lambda a: (votes[a], -first_seen[a]))


def _objects_score(caption: str) -> float:
    mentions = [m for m in object_mentions(caption) if not m.negated]
    if not mentions:
        return 0.0
    score = 0.0
    seen: set[str] = set()
    for m in mentions:
        term = _OBJECT_BY_NAME[m.name]
        if m.name not in seen:
            seen.add(m.name)
            score += 1.0 if term.presence else 0.5
        if m.count is not None:
            score += 2.0
        elif m.vague:
            score += 1.0
    tokens = tokenize(caption)
    score += min(3, sum(1 for t in tokens if t in ATTRIBUTE_WORDS))
    score -= 0.1 * max(0, len(tokens) - 20)
    return max(score, 0.01)


def _relations_score(caption: str) -> float:
    strong = spatial_phrases(caption)
    weak = len(spatial_phrases(caption, weak=True)) - len(strong)
    if not strong and not weak:
        return 0.0
    objects = min(2, len({m.name for m in object_mentions(caption)}))
    if strong:
        return len(strong) + 0.5 * objects
    return min(0.75, 0.25 * weak) + 0.1 * objects  # always below any caption with a real spatial phrase


def _best(scores: Sequence[float], exclude: Iterable[int] = ()) -> int | None:
    """Index of the highest positive score (earliest on ties), skipping ``exclude``."""
    excluded = set(exclude)
    best: int | None = None
    for i, s in enumerate(scores):
        if s > 0 and i not in excluded and (best is None or s > scores[best]):
            best = i
    return best


@dataclass
class SubtaskTargets:
    """One target sentence per expert; ``sources`` says which caption each came from (``None``: fallback)."""

    theme: str
    objects: str
    relations: str
    sources: dict[str, int | None] = field(default_factory=dict)

    def as_dict(self) -> dict[str, str]:
        return {"theme": self.theme, "objects": self.objects, "relations": self.relations}

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def derive_subtask_targets(captions: Sequence[str], class_name: str | None = None,
                           theme_index: int | None = None) -> SubtaskTargets:
    """Theme / objects / relations targets for one image (rules in the module docstring); ``theme_index``: the
    caption that is the theme target, whatever the rules would choose (the others go to the other experts)."""
    captions = [c for c in (clean_sentence(c) for c in captions) if c]
    info = UCM_CLASSES.get((class_name or "").lower())
    phrase = class_phrase(class_name)
    sources: dict[str, int | None] = {}

    used: set[int] = set() if theme_index is None else {theme_index}

    def pick(kind: str, scores: list[float], fallback: str | None) -> str:
        idx = _best(scores, exclude=used)
        if idx is None and fallback is None:
            idx = _best(scores)  # no class: reuse a used caption rather than invent one
        if idx is None and fallback is None and captions:
            idx = max(range(len(captions)), key=lambda i: (len(captions[i]), -i))
        sources[kind] = idx
        if idx is not None:
            used.add(idx)
            return captions[idx]
        return fallback or EMPTY_FALLBACKS[kind]

    relations = pick("relations", [_relations_score(c) for c in captions], info.relations_fallback if info else None)
    objects = pick("objects", [_objects_score(c) for c in captions], info.objects_fallback if info else None)
    if theme_index is not None:
        sources["theme"] = theme_index
        return SubtaskTargets(theme=captions[theme_index], objects=objects, relations=relations, sources=sources)
    # theme: only captions that state the scene qualify when the class is known; "This is a <phrase>." else
    theme_scores = []
    for caption in captions:
        score, states = _theme_score(caption, class_name)
        theme_scores.append(max(score + 10.0, 0.01) if (states or not phrase) else 0.0)
    theme_fallback = None
    if phrase:
        adjective = _scene_adjective(captions, class_name, phrase)
        theme_fallback = clean_sentence(f"This is {indefinite(f'{adjective} {phrase}' if adjective else phrase)}")
    theme = pick("theme", theme_scores, theme_fallback)
    return SubtaskTargets(theme=theme, objects=objects, relations=relations, sources=sources)


def targets_for_record(record: CaptionRecord) -> SubtaskTargets:
    """:func:`derive_subtask_targets` for a caption record. A patchwork of land covers (``parts`` of several
    classes: a EuroSAT mosaic) is themed by its first caption, every cover by area, rather than by the class of
    most parts; the other experts draw on the rest."""
    patchwork = len(set(record.parts)) > 1 and len(record.captions) > 1
    return derive_subtask_targets(record.captions, record.class_name, theme_index=0 if patchwork else None)


# --------------------------------------------------------------------------- router targets
def infer_scene(captions: Sequence[str], class_name: str | None = None) -> str | None:
    """The scene phrase: the class phrase if known, else the scene words most captions use, else ``None``."""
    phrase = class_phrase(class_name)
    if phrase:
        return phrase
    votes: dict[str, int] = {}
    for caption in captions:
        tokens = tokenize(caption)
        for term in SCENE_TERMS:  # longest / most specific first
            if term != "area" and _contains_phrase(tokens, term) is not None:
                votes[term] = votes.get(term, 0) + 1
                break
    if not votes:
        return None
    order = {t: i for i, t in enumerate(SCENE_TERMS)}
    return max(votes, key=lambda t: (votes[t], -order[t]))


def experts_for_question(question: str, question_type: str | None = None) -> list[str]:
    """The experts that answer a question: by type (:data:`QUESTION_TYPE_EXPERTS`), else by keywords."""
    if question_type and question_type in QUESTION_TYPE_EXPERTS:
        return list(QUESTION_TYPE_EXPERTS[question_type])
    text = f" {question.lower()} "
    if any(k in text for k in ("how many", "number of", "is there", "are there", "colour", "color")):
        return ["objects"]
    if spatial_phrases(question) or " where " in text:
        return ["relations"]
    return ["theme"]


def router_target(scene: str | None, question: str | None = None, question_type: str | None = None,
                  experts: Sequence[str] = DEFAULT_EXPERTS) -> str:
    """The plan the router should write: all experts for a caption (``question=None``), else by question."""
    chosen = list(experts) if question is None else experts_for_question(question, question_type)
    return format_router_plan(RouterPlan(scene=scene, experts=chosen))


def router_target_for_record(record: CaptionRecord) -> str:
    """Router target for the caption instruction on a caption record."""
    return router_target(infer_scene(record.captions, record.class_name))
