"""The two-stage RS-MoE training loop (readable in one sitting, nanoGPT-style).

Optional stage 0 (:mod:`training.vision_tuning`) first fine-tunes the vision encoder's top blocks on the
scene classes; the two stages then see the tuned encoder, frozen.

Stage 1 (dense): vision frozen (features cached); query tokens, Q-Former cross-attention, projection and
ONE LoRA adapter on the LLM learn whole captions and VQA pairs. Its result is saved as a model directory
whose experts are all copies of that adapter (the dense baseline, with the fixed-template router).
Stage 2 (MoE): the router and every expert adapter start from the stage-1 adapter and learn their
sub-task targets; the stage-1 parts stay frozen. ``one_stage`` is the ablation: no stage 1, the experts
start from fresh LoRA and the bridge trains together with them. ``continue_from`` starts from a trained model
instead (stages 0 and 1 skipped; stage 2 tunes its bridge, experts and router further, e.g. on a new data mix).

Every ``checkpoint_every_steps`` the trainable tensors, the optimiser state and the position in the run
are written (safetensors + JSON, atomically: :mod:`training.checkpoints`); re-running the same command
resumes from there.
After each epoch a val subset is captioned (concise) and scored, and when the stage learns VQA its derived
questions are answered too; the best epoch (val CIDEr + val VQA accuracy, :func:`validate`) is kept.
"""
from __future__ import annotations

import json
import logging
import math
import random
import resource
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from tqdm import tqdm

from engine.errors import UserInputError
from engine.model import RSMoEConfig, RSMoEModel
from engine.model.config import ROUTER_ADAPTER
from engine.model.answer_head import ANSWER_HEAD_FILE
from training.answer_head import closed_records, head_accuracy, train_answer_head
from training.region_classifier import add_region_classifier
from training.checkpoints import StagePosition, keep_best, load_checkpoint, save_checkpoint, update_best
from training.config import StageConfig, TrainConfig
from training.data import derive_ucm_vqa
from training.data.class_vqa import derive_class_vqa
from training.data.derived import rsvqa_image_records, with_derived_captions
from training.data.mosaics import write_mosaics
from training.data.records import CaptionRecord, VQARecord, evenly_spaced, seen_resolution
from training.data.sets import CAPTION_SETS, load_mixture
from training.data.subtasks import infer_scene
from training.data.vocab import class_phrase
from training.features import FeatureStore, build_feature_store
from training.samples import Sample, stage1_samples, stage2_samples
from training.scene_head import REPORT_FILE as SCENE_HEAD_REPORT
from training.scene_head import refit_scene_head
from training.vision_tuning import tune_vision

log = logging.getLogger(__name__)

STATE_FILE = "training_state.json"


# ----------------------------------------------------------------------------------------------- setup
def build_initial_model(config: TrainConfig) -> RSMoEModel:
    """The untrained model of ``config.init`` with ``model_overrides`` applied to its config, or the trained
    model of ``config.continue_from`` (whose config must already be what the run wants: no overrides)."""
    if config.continue_from:
        source = Path(config.continue_from)
        if not (source / "model.safetensors").is_file():
            raise UserInputError(f"continue_from: {source} holds no trained model (model.safetensors); "
                                 "give a model directory an earlier run wrote (its stage2/)")
        if config.model_overrides:
            raise UserInputError("continue_from keeps the trained model's config: remove model_overrides")
        model = RSMoEModel.from_pretrained(source)
        if config.stage2.continued_bridge:
            # an answer head learnt the bridge's outputs as they were: a model whose bridge moves learns its own
            model.answer_head, model.config.answer_head.enabled = None, False
        return model
    init = Path(config.init)
    model_config = RSMoEConfig.load(init).to_dict()
    for section, values in config.model_overrides.items():
        if section not in model_config or not isinstance(model_config[section], dict):
            raise UserInputError(f"model_overrides: unknown section {section!r}")
        model_config[section].update(values)
    return RSMoEModel.from_config(RSMoEConfig.from_dict(model_config), model_dir=init)


def lora_parameters(model: RSMoEModel, adapter: str) -> dict[str, nn.Parameter]:
    """The LoRA tensors of one adapter, by name."""
    return {n: p for n, p in model.language_model.named_parameters()
            if f".lora_A.{adapter}." in n or f".lora_B.{adapter}." in n}


