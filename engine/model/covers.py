"""Land-cover sentences: the phrasing the lite model learnt for wide Sentinel-2 tiles, and how several tiles'
sentences make one for the region they cover.

A cover sentence names the setting, the main land cover and the others by area: ``This is a rural area of
farmland with a forest and a river.`` (the EuroSAT mosaics' derived captions teach it:
:mod:`training.data.mosaics`). A region seen coarser than the model's trained range (a whole Sentinel-2 scene
in one image) is captioned on tiles the model knows, and :func:`compose_cover_sentences` writes the region's
sentence from the tiles': the main cover most tiles name first, then every other cover any tile names, the
most often named first.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

#: How each land cover reads in a cover sentence: (as the main cover, as a further one); a river and a highway
#: are never the main one.
COVER_FORMS: dict[str, tuple[str | None, str]] = {
    "farmland": ("farmland", "farmland"), "forest": ("forest", "a forest"), "grassland": ("grassland", "grassland"),
    "houses": ("houses", "houses"), "industrial buildings": ("industrial buildings", "industrial buildings"),
    "water": ("water", "a lake"), "river": (None, "a river"), "highway": (None, "a highway"),
    "beach": (None, "a beach"), "sea": (None, "the sea"),
}
#: Words by which a caption of another kind (``This is a part of a beach with blue water and white sand .``)
#: mentions a cover; "trees" is no forest (a park, a garden, a few along a road).
_MENTIONS: tuple[tuple[str, re.Pattern[str]], ...] = tuple((cover, re.compile(rf"\b(?:{words})\b", re.IGNORECASE))
                                                            for cover, words in (
    ("farmland", r"farmlands?|croplands?|fields?|pastures?"), ("forest", r"forests?|woods|woodland"),
    ("grassland", r"grasslands?|meadows?"), ("houses", r"houses|residential|village"),
    ("industrial buildings", r"industrial"), ("water", r"lakes?|ponds?"), ("river", r"rivers?"),
    ("highway", r"highways?"), ("beach", r"beach(?:es)?"), ("sea", r"sea|ocean"),
))
#: The most further covers a composed sentence names.
MAX_FURTHER_COVERS = 4

_SENTENCE = re.compile(r"^this is an? (?P<setting>rural|urban) area of (?P<main>[a-z ]+?)"
                       r"(?: with (?P<others>[a-z ,]+?))?\s*\.?$", re.IGNORECASE)
_COVER_OF_PHRASE = {form: cover for cover, forms in COVER_FORMS.items() for form in forms if form}


@dataclass(frozen=True)
class CoverSentence:
    """A parsed cover sentence: ``setting`` (rural / urban), the ``main`` cover, the ``others`` in order
    (covers as :data:`COVER_FORMS` keys; a phrase the table lacks is kept as written)."""

    setting: str
    main: str
    others: tuple[str, ...]


def _cover(phrase: str) -> str:
    phrase = " ".join(phrase.lower().split())
    return _COVER_OF_PHRASE.get(phrase, phrase)


def join_words(items: Sequence[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def parse_cover_sentence(text: str) -> CoverSentence | None:
    """The cover sentence ``text`` is, or None when it is another kind of caption."""
    match = _SENTENCE.match(" ".join(text.split()))
    if match is None:
        return None
    others = match.group("others")
    parts = re.split(r",\s*|\s+and\s+", others) if others else []
    if any(not p.strip() for p in parts):
        return None
    return CoverSentence(match.group("setting").lower(), _cover(match.group("main")),
                         tuple(dict.fromkeys(_cover(p) for p in parts)))


def covers_mentioned(caption: str) -> list[str]:
    """The covers a caption of any kind mentions, in the order it mentions them."""
    found = [(m.start(), cover) for cover, pattern in _MENTIONS for m in [pattern.search(caption)] if m]
    return [cover for _, cover in sorted(found)]


def compose_cover_sentences(tiles: Sequence[CoverSentence | Sequence[str]]) -> str:
    """One cover sentence for a region from its tiles': each a cover sentence, or the covers another kind of
    caption mentions (:func:`covers_mentioned`). The setting and main cover most cover sentences give (ties: the
    first one's), then the other covers any tile names, the most often named first (ties: in the tiles' order),
    at most :data:`MAX_FURTHER_COVERS`."""
    sentences = [t for t in tiles if isinstance(t, CoverSentence)]
    if not sentences:
        raise ValueError("no cover sentences to compose")
    mains = Counter(s.main for s in sentences)
    main = max(mains, key=lambda m: (mains[m], -[s.main for s in sentences].index(m)))
    settings = Counter(s.setting for s in sentences if s.main == main)
    setting = max(settings, key=lambda x: (settings[x], x == "rural"))
    named: Counter[str] = Counter()
    order: dict[str, int] = {}
    for covers in [(t.main, *t.others) if isinstance(t, CoverSentence) else tuple(dict.fromkeys(t)) for t in tiles]:
        for cover in covers:
            if cover != main:
                named[cover] += 1
                order.setdefault(cover, len(order))
    others = sorted(named, key=lambda c: (-named[c], order[c]))[:MAX_FURTHER_COVERS]
    main_words = (COVER_FORMS.get(main, (main, main))[0] or main)
    area = f"an {setting} area" if setting[0] in "aeiou" else f"a {setting} area"
    if not others:
        return f"This is {area} of {main_words}."
    return f"This is {area} of {main_words} with {join_words([COVER_FORMS.get(c, (c, c))[1] for c in others])}."
