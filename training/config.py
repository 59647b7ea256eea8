"""Training configuration (YAML), in the spirit of the LAVIS configs: model, data, two stages, precision."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from engine.errors import ModelDirError, UserInputError
from engine.model.config import VisionConfig


@dataclass
class StageConfig:
    """One training stage: optimiser and schedule."""

    epochs: int = 3
    lr: float = 2e-4
    batch_size: int = 16
    warmup_steps: int = 30
    weight_decay: float = 0.0
    max_steps_per_epoch: int | None = None  # caps an epoch (smoke tests, quick runs)
    vqa_per_epoch: int = 0  # derived-VQA samples mixed into each epoch
    expert_targets_per_image: int = 3  # stage 2: sub-task targets drawn per image and epoch (of the experts)
    router_fraction: float = 1.0  # stage 2: share of caption images and questions that also give a router row
    concise_per_image: int = 1  # stage 2: concise-caption rows per image and epoch (distinct references)
    wrong_scene_fraction: float = 0.0  # stage 2: caption rows whose prompt names a confusable scene (the head's)
    neutral_scene_fraction: float = 0.0  # stage 2: caption rows whose prompt names no scene (the neutral phrase)
    neutral_scene_sets: dict[str, float] = field(default_factory=dict)  # stage 2: that share for a set's rows
    # stage 2 of a continued model: tune its bridge too (True) or keep it, and with it the answer head learnt on
    # the bridge's outputs (False: only the experts' and the router's LoRA move; no answer head to relearn)
    continued_bridge: bool = True


@dataclass
class VisionTuningConfig:
    """Stage 0: fine-tune the encoder's top ``blocks`` blocks on the scene classes (0 = keep it frozen)."""

    blocks: int = 0
    epochs: int = 6
    lr: float = 3.0e-4  # the encoder blocks
    head_lr: float = 3.0e-3  # the linear classifier (kept as the model's scene head)
    batch_size: int = 32
    weight_decay: float = 0.01
    variants: int = 4  # dihedral variants of each train image whose lower-block maps are cached
    label_smoothing: float = 0.1
    dropout: float = 0.2
    max_val_images: int | None = None  # val images whose accuracy selects the epoch (None = the whole split)
    max_train_per_set: dict[str, int] = field(default_factory=dict)  # e.g. {eurosat: 4000}: evenly spaced
    max_val_per_set: dict[str, int] = field(default_factory=dict)
    scene_views: int = 1  # dihedral views the scene head averages at inference (the model's vision.scene_views)


@dataclass
class DataConfig:
    """Where the data is and how much of it to use."""

    ucm: str | None = "../shared/data/ucm_captions"
    aid: str | None = None  # AID scenes with RSICD's human captions (class-labelled Karpathy folder)
    eurosat: str | None = None  # EuroSAT RGB (class-labelled folder, no captions: derived ones)
    rsvqa_lr: str | None = None  # RSVQA-LR in the official split format
    rsvqa_hr: str | None = None  # RSVQA-HR in the official split format
    max_train_per_set: dict[str, int] = field(default_factory=dict)  # stages 1-2: images per set (evenly spaced)
    max_val_per_set: dict[str, int] = field(default_factory=dict)  # val images per set scored after each epoch
    caption_repeats: dict[str, int] = field(default_factory=dict)  # stages 1-2: a set's images appear N times an epoch
    # EuroSAT patches laid 4 x 4 into 256 px Sentinel-2 tiles, e.g. {train: 2000, val: 200} (training.data.mosaics)
    eurosat_mosaics: dict[str, int] = field(default_factory=dict)
    augment_variants: int = 8  # dihedral variants of each train image with cached features (1 = none)
    max_train_images: int | None = None
    max_val_images: int | None = 60  # val images captioned after each epoch for model selection


@dataclass
class AnswerHeadTraining:
    """The answer head's fit (``enabled``: the recipe trains one after its last stage)."""

    enabled: bool = False
    hidden: int = 256
    epochs: int = 60
    batch_size: int = 256
    lr: float = 1.0e-3
    weight_decay: float = 1.0e-3
    dropout: float = 0.3
    min_token_count: int = 3  # question tokens seen fewer times in training are not in the vocabulary
    region_inputs: bool = False  # also the image's region's scene probabilities over 640 m tiles (RSVQA-LR: 4 x 4)


@dataclass
class SceneHeadRefit:
    """The scene head's refit on the frozen encoder after stage 2 (``enabled``; :mod:`training.scene_head`)."""

    enabled: bool = False
    views_per_image: int = 2  # the image and this many - 1 other dihedral views, each a sample
    epochs: int = 60
    batch_size: int = 512
    lr: float = 1.0e-3
    weight_decay: float = 1.0e-3
    anchor_weight: float = 0.0  # the recipe's EuroSAT mosaics as anchors (targets: the head's answers); never labels
    max_train_per_set: dict[str, int] = field(default_factory=dict)  # none: every train image
    max_val_per_set: dict[str, int] = field(default_factory=lambda: {"eurosat": 500})