def bridge_parameters(model: RSMoEModel) -> dict[str, nn.Parameter]:
    """The trainable bridge tensors (query tokens, Q-Former cross-attention, projection), by name."""
    trainable = set(model.trainable_bridge_parameters())
    return {f"bridge.{n}": p for n, p in model.bridge.named_parameters() if p in trainable}


def stage_parameters(model: RSMoEModel, stage: str, with_bridge: bool = False) -> dict[str, nn.Parameter]:
    """What a stage trains: stage 1 the bridge and the first expert's LoRA; stage 2 every expert's and
    the router's LoRA, and the bridge too ``with_bridge`` (the one-stage ablation, a continued model)."""
    experts = model.config.expert_names
    if stage == "stage1":
        return {**bridge_parameters(model), **lora_parameters(model, experts[0])}
    params = bridge_parameters(model) if with_bridge else {}
    for adapter in [*experts, ROUTER_ADAPTER]:
        params.update(lora_parameters(model, adapter))
    return params


def copy_adapter(model: RSMoEModel, source: str, targets: Sequence[str]) -> None:
    """Initialise adapters ``targets`` with the weights of ``source`` (stage 2 starts from stage 1)."""
    params = dict(model.language_model.named_parameters())
    with torch.no_grad():
        for name, value in lora_parameters(model, source).items():
            for target in targets:
                params[name.replace(f".{source}.", f".{target}.")].copy_(value)


class LossModule(nn.Module):
    """``forward`` = the model's teacher-forced loss, so accelerate/DDP can wrap it."""

    def __init__(self, model: RSMoEModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, visual: torch.Tensor, prompts: list[str], targets: list[str], adapter: str) -> torch.Tensor:
        return self.model.loss(visual, prompts, targets, adapter=adapter)


# ----------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def validate(model: RSMoEModel, store: FeatureStore, records: Sequence[CaptionRecord],
             questions: Sequence[VQARecord] = (), image_ids: dict[str, int] | None = None, style: str = "concise",
             batch_size: int = 16, resolutions: dict[int, float | None] | None = None) -> dict[str, float]:
    """Caption the val images from cached features and score them (BLEU, ROUGE-L, CIDEr; no METEOR); with
    ``questions`` (derived VQA on those images; ``image_ids`` maps their image paths) also answer them:
    ``VQA`` overall accuracy and ``VQA-<type>`` per type. ``selection`` is the score that picks the epoch:
    CIDEr, plus the VQA accuracy when questions are asked (a stage that learns both is chosen on both)."""
    from training.metrics import caption_metrics, vqa_accuracy

    model.eval()
    res = resolutions or {}
    predictions: dict[int, str] = {}
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        visual = store.get([r.image_id for r in chunk], [0] * len(chunk), model.dtype).to(model.device)
        for r, result in zip(chunk, model.caption_features(visual, style,
                                                            resolutions=[res.get(r.image_id) for r in chunk])):
            predictions[r.image_id] = result.text
    scores = caption_metrics(predictions, {r.image_id: r.captions for r in records}, meteor=False)
    scores["selection"] = scores["CIDEr"]
    if questions:
        answers: dict[int, str] = {}
        for start in range(0, len(questions), batch_size):
            chunk = questions[start:start + batch_size]
            ids = [image_ids[str(q.image_path)] for q in chunk]
            visual = store.get(ids, [0] * len(chunk), model.dtype).to(model.device)
            for q, result in zip(chunk, model.ask_features(visual, [q.question for q in chunk],
                                                           resolutions=[res.get(i) for i in ids])):
                answers[q.question_id] = result.text
        accuracy = vqa_accuracy(questions, answers)
        scores["VQA"] = accuracy["overall"]
        scores.update({f"VQA-{t}": a for t, a in accuracy["per_type"].items()})
        scores["selection"] += accuracy["overall"]
    return scores


