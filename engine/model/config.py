"""RS-MoE configuration: one JSON file (``config.json``) in every model directory.

Variants (``lite``, ``1b``, ``7b``) are configs, not code: see ``engine/model/variants/*.json``.
Paths to pretrained parts are *model references*: ``base:<name>`` for a provisioned base model
(:mod:`engine.base_models`) or a local directory in transformers' format (relative paths are resolved
against the model directory).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from engine.errors import ModelDirError
from engine.model.image_processing import DIHEDRAL_VIEWS, ImageProcessorConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
ADAPTERS_DIR = "adapters"
ROUTER_ADAPTER = "router"


def _from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys with a clear message."""
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ModelDirError(f"unknown {cls.__name__} keys in config: {sorted(unknown)}")
    return cls(**data)


#: efficientnet_lite0 activations (``vision.activation``)
VISION_ACTIVATIONS = ("relu6", "swish")


@dataclass
class VisionConfig:
    """Frozen image encoder. ``type``: ``efficientnet_lite0`` | ``hf`` (any transformers vision model,
    e.g. a CLIP/SigLIP vision tower) | ``instructblip`` (the vision tower of an InstructBLIP checkpoint)."""

    type: str = "efficientnet_lite0"
    path: str = "base:efficientnet-lite0"
    # efficientnet_lite0's activation: ``relu6``, the one its ImageNet weights were trained with (new models), or
    # ``swish``, which models up to v21 were trained with (by mistake: their encoder swapped ReLU6 for Swish)
    activation: str = "swish"
    # > 0: the encoder's last ``tuned_blocks`` blocks (and its head) were fine-tuned on the target domain;
    # their weights are stored in the model directory's model.safetensors (``vision.*``), the rest is the base's
    tuned_blocks: int = 0
    # non-empty: the model has a scene head (a linear layer over the mean visual token, trained with the tuned
    # blocks) that names one of these scenes; the generative Instruction Router takes its plan's scene from it
    scene_classes: list[str] = field(default_factory=list)
    # the scene head averages its logits over this many dihedral views of the image (1: the image as it is;
    # up to 8: the four rotations, with and without a flip), a test-time augmentation for nadir imagery
    scene_views: int = 1
    # the views are encoded only for images whose scene probability from the image as it is stays below this
    # (a confident single view keeps its scene; each further view costs an encoder pass): 1.0 = always
    scene_views_below: float = 1.0
    # a concise caption's plan names the head's scene only when the head's probability for it (softmax over
    # the view-averaged logits) reaches this; below it the plan names no scene and the theme expert gets the
    # neutral phrase (router.unknown_scene), the prompt the dense stage learnt. 0: always name the head's scene.
    # Detailed captions and questions always get the head's scene (on val the gate lowered detailed captions,
    # and the answering experts learnt to answer scene questions from the named scene)
    scene_min_confidence: float = 0.0

    def __post_init__(self) -> None:
        if self.activation not in VISION_ACTIVATIONS:
            raise ModelDirError(f"vision.activation must be one of {', '.join(VISION_ACTIVATIONS)}, "
                                f"got {self.activation!r}")
        if not 1 <= int(self.scene_views) <= DIHEDRAL_VIEWS:
            raise ModelDirError(f"vision.scene_views must be between 1 and {DIHEDRAL_VIEWS}, got {self.scene_views}")
        if not 0.0 <= float(self.scene_views_below) <= 1.0:
            raise ModelDirError(f"vision.scene_views_below must be between 0 and 1, got {self.scene_views_below}")
        if not 0.0 <= float(self.scene_min_confidence) <= 1.0:
            raise ModelDirError(f"vision.scene_min_confidence must be between 0 and 1, got {self.scene_min_confidence}")


@dataclass
class QFormerConfig:
    """Instruction-aware Q-Former. ``init``: ``minilm`` (BERT weights at ``path``, cross-attention new),
    ``instructblip`` (the Q-Former of the InstructBLIP checkpoint at ``path``) or ``random`` (sizes below)."""

    init: str = "minilm"
    path: str | None = "base:minilm-l6"
    num_query_tokens: int = 32
    cross_attention_frequency: int = 1
    max_instruction_tokens: int = 64
    # False: the weights initialised from the BERT checkpoint stay frozen (and are not stored in the model
    # directory); only query tokens, cross-attention, visual norm and projection are trained
    train_base_layers: bool = True
    # used only when init == "random" (tests); otherwise taken from the checkpoint at ``path``
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536