@dataclass
class TrainConfig:
    """The whole run: optional stage 0 (vision tuning), then the two stages. ``one_stage`` is the ablation: experts
    from scratch, no dense stage. ``continue_from`` fine-tunes a trained model further instead (stage 2 only, its
    tuned encoder and scene head kept, the bridge trained with the adapters): to lengthen a run or shift its mix."""

    init: str = "engine/models/rsmoe-lite"  # a model directory (config.json at least) to start from
    continue_from: str | None = None  # a trained model directory (an earlier run's stage2/) whose weights to tune on
    out: str = "runs/rsmoe-lite"
    model_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    vision_tuning: VisionTuningConfig = field(default_factory=VisionTuningConfig)
    stage1: StageConfig = field(default_factory=StageConfig)
    stage2: StageConfig = field(default_factory=StageConfig)
    scene_head_refit: SceneHeadRefit = field(default_factory=SceneHeadRefit)
    answer_head: AnswerHeadTraining = field(default_factory=AnswerHeadTraining)
    one_stage: bool = False
    precision: str = "bf16"  # bf16 | fp32 (bf16 autocast: 1.25-1.3x faster steps on an AVX-512-bf16 CPU)
    seed: int = 0
    cache_dir: str = "runs/cache"
    checkpoint_every_steps: int = 50
    save_dtype: str = "float16"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise UserInputError(f"unknown training config keys: {sorted(unknown)}")
        data = dict(data)
        try:
            data["data"] = DataConfig(**data.get("data", {}))
            data["vision_tuning"] = VisionTuningConfig(**data.get("vision_tuning", {}))
            data["stage1"] = StageConfig(**data.get("stage1", {}))
            data["stage2"] = StageConfig(**data.get("stage2", {}))
            data["scene_head_refit"] = SceneHeadRefit(**data.get("scene_head_refit", {}))
            data["answer_head"] = AnswerHeadTraining(**data.get("answer_head", {}))
            config = cls(**data)
        except TypeError as exc:
            raise UserInputError(f"invalid training config: {exc}") from exc
        for set_name, count in config.data.caption_repeats.items():
            if not isinstance(count, int) or count < 1:
                raise UserInputError(f"data.caption_repeats.{set_name} must be a whole number >= 1, got {count!r}")
        for split, count in config.data.eurosat_mosaics.items():
            if split not in ("train", "val") or not isinstance(count, int) or count < 1:
                raise UserInputError(f"data.eurosat_mosaics takes train / val counts >= 1, got {split}: {count!r}")
        if config.data.eurosat_mosaics and not config.data.eurosat:
            raise UserInputError("data.eurosat_mosaics needs data.eurosat (the patches they are made of)")
        for name, stage in (("stage1", config.stage1), ("stage2", config.stage2)):
            if not 0.0 < stage.router_fraction <= 1.0:
                raise UserInputError(f"{name}.router_fraction must be in (0, 1], got {stage.router_fraction}")
            if not 1 <= stage.concise_per_image <= 5:
                raise UserInputError(f"{name}.concise_per_image must be 1..5 (UCM has 5 captions per image), "
                                     f"got {stage.concise_per_image}")
            shares = {"wrong_scene_fraction": stage.wrong_scene_fraction,
                      "neutral_scene_fraction": stage.neutral_scene_fraction,
                      **{f"neutral_scene_sets.{k}": v for k, v in stage.neutral_scene_sets.items()}}
            for key, share in shares.items():
                if not isinstance(share, (int, float)) or not 0.0 <= share < 1.0:
                    raise UserInputError(f"{name}.{key} must be in [0, 1), got {share!r}")
        if config.precision not in ("bf16", "fp32"):
            raise UserInputError(f"precision must be bf16 or fp32, got {config.precision!r}")
        if not config.stage2.continued_bridge and config.scene_head_refit.enabled:
            raise UserInputError("stage2.continued_bridge: false keeps the answer head, which reads the scene head's "
                                 "probabilities: it cannot go with scene_head_refit (keep continued_bridge true to "
                                 "learn the answer head again)")
        try:  # the model config's own rule for the value stage 0 writes into it
            VisionConfig(scene_views=config.vision_tuning.scene_views)
        except ModelDirError as exc:
            raise UserInputError(f"vision_tuning: {exc}") from exc
        return config

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        import yaml

        path = Path(path)
        if not path.is_file():
            raise UserInputError(f"training config not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise UserInputError(f"{path} is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise UserInputError(f"{path} must hold a mapping")
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def set_roots(self) -> dict[str, str | None]:
        """The configured sets' folders by name (None: not used); the EuroSAT mosaics are written under the
        cache folder (:meth:`mosaic_root`) by the run."""
        d = self.data
        return {"ucm": d.ucm, "aid": d.aid, "eurosat": d.eurosat, "rsvqa_lr": d.rsvqa_lr, "rsvqa_hr": d.rsvqa_hr,
                "eurosat_mosaic": str(self.mosaic_root()) if d.eurosat_mosaics else None}

    def mosaic_root(self) -> Path:
        """Where the run writes its EuroSAT mosaics."""
        return Path(self.cache_dir) / "eurosat_mosaics"