# ----------------------------------------------------------------------------------------------- one stage
@dataclass
class StageData:
    train: list[CaptionRecord]
    val: list[CaptionRecord]
    vqa_train: list[VQARecord]
    vqa_val: list[VQARecord]  # derived VQA on the val images (scored after each epoch of a stage that learns VQA)
    image_ids: dict[str, int]
    train_store: FeatureStore
    val_store: FeatureStore
    resolutions: dict[int, float | None] = field(default_factory=dict)  # image id -> metres per pixel seen


def _lr_at(step: int, total: int, stage: StageConfig) -> float:
    if step < stage.warmup_steps:
        return stage.lr * (step + 1) / stage.warmup_steps
    progress = (step - stage.warmup_steps) / max(1, total - stage.warmup_steps)
    return stage.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def prepare_optimisation(model: RSMoEModel, params: dict[str, nn.Parameter], stage: StageConfig,
                         precision: str) -> tuple[Any, nn.Module, torch.optim.Optimizer]:
    """Only ``params`` require grad; AdamW over them; the loss module and optimiser prepared by accelerate."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    accelerator = Accelerator(mixed_precision="bf16" if precision == "bf16" else "no",
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(list(params.values()), lr=stage.lr, weight_decay=stage.weight_decay)
    module, optimizer = accelerator.prepare(LossModule(model), optimizer)
    return accelerator, module, optimizer


def run_stage(name: str, model: RSMoEModel, params: dict[str, nn.Parameter], make_samples: Any,
              stage: StageConfig, data: StageData, config: TrainConfig, out: Path,
              before_validation: Callable[[], None] | None = None) -> StagePosition:
    """Train ``params`` on the samples ``make_samples(epoch)`` gives, with checkpoints and val selection
    (``before_validation`` readies the model for it, e.g. stage 1 gives every expert the dense adapter)."""
    accelerator, module, optimizer = prepare_optimisation(model, params, stage, config.precision)
    checkpoint_dir = out / "checkpoints" / name
    position, best = StagePosition(), None
    if (checkpoint_dir / "state.json").is_file():
        position, best = load_checkpoint(checkpoint_dir, params, optimizer)
        log.info("%s: resuming at epoch %d step %d", name, position.epoch, position.step_in_epoch)
    steps_per_epoch = math.ceil(len(make_samples(0)) / stage.batch_size)
    if stage.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, stage.max_steps_per_epoch)
    total_steps = steps_per_epoch * stage.epochs
    rank, world = accelerator.process_index, accelerator.num_processes

    while position.epoch < stage.epochs:
        samples = make_samples(position.epoch)[rank::world]
        bar = tqdm(range(position.step_in_epoch, steps_per_epoch), desc=f"{name} epoch {position.epoch + 1}/{stage.epochs}",
                   unit="step", disable=not accelerator.is_main_process)
        started = time.perf_counter()
        model.train()
        for step in bar:
            batch = samples[step * stage.batch_size:(step + 1) * stage.batch_size]
            if not batch:
                break
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(position.global_step, total_steps, stage)
            loss_value = train_step(module, model, optimizer, accelerator, batch, data.train_store, position)
            position.step_in_epoch = step + 1
            position.global_step += 1
            position.samples += len(batch)
            elapsed = time.perf_counter() - started
            position.seconds += elapsed
            bar.set_postfix(loss=f"{loss_value:.3f}", samples_per_s=f"{len(batch) / max(elapsed, 1e-9):.1f}")
            started = time.perf_counter()
            if position.global_step % config.checkpoint_every_steps == 0 and accelerator.is_main_process:
                save_checkpoint(checkpoint_dir, params, optimizer, position, best)
        questions = data.vqa_val if stage.vqa_per_epoch else []
        if before_validation is not None:
            before_validation()
        scores = (validate(model, data.val_store, data.val, questions, data.image_ids,
                           resolutions=data.resolutions)
                  if accelerator.is_main_process else {})
        entry = {"epoch": position.epoch + 1, **scores, "train_seconds": round(position.seconds, 1)}
        position.history.append(entry)
        log.info("%s epoch %d: %s", name, position.epoch + 1, json.dumps(entry))
        best = update_best(position, scores.get("selection", -1.0), params, best)
        position.epoch += 1
        position.step_in_epoch = 0
        if accelerator.is_main_process:
            save_checkpoint(checkpoint_dir, params, optimizer, position, best)
    keep_best(params, best)
    position.done = True
    model.eval()
    return position


def train_step(module: nn.Module, model: RSMoEModel, optimizer: torch.optim.Optimizer, accelerator: Any,
               batch: list[Sample], store: FeatureStore, position: StagePosition) -> float:
    """One optimiser step; rows are grouped by adapter (one forward/backward per adapter)."""
    rng = random.Random(position.global_step)
    groups: dict[str, list[Sample]] = defaultdict(list)
    for s in batch:
        groups[s.adapter].append(s)
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for adapter, rows in groups.items():
        variants = [rng.randrange(store.variants) for _ in rows]
        visual = store.get([s.image_id for s in rows], variants, torch.float32).to(model.device)
        with accelerator.autocast():
            loss = module(visual, [s.prompt for s in rows], [s.target for s in rows], adapter)
        accelerator.backward(loss * len(rows) / len(batch))
        total += loss.item() * len(rows) / len(batch)
    accelerator.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
    optimizer.step()
    return total


# ----------------------------------------------------------------------------------------------- the run
@dataclass
class StageRecords:
    """What :func:`load_records` reads: train and val images (``val_images``: the RSVQA ones too), train and val
    questions, image ids and each image's seen ground resolution."""

    train: list[CaptionRecord]
    val: list[CaptionRecord]
    val_images: list[CaptionRecord]
    vqa_train: list[VQARecord]
    vqa_val: list[VQARecord]
    image_ids: dict[str, int]
    resolutions: dict[int, float | None]


def load_data(model: RSMoEModel, config: TrainConfig) -> StageData:
    """The stages' records (:func:`load_records`) and the cached features of their images."""
    records = load_records(config, model.config.image.image_size)
    cache = Path(config.cache_dir)
    train_store = build_feature_store(model, records.train, cache, "train", variants=config.data.augment_variants)
    val_store = build_feature_store(model, records.val_images, cache, "val", variants=1)
    return StageData(records.train, records.val, records.vqa_train, records.vqa_val, records.image_ids,
                     train_store, val_store, records.resolutions)


def load_records(config: TrainConfig, size: int) -> StageRecords:
    """The stages' records from every configured set (:mod:`training.data.sets`), their questions (UCM-derived
    VQA and RSVQA) and each image's seen ground resolution (``size``: the model's input).

    Train images: every set's (EuroSAT with derived captions, RSVQA tiles with captions derived from their
    answers). Val: ``max_val_images`` captioned images of each human-captioned set (UCM, AID), the UCM-derived
    questions on them and ``max_val_images`` questions of each RSVQA set."""
    data = config.data
    roots = config.set_roots()

    def limits(per_set: dict[str, int], default: int | None) -> dict[str, int]:
        return {name: per_set.get(name, default) for name in roots if per_set.get(name, default)}

    train_mix = load_mixture(roots, "train", limits(data.max_train_per_set, data.max_train_images))
    val_mix = load_mixture(roots, "val", limits(data.max_val_per_set, None))
    train = [with_derived_captions(r) for r in train_mix.captions] + rsvqa_image_records(train_mix.questions, size)
    val = [r for name, records in val_mix.by_set().items() if name in ("ucm", "aid")
           for r in evenly_spaced(records, data.max_val_images)]
    rsvqa_val = [q for name in ("rsvqa_lr", "rsvqa_hr")
                 for q in evenly_spaced([q for q in val_mix.questions if q.dataset == name], data.max_val_images)]
    val_images = val + rsvqa_image_records(rsvqa_val, size)
    ucm = [r for r in train_mix.captions + val_mix.captions if r.dataset == "ucm"]
    ucm_vqa = derive_ucm_vqa(ucm) if ucm else []
    image_ids = {str(r.image_path): r.image_id for r in train + val_images}
    train_ids, val_ids = {r.image_id for r in train}, {r.image_id for r in val}
    vqa_train = [q for q in ucm_vqa if q.split == "train" and image_ids.get(str(q.image_path)) in train_ids]
    vqa_train += train_mix.questions
    vqa_val = [q for q in ucm_vqa if q.split == "val" and image_ids.get(str(q.image_path)) in val_ids] + rsvqa_val
    resolutions = {r.image_id: seen_resolution(r.ground_resolution_m, r.width, size) for r in train + val_images}
    log.info("stage data: %d train images (%s), %d val captioned, %d train / %d val questions",
             len(train), dict(Counter(r.dataset for r in train)), len(val), len(vqa_train), len(vqa_val))
    return StageRecords(train, val, val_images, vqa_train, vqa_val, image_ids, resolutions)


def repeated(records: Sequence[CaptionRecord], repeats: dict[str, int]) -> list[CaptionRecord]:
    """The stages' caption records with each set's images ``repeats[set]`` times (default once): a larger share
    of an epoch for a set (each repeat draws its own reference caption and expert targets)."""
    return [r for r in records for _ in range(repeats.get(r.dataset, 1))]


def record_trained_resolutions(model_config: RSMoEConfig, train: Sequence[CaptionRecord],
                               resolutions: dict[int, float | None]) -> None:
    """Write the seen resolution range of each training set and of each scene class (``resolutions``: each
    image's, by id), the overall range and the read footprint the model knows (``tile_m``: the finest seen
    resolution times the input size) into the model config."""
    resolution = model_config.resolution
    resolution.trained_m = _ranges(train, resolutions, lambda r: r.dataset, any_unknown=False)
    resolution.scene_m = _ranges([r for r in train if class_phrase(r.class_name)], resolutions,
                                 lambda r: str(class_phrase(r.class_name)), any_unknown=True)
    known_all = [v for pair in resolution.trained_m.values() for v in pair if v is not None]
    resolution.min_m = min(known_all) if known_all else None
    resolution.max_m = max(known_all) if known_all else None
    resolution.tile_m = round(resolution.min_m * model_config.image.image_size) if resolution.min_m else None


def _ranges(records: Sequence[CaptionRecord], resolutions: dict[int, float | None],
            key: Callable[[CaptionRecord], str], any_unknown: bool) -> dict[str, list[float | None]]:
    """``[min, max]`` of the records' known seen resolutions per ``key``; ``[None, None]`` where none is known,
    or (``any_unknown``) where any is not (a scene class learnt also on images of unknown resolution)."""
    by_key: dict[str, list[float | None]] = defaultdict(list)
    for r in records:
        by_key[key(r)].append(resolutions.get(r.image_id))
    ranges: dict[str, list[float | None]] = {}
    for name, values in sorted(by_key.items()):
        known = [v for v in values if v is not None]
        unknown = not known or (any_unknown and len(known) < len(values))
        ranges[name] = [None, None] if unknown else [round(min(known), 3), round(max(known), 3)]
    return ranges


def record_resolutions_of(model_dir: Path, config: TrainConfig) -> Path:
    """Write the recipe's trained resolution ranges (per set, per scene class) into a trained model's config,
    nothing else changed (``rsmoe train --config C --record-resolutions-of DIR``)."""
    model_dir = Path(model_dir)
    model_config = RSMoEConfig.load(model_dir)
    records = load_records(config, model_config.image.image_size)
    record_trained_resolutions(model_config, records.train, records.resolutions)
    model_config.save(model_dir)
    log.info("%s: resolution ranges of %d sets and %d scene classes recorded", model_dir,
             len(model_config.resolution.trained_m), len(model_config.resolution.scene_m))
    return model_dir


@torch.no_grad()
def confusable_scenes(model: RSMoEModel, records: Sequence[CaptionRecord], store: FeatureStore) -> dict[int, str]:
    """Each image's best wrong scene: the scene head's highest-scoring class that is not the image's own
    (from the cached features of the image as is); empty without a scene head."""
    classes = model.config.vision.scene_classes
    if model.scene_head is None or not classes:
        return {}
    out: dict[int, str] = {}
    for start in range(0, len(records), 256):
        batch = records[start:start + 256]
        visual = store.get([r.image_id for r in batch], [0] * len(batch), model.dtype)
        ranking = model.scene_logits(visual).float().argsort(dim=-1, descending=True).tolist()
        for record, order in zip(batch, ranking):
            truth = infer_scene(record.captions, record.class_name)
            out[record.image_id] = next(classes[i] for i in order if classes[i] != truth)
    return out


def saved_dtype(config: TrainConfig) -> torch.dtype:
    """The dtype a recipe saves its models' weights in (``save_dtype``)."""
    return {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}[config.save_dtype]


def save_stage_model(model: RSMoEModel, out_dir: Path, position: StagePosition, config: TrainConfig,
                     stage_name: str) -> None:
    model.save_pretrained(out_dir, dtype=saved_dtype(config))
    state = {"stage": stage_name, "config": config.to_dict(), **position.__dict__,
             "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    (out_dir / STATE_FILE).write_text(json.dumps(state, indent=1))


def stage_done(out_dir: Path) -> bool:
    path = out_dir / STATE_FILE
    return path.is_file() and json.loads(path.read_text()).get("done", False)


def train(config: TrainConfig, until: str = "stage2") -> Path:
    """Run (or resume) the configured stages, up to ``until`` (vision, stage1, stage2); returns the last
    stage's output directory."""
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(json.dumps(config.to_dict(), indent=1))
    model = build_initial_model(config)
    if config.data.eurosat_mosaics:
        write_mosaics(str(config.data.eurosat), config.mosaic_root(), config.data.eurosat_mosaics, config.seed)
    if config.vision_tuning.blocks and not config.continue_from:
        tuning = config.vision_tuning
        roots = {k: v for k, v in config.set_roots().items() if k in CAPTION_SETS}
        tune_vision(model, load_mixture(roots, "train", tuning.max_train_per_set).captions,
                    load_mixture(roots, "val", tuning.max_val_per_set).captions, config, out)
        if until == "vision":
            return out / "vision"
    data = load_data(model, config)
    record_trained_resolutions(model.config, data.train, data.resolutions)
    caption_records = repeated(data.train, config.data.caption_repeats)
    experts = model.config.expert_names
    dense = experts[0]
    stage1_dir, stage2_dir = out / "stage1", out / "stage2"

    if not (config.one_stage or config.continue_from):
        if stage_done(stage1_dir):
            log.info("stage 1 already done: %s", stage1_dir)
            model = RSMoEModel.from_pretrained(stage1_dir)
        else:
            params = stage_parameters(model, "stage1")

            def stage1_epoch(epoch: int) -> list[Sample]:
                rng = random.Random(config.seed * 1000 + epoch)
                return stage1_samples(model.config, caption_records, data.vqa_train, data.image_ids, dense, rng,
                                      config.stage1.vqa_per_epoch, data.resolutions)

            def as_dense_baseline() -> None:  # questions the template router sends to other experts, too
                copy_adapter(model, dense, experts[1:])

            position = run_stage("stage1", model, params, stage1_epoch, config.stage1, data, config, out,
                                 before_validation=as_dense_baseline)
            as_dense_baseline()
            model.trained_adapters = set(experts)  # the dense baseline: identical experts, template router
            save_stage_model(model, stage1_dir, position, config, "stage1")
        if until == "stage1":
            return stage1_dir
        copy_adapter(model, dense, [ROUTER_ADAPTER])

    if stage_done(stage2_dir):
        log.info("stage 2 already done: %s", stage2_dir)
        return with_answer_head(with_refit_scene_head(stage2_dir, config), data, config)
    tune_bridge = config.one_stage or (bool(config.continue_from) and config.stage2.continued_bridge)
    params = stage_parameters(model, "stage2", with_bridge=tune_bridge)
    with_router = model.config.router.type == "generative"
    confusable = (confusable_scenes(model, data.train, data.train_store)
                  if config.stage2.wrong_scene_fraction > 0 else {})
    if confusable:
        pairs = Counter((infer_scene(r.captions, r.class_name), confusable[r.image_id]) for r in data.train)
        log.info("%.0f%% of stage-2 caption rows name a confusable scene; the commonest: %s",
                 100 * config.stage2.wrong_scene_fraction, pairs.most_common(5))

    def stage2_epoch(epoch: int) -> list[Sample]:
        rng = random.Random(config.seed * 1000 + 500 + epoch)
        return stage2_samples(model.config, caption_records, data.vqa_train, data.image_ids, rng,
                              config.stage2.vqa_per_epoch, with_router=with_router,
                              targets_per_image=config.stage2.expert_targets_per_image,
                              router_fraction=config.stage2.router_fraction,
                              concise_per_image=config.stage2.concise_per_image,
                              confusable_scenes=confusable,
                              wrong_scene_fraction=config.stage2.wrong_scene_fraction,
                              neutral_scene_fraction=config.stage2.neutral_scene_fraction,
                              neutral_scene_sets=config.stage2.neutral_scene_sets,
                              resolutions=data.resolutions)

    model.trained_adapters = set(experts) | ({ROUTER_ADAPTER} if with_router else set())
    position = run_stage("stage2", model, params, stage2_epoch, config.stage2, data, config, out)
    save_stage_model(model, stage2_dir, position, config, "stage2")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    log.info("stage 2 done: %s (peak RSS %.0f MB)", stage2_dir, peak_mb)
    return with_answer_head(with_refit_scene_head(stage2_dir, config), data, config)


def with_refit_scene_head(model_dir: Path, config: TrainConfig) -> Path:
    """Refit the finished model's scene head on every train image when the recipe asks and it was not done yet
    (:mod:`training.scene_head`; its report marks it done)."""
    if not config.scene_head_refit.enabled or (model_dir / SCENE_HEAD_REPORT).is_file():
        return model_dir
    state_file = model_dir / STATE_FILE
    state = state_file.read_text() if state_file.is_file() else None  # the stage's record, kept across the re-save
    refit_scene_head(model_dir, config.set_roots(), config.scene_head_refit, config.seed, saved_dtype(config))
    if state is not None:
        state_file.write_text(state)
    return model_dir


def with_answer_head(model_dir: Path, data: StageData, config: TrainConfig) -> Path:
    """Give the finished model its answer head when the recipe asks for one and it has none yet."""
    if not config.answer_head.enabled or RSMoEConfig.load(model_dir).answer_head.enabled:
        return model_dir
    return learn_answer_head(model_dir, data.train, data.vqa_train, data.vqa_val, config)


def relearn_answer_head(model_dir: Path, config: TrainConfig) -> Path:
    """Learn the answer head (and its region classifier) of a trained model again, from the recipe's data and
    ``answer_head`` settings, after refitting its scene head when the recipe's ``scene_head_refit`` asks and the
    model has no refit report yet; nothing else of the model changes (``rsmoe train --answer-head-of DIR``)."""
    model_dir = Path(model_dir)
    if not (model_dir / "model.safetensors").is_file():
        raise UserInputError(f"{model_dir} holds no trained model (model.safetensors)")
    if config.data.eurosat_mosaics:
        write_mosaics(str(config.data.eurosat), config.mosaic_root(), config.data.eurosat_mosaics, config.seed)
    with_refit_scene_head(model_dir, config)
    records = load_records(config, RSMoEConfig.load(model_dir).image.image_size)
    return learn_answer_head(model_dir, records.train, records.vqa_train, records.vqa_val, config)


def learn_answer_head(model_dir: Path, train: Sequence[CaptionRecord], vqa_train: Sequence[VQARecord],
                      vqa_val: Sequence[VQARecord], config: TrainConfig) -> Path:
    """Learn the saved model's answer head and region classifier (the head learns from the saved model, as
    inference will run it); the config, written last, enables it."""
    saved = RSMoEConfig.load(model_dir)
    saved.answer_head.enabled = False  # the model loads without the head it is about to replace
    saved.save(model_dir)
    model = RSMoEModel.from_pretrained(model_dir)
    class_questions = derive_class_vqa(list(train), seed=config.seed)  # the head's only: stage 2 never saw them
    head = train_answer_head(model, list(vqa_train) + class_questions, config.answer_head, config.seed)
    head = add_region_classifier(model_dir, head, vqa_train)
    model.answer_head = head
    val = closed_records(vqa_val)
    if val:
        log.info("answer head on %d closed val questions: %s", len(val), head_accuracy(model, val))
    head.save(model_dir / ANSWER_HEAD_FILE)
    saved = RSMoEConfig.load(model_dir)
    saved.answer_head.enabled = True
    saved.save(model_dir)
    log.info("answer head saved into %s", model_dir)
    return model_dir