@dataclass
class LLMConfig:
    """Shared base causal LM of the experts and the router. ``type``: ``causal_lm`` (a transformers
    checkpoint) or ``instructblip`` (the language model inside an InstructBLIP checkpoint)."""

    type: str = "causal_lm"
    path: str = "base:smollm2-135m-instruct"
    use_chat_template: bool = True


@dataclass
class LoRASettings:
    """LoRA adapter shape shared by the router and every expert."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class ExpertConfig:
    """One expert: a named LoRA adapter on the base LM with a role and a prompt template.

    ``prompt`` may use ``{scene}`` (the scene the router recognised, or a neutral phrase) and
    ``{instruction}`` (the user's question)."""

    name: str
    role: str
    prompt: str


@dataclass
class RouterConfig:
    """Instruction Router. ``type``: ``generative`` (base LM + the ``router`` adapter writes a plan from the
    image and the instruction) or ``template`` (fixed prompts and keyword routing; fallback and ablation)."""

    type: str = "generative"
    caption_instruction: str = "Describe this remote sensing image."
    concise_instruction: str = "Describe this remote sensing image in one sentence."
    prompt: str = "Plan the answer to: {instruction}"
    concise_prompt: str = "Describe this {scene} image in one sentence."
    answer_prompt: str = "This is a {scene} image. {instruction} Answer briefly."
    max_new_tokens: int = 24
    unknown_scene: str = "remote sensing"
    concise_experts: list[str] = field(default_factory=lambda: ["theme"])


#: The values a ground resolution is rounded to in prompts (metres per pixel): few distinct phrases to learn.
RESOLUTION_STEPS_M: tuple[float, ...] = (0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.7, 1, 1.5, 2, 3, 5, 7, 10, 15, 20, 30, 50,
                                         70, 100, 150, 200, 300, 500, 1000)


#: How far (as a factor) from the resolutions a scene class was trained at an image may be seen for the scene head
#: to name that class: objects keep their look over a few times their scale, not over tens of times.
SCENE_RESOLUTION_SLACK = 4.0


@dataclass
class ResolutionConfig:
    """Ground resolution (metres per pixel of what the model sees, after resampling to the input size).

    ``prompt`` (with ``{resolution}``, e.g. ``"about 10 m"``) is put before every router and expert prompt when
    a request's resolution is known; empty: the model is not conditioned on it (models trained before it).
    ``trained_m``: the seen resolution range of each training set, ``[min, max]`` (null where unknown);
    ``min_m`` / ``max_m``: the range the model was trained on; ``tile_m``: the ground size of a read
    footprint the model knows, which tiling uses for imagery finer than ``min_m``; ``scene_m``: the seen
    resolution range of each scene class's training images (null where a set's is unknown), which
    :meth:`scene_plausible` reads."""

    prompt: str = ""
    trained_m: dict[str, list[float | None]] = field(default_factory=dict)
    min_m: float | None = None
    max_m: float | None = None
    tile_m: float | None = None
    scene_m: dict[str, list[float | None]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key in ("min_m", "max_m", "tile_m"):
            value = getattr(self, key)
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise ModelDirError(f"resolution.{key} must be a positive number or null, got {value!r}")
        if self.prompt and "{resolution}" not in self.prompt:
            raise ModelDirError("resolution.prompt must contain '{resolution}'")

    def phrase(self, resolution_m: float | None) -> str:
        """The prompt prefix for a resolution (rounded to :data:`RESOLUTION_STEPS_M`), '' when unknown or off."""
        if not self.prompt or resolution_m is None or not resolution_m > 0:
            return ""
        step = min(RESOLUTION_STEPS_M, key=lambda s: abs(math.log(s / resolution_m)))
        return self.prompt.format(resolution=f"about {step:g} m") + " "

    def scene_plausible(self, scene: str, resolution_m: float | None) -> bool:
        """False when the model learnt ``scene`` only on images seen more than :data:`SCENE_RESOLUTION_SLACK`
        times finer or coarser than ``resolution_m`` (a golf course, known from 0.3 m aerials, in a 2.5 km
        Sentinel-2 tile); True where the resolution or the class's range is unknown."""
        low, high = (self.scene_m.get(scene) or [None, None])[:2]
        if resolution_m is None or low is None or high is None:
            return True
        return low / SCENE_RESOLUTION_SLACK <= resolution_m <= high * SCENE_RESOLUTION_SLACK

    def outside(self, resolution_m: float | None) -> str | None:
        """``finer`` / ``coarser`` when ``resolution_m`` lies more than 1.5x outside the trained range, else None."""
        if resolution_m is None:
            return None
        if self.min_m is not None and resolution_m < self.min_m / 1.5:
            return "finer"
        if self.max_m is not None and resolution_m > self.max_m * 1.5:
            return "coarser"
        return None


@dataclass
class AnswerHeadConfig:
    """The closed-answer head (:mod:`engine.model.answer_head`): ``enabled`` when the model directory holds
    ``answer_head.safetensors``; answers below ``min_confidence`` (the head's probability) are marked unsure."""

    enabled: bool = False
    min_confidence: float = 0.6


@dataclass
class GenerationSettings:
    """Decoding (deterministic): concise captions by beam search with ``num_beams`` beams (1: greedy), hypotheses
    scored by summed log-probability over ``length ** length_penalty``; detailed captions, answers and router
    plans greedily."""

    max_new_tokens: int = 40
    max_new_tokens_answer: int = 16
    repetition_penalty: float = 1.0
    num_beams: int = 1
    length_penalty: float = 1.0

    def __post_init__(self) -> None:
        if not 1 <= int(self.num_beams) <= 16:
            raise ModelDirError(f"generation.num_beams must be between 1 and 16, got {self.num_beams}")
        if float(self.repetition_penalty) <= 0:
            raise ModelDirError(f"generation.repetition_penalty must be positive, got {self.repetition_penalty}")


@dataclass
class RSMoEConfig:
    """Everything needed to build an RS-MoE model (weights come from the model dir and base models)."""

    variant: str = "lite"
    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    lora: LoRASettings = field(default_factory=LoRASettings)
    experts: list[ExpertConfig] = field(default_factory=list)
    router: RouterConfig = field(default_factory=RouterConfig)
    image: ImageProcessorConfig = field(default_factory=ImageProcessorConfig)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    resolution: ResolutionConfig = field(default_factory=ResolutionConfig)
    answer_head: AnswerHeadConfig = field(default_factory=AnswerHeadConfig)
    seed: int = 0
    model_id: str = "rsmoe"

    def __post_init__(self) -> None:
        names = [e.name for e in self.experts]
        if len(set(names)) != len(names):
            raise ModelDirError(f"expert names must be unique, got {names}")
        if "router" in names or "__base__" in names:
            raise ModelDirError("'router' and '__base__' are reserved adapter names")

    @property
    def expert_names(self) -> list[str]:
        return [e.name for e in self.experts]

    def expert(self, name: str) -> ExpertConfig:
        for e in self.experts:
            if e.name == name:
                return e
        raise KeyError(name)

    # -- (de)serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RSMoEConfig":
        data = dict(data)
        try:
            nested = {
                "vision": VisionConfig,
                "qformer": QFormerConfig,
                "llm": LLMConfig,
                "lora": LoRASettings,
                "router": RouterConfig,
                "generation": GenerationSettings,
                "resolution": ResolutionConfig,
                "answer_head": AnswerHeadConfig,
            }
            for key, sub in nested.items():
                if key in data:
                    data[key] = _from_dict(sub, data[key])
            if "image" in data:
                data["image"] = _from_dict(ImageProcessorConfig, data["image"])
            data["experts"] = [_from_dict(ExpertConfig, e) for e in data.get("experts", [])]
            return _from_dict(cls, data)
        except TypeError as exc:
            raise ModelDirError(f"invalid RS-MoE config: {exc}") from exc

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path) -> "RSMoEConfig":
        path = Path(directory) / CONFIG_NAME
        if not Path(directory).is_dir():
            raise ModelDirError(f"model directory not found: {directory}")
        if not path.is_file():
            raise ModelDirError(f"{directory} is not an RS-MoE model directory (no {CONFIG_NAME})")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelDirError(f"{path} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ModelDirError(f"{path} must hold a JSON object")
        return cls.from_dict(data)

    @classmethod
    def variant(cls, name: str) -> "RSMoEConfig":
        """The packaged config of a variant (``lite``, ``1b``, ``7b``)."""
        try:
            text = resources.files("engine.model").joinpath("variants", f"{name}.json").read_text()
        except FileNotFoundError as exc:
            raise ModelDirError(f"unknown variant {name!r}; known: {', '.join(list_variants())}") from exc
        return cls.from_dict(json.loads(text))


def list_variants() -> list[str]:
    folder = resources.files("engine.model").joinpath("variants")
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))
