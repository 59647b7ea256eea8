"""Word lists behind the sub-task targets and the UCM-derived VQA set.

Built from the vocabulary of UCM-captions and Sydney-captions (about 450 distinct words, typos included)
plus the class names of RSICD and NWPU-RESISC45. Everything here is data: the rules live in
:mod:`training.data.subtasks` and :mod:`training.data.ucm_vqa`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class SceneClass:
    """A land-use class: readable phrase, words that name the scene in a caption, rural/urban answer, and the
    class-based sentences used when no reference caption fits a sub-task."""

    phrase: str
    aliases: tuple[str, ...]
    setting: str | None  # "rural" | "urban" | None (ambiguous: no rural/urban question)
    objects_fallback: str
    relations_fallback: str


#: UCM Merced land-use classes (the ``class`` field of UCM-captions).
UCM_CLASSES: dict[str, SceneClass] = {
    "agricultural": SceneClass(
        "agricultural area", ("agricultural", "farmland", "cropland", "field", "fields"), "rural",
        "There are crop fields.", "The fields cover the whole area."),
    "airplane": SceneClass(
        "airport", ("airport", "ariport"), "urban",
        "There is an airplane at the airport.", "The airplane stands on the apron of the airport."),
    "baseballdiamond": SceneClass(
        "baseball diamond", ("baseball diamond", "baseball field"), None,
        "There is a baseball diamond with sand and grass.", "The sandy infield lies within the grass field."),
    "beach": SceneClass(
        "beach", ("beach", "coast", "shore", "seaside"), "rural",
        "There are sand and sea water.", "The sand beach lies along the water."),
    "buildings": SceneClass(
        "built-up area", ("buildings", "building", "industrial area", "commercial area", "town"), "urban",
        "There are many buildings.", "The buildings stand close to each other."),
    "chaparral": SceneClass(
        "chaparral", ("chaparral", "shrubland"), "rural",
        "There are shrubs on the bare ground.", "The shrubs are scattered across the ground."),
    "denseresidential": SceneClass(
        "dense residential area", ("dense residential", "residential area"), "urban",
        "There are many houses.", "The houses are pressed closely together."),
    "forest": SceneClass(
        "forest", ("forest", "woods"), "rural",
        "There are many trees.", "The trees cover the whole area."),
    "freeway": SceneClass(
        "freeway", ("freeway", "freeways", "highway", "highways"), "urban",
        "There is a freeway with several lanes.", "The lanes of the freeway run parallel to each other."),
    "golfcourse": SceneClass(
        "golf course", ("golf course",), None,
        "There are green turfs and sand bunkers.", "The sand bunkers are scattered across the turf."),
    "harbor": SceneClass(
        "harbor", ("harbor", "harbour", "port", "marina"), "urban",
        "There are many boats.", "The boats are docked along the piers."),
    "intersection": SceneClass(
        "intersection", ("intersection", "crossroad", "crossroads", "junction"), "urban",
        "There are two roads.", "The roads cross each other."),
    "mediumresidential": SceneClass(
        "medium residential area", ("medium residential", "residential area"), "urban",
        "There are some houses.", "The houses are arranged along the roads."),
    "mobilehomepark": SceneClass(
        "mobile home park", ("mobile home park",), "urban",
        "There are many mobile homes.", "The mobile homes are arranged in rows."),
    "overpass": SceneClass(
        "overpass", ("overpass", "viaduct"), "urban",
        "There is an overpass with roads.", "One road goes over the other roads."),
    "parkinglot": SceneClass(
        "parking lot", ("parking lot",), "urban",
        "There are many cars.", "The cars are parked in rows."),
    "river": SceneClass(
        "river", ("river",), "rural",
        "There is a river with plants on its banks.", "The river flows through the area."),
    "runway": SceneClass(
        "runway", ("runway", "airport"), None,
        "There is a runway with white mark lines.", "The mark lines run along the runway."),
    "sparseresidential": SceneClass(
        "sparse residential area", ("sparse residential", "residential area"), None,
        "There are a few houses with trees and lawns.", "The houses are scattered among trees and lawns."),
    "storagetanks": SceneClass(
        "storage tank area", ("storage tank", "storage tanks"), "urban",
        "There are some storage tanks.", "The storage tanks stand on the ground."),
    "tenniscourt": SceneClass(
        "tennis court", ("tennis court", "tennis courts"), "urban",
        "There is a tennis court.", "The tennis court is surrounded by other facilities."),
}

#: Readable phrases for class names of other Karpathy-format sets (RSICD, NWPU-RESISC45, Sydney).
OTHER_CLASS_PHRASES: dict[str, str] = {
    "bareland": "bare land",
    "baseballfield": "baseball field",
    "center": "city center",
    "commercial": "commercial area",
    "denseresidential": "dense residential area",
    "industrial": "industrial area",
    "mediumresidential": "medium residential area",
    "sparseresidential": "sparse residential area",
    "parking": "parking lot",
    "playground": "playground",
    "railwaystation": "railway station",
    "storagetanks": "storage tank area",
    "circular_farmland": "circular farmland",
    "rectangular_farmland": "rectangular farmland",
    "ground_track_field": "ground track field",
    "thermal_power_station": "thermal power station",
    "sea_ice": "sea ice",
    # EuroSAT (Sentinel-2 land cover)
    "annualcrop": "annual cropland",
    "permanentcrop": "permanent cropland",
    "herbaceousvegetation": "herbaceous vegetation",
    "sealake": "sea or lake",
    "residential": "residential area",
}

#: Words that name a scene when the class is unknown (RSICD / NWPU / Sydney scene names and generic ones).
SCENE_TERMS: tuple[str, ...] = (
    "dense residential area", "medium residential area", "sparse residential area", "mobile home park",
    "residential area", "industrial area", "commercial area", "parking lot", "golf course", "baseball diamond",
    "baseball field", "tennis court", "storage tanks", "railway station", "train station", "power station",
    "city center", "bare land", "playground", "stadium", "airport", "runway", "harbor", "harbour", "port",
    "beach", "forest", "river", "lake", "pond", "desert", "meadow", "grassland", "farmland", "cropland",
    "chaparral", "mountain", "island", "wetland", "overpass", "viaduct", "freeway", "highway", "intersection",
    "bridge", "church", "school", "park", "square", "resort", "ocean", "sea", "town", "city", "area",
)


@dataclass(frozen=True)
class ObjectTerm:
    """An object noun: canonical name, question forms, the surface forms (typos included) that mention it."""

    name: str
    singular: str
    plural: str
    forms_singular: tuple[str, ...]
    forms_plural: tuple[str, ...]
    countable: bool = True  # may appear in count questions
    presence: bool = True  # may appear in presence questions


def _obj(name: str, plural: str, sing: tuple[str, ...] = (), plur: tuple[str, ...] = (),
         countable: bool = True, presence: bool = True, singular: str | None = None) -> ObjectTerm:
    singular = singular or name
    return ObjectTerm(name, singular, plural, (singular, *sing), (plural, *plur), countable, presence)


#: Objects the captions mention. Land cover (plants, grass, sand, water...) is listed as non-countable,
#: non-presence: it counts as an object for the objects target but is never asked about.
OBJECT_TERMS: tuple[ObjectTerm, ...] = (
    _obj("mobile home", "mobile homes"),
    _obj("storage tank", "storage tanks", ("tank",), ("tanks",)),
    _obj("tennis court", "tennis courts"),
    _obj("basketball court", "basketball courts"),
    _obj("baseball diamond", "baseball diamonds", ("baseball field",), ("baseball fields",)),
    _obj("swimming pool", "swimming pools", ("pool",), ("pools",)),
    _obj("parking lot", "parking lots"),
    _obj("house", "houses", ("villa", "houese", "home"), ("villas", "hosues", "homes")),
    _obj("building", "buildings", ("buliding",), ("bulidings", "buildingse")),
    _obj("warehouse", "warehouses"),
    _obj("car", "cars", ("luggage car", "lugage car", "truck", "bus"),
         ("luggage cars", "lugage cars", "casr", "trucks", "buses")),
    _obj("airplane", "airplanes", ("ariplane", "plane", "aircraft"), ("ariplanes", "planes")),
    _obj("boat", "boats", ("ship", "speedboat", "sppedboat", "yacht"), ("ships", "speedboats", "yachts")),
    _obj("container", "containers", (), ("containters",)),
    _obj("road", "roads", ("street",), ("raods", "streets")),
    _obj("freeway", "freeways", ("highway",), ("highways",)),
    _obj("runway", "runways", (), ("ruwnays",)),
    _obj("overpass", "overpasses", (), (), countable=False),
    _obj("bridge", "bridges"),
    _obj("railway", "railways", ("railroad",), ("railroads",)),
    _obj("river", "rivers", (), (), countable=False),
    _obj("tree", "trees", (), ("tress", "tres")),
    _obj("bunker", "bunkers", (), ("bukers",)),
    _obj("pond", "ponds"),
    _obj("stadium", "stadiums", (), (), countable=False),
    _obj("person", "people", (), ("pedestrians", "persons"), countable=False, presence=False),
    _obj("roof", "roofs", (), ("roofss", "foofs"), countable=False, presence=False),
    _obj("mark line", "mark lines", ("marking line", "marking", "arrow"), ("marking lines", "markings", "marks", "arrows"),
         countable=False, presence=False),
    _obj("parking space", "parking spaces", ("parking spot",), ("parking spots",), countable=False, presence=False),
    _obj("plant", "plants", (), ("plamts", "plantss", "palnts"), countable=False, presence=False),
    _obj("bush", "bushes", ("shrub",), ("shrubs", "bunshes"), countable=False, presence=False),
    _obj("lawn", "lawns", ("lwan",), (), countable=False, presence=False),
    _obj("grass", "grasses", ("grassland",), ("grasslands",), countable=False, presence=False),
    _obj("turf", "turfs", (), (), countable=False, presence=False),
    _obj("sand", "sands", (), ("snds", "snad", "sandlands"), countable=False, presence=False),
    _obj("water", "waters", ("sea", "ocean"), (), countable=False, presence=False),
    _obj("wave", "waves", ("foam",), ("foams", "foasm"), countable=False, presence=False),
    _obj("farmland", "farmlands", ("cropland", "field"), ("croplands", "fields"), countable=False, presence=False),
    _obj("trail", "trails", ("path",), ("paths",), countable=False, presence=False),
    _obj("weed", "weeds", (), (), countable=False, presence=False),
)

#: Multi-word scene names that must not be read as objects ("in the mobile home park").
SCENE_BLOCKERS: tuple[str, ...] = ("mobile home park", "golf course", "railway station", "parking lot area")

#: Everyday objects that a caption often leaves unmentioned; presence negatives use them only for natural-land
#: (rural) classes, and "tree" never.
GENERIC_OBJECTS: frozenset[str] = frozenset({"road", "car", "house", "building", "parking lot", "tree"})
GENERIC_NEVER_NEGATIVE: frozenset[str] = frozenset({"tree"})

#: Per UCM class: objects that may well be in the image even when no caption names them; never asked as a
#: presence negative for that class.
PLAUSIBLE_UNMENTIONED: dict[str, frozenset[str]] = {
    "agricultural": frozenset({"river", "road", "house", "building"}),
    "airplane": frozenset({"runway", "freeway"}),
    "baseballdiamond": frozenset({"tennis court", "swimming pool"}),
    "beach": frozenset({"boat", "river", "house", "building", "road", "car", "parking lot"}),
    "buildings": frozenset({"storage tank", "swimming pool"}),
    "chaparral": frozenset({"river", "road", "house"}),
    "denseresidential": frozenset({"mobile home", "swimming pool", "tennis court"}),
    "forest": frozenset({"river"}),
    "freeway": frozenset({"overpass"}),
    "golfcourse": frozenset({"river", "swimming pool", "tennis court"}),
    "harbor": frozenset({"river"}),
    "intersection": frozenset({"freeway", "overpass"}),
    "mediumresidential": frozenset({"mobile home", "swimming pool", "tennis court"}),
    "mobilehomepark": frozenset({"swimming pool"}),
    "overpass": frozenset({"freeway"}),
    "parkinglot": frozenset(),
    "river": frozenset({"boat", "road", "house", "building"}),
    "runway": frozenset({"airplane"}),
    "sparseresidential": frozenset({"mobile home", "tennis court"}),
    "storagetanks": frozenset(),
    "tenniscourt": frozenset({"swimming pool", "baseball diamond"}),
}

NUMBER_WORDS: dict[str, int] = {
    "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9,
    "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15, "sixteen": 16,
    "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20, "single": 1,
}
DIGIT_WORDS: dict[int, str] = {v: k for k, v in NUMBER_WORDS.items() if k != "single"} | {0: "zero"}

#: Vague quantities ("many", "lots of", "a few"): they quantify an object but give no number.
VAGUE_QUANTIFIERS: tuple[str, ...] = (
    "lots of", "a lot of", "a few", "a number of", "plenty of", "a couple of", "dozens of", "numbers of",
    "some", "many", "several", "few", "numerous", "various", "lots", "ssome", "soem",
)

COLOUR_WORDS: frozenset[str] = frozenset({
    "white", "black", "grey", "gray", "green", "blue", "red", "orange", "brown", "yellow", "purple", "beige",
    "dark", "blue-green", "green-blue", "greenish-blue", "greenblue", "bluegreen", "emerald", "turquoise",
    "pink", "silver", "golden", "colors", "colours", "colored", "coloured",
})
SIZE_SHAPE_WORDS: frozenset[str] = frozenset({
    "big", "small", "large", "huge", "tiny", "long", "short", "wide", "narrow", "tall", "high", "thick",
    "straight", "curved", "curving", "round", "circular", "rectangular", "square", "triangular", "pentagonal",
    "hexagonal", "same", "different", "old", "new", "regular", "empty", "free", "lush", "withered", "verdant",
    "manicured", "wilted", "healthy", "smalle", "size", "sizes", "shape", "shapes",
})
ATTRIBUTE_WORDS: frozenset[str] = COLOUR_WORDS | SIZE_SHAPE_WORDS

#: Words that describe the overall character of a scene (a small bonus for the theme sentence).
CHARACTER_WORDS: frozenset[str] = frozenset({
    "dense", "sparse", "busy", "desolate", "peaceful", "quiet", "beautiful", "crowded", "compact", "large",
    "small", "old", "new", "regular", "straight", "curved", "lush", "green", "open", "complex",
})

#: Spatial / layout phrases (typos from the captions included). Multi-word phrases win over their parts.
SPATIAL_PHRASES: tuple[str, ...] = (
    "next to", "in front of", "side by side", "on both sides", "both sides", "on both banks", "both banks",
    "surrounded by", "surrounded with", "close to", "closed to", "near to", "each other", "pressed together",
    "in rows", "in a row", "rows of", "in lines", "in a line", "in line", "lined up", "at the corners",
    "at the corner", "on the roadside", "at the roadside", "in the middle", "go through", "goes through",
    "going through", "pass through", "passes through", "passed through", "go across", "goes across",
    "fanned out", "in the distance", "far away",
    "beside", "besides", "besid", "beaide", "surrounded", "surounded", "sorrounded", "suttounded", "surround",
    "surrounding", "around", "arround", "along", "alongside", "arranged", "arrange", "neatly", "nratly",
    "orderly", "lined", "parallel", "parrallel", "near", "between", "across", "through", "diagonally",
    "vertical", "vertically", "perpendicular", "intersected", "intersect", "intersects", "crossed",
    "crossing", "go over", "goes over", "passes over", "under", "behind", "above", "below", "adjacent", "opposite", "connected",
    "located", "scattered", "scatteredly", "distributed", "dispersedly", "densely", "desnsely", "sparsely",
    "compactly", "haphazardly", "irregularly", "divided", "devided", "dividede", "separated", "together",
    "inside", "outside", "corner", "corners", "roadside", "roadsides", "middle", "edge", "left", "right",
    "upper", "lower", "triangularly",
)

#: Plain locative prepositions: a weak relation ("an airplane taxiing on the runway"), used only when no
#: caption has a phrase from :data:`SPATIAL_PHRASES`.
WEAK_SPATIAL_PHRASES: tuple[str, ...] = (
    "on the", "on a", "on an", "on it", "on them", "in the", "in a", "at the", "into", "by the",
)

_TOKEN_RE = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")


def tokenize(text: str) -> list[str]:
    """Lower-case word tokens; hyphenated words stay whole, other punctuation is dropped."""
    return _TOKEN_RE.findall(text.lower())


def class_phrase(class_name: str | None) -> str | None:
    """Readable phrase for a class name (``denseresidential`` -> ``dense residential area``)."""
    if not class_name:
        return None
    key = class_name.strip().lower()
    if key in UCM_CLASSES:
        return UCM_CLASSES[key].phrase
    if key in OTHER_CLASS_PHRASES:
        return OTHER_CLASS_PHRASES[key]
    return " ".join(key.replace("_", " ").replace("-", " ").split()) or None


def indefinite(phrase: str) -> str:
    """``a``/``an`` + phrase."""
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase
