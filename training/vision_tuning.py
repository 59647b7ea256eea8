"""Stage 0 (vision domain adaptation): fine-tune the top blocks of the EfficientNet-Lite encoder on the
scene classes of the train split of every class-labelled set (UCM, AID, EuroSAT: the union of their classes by
phrase, :mod:`training.data.sets`), before the two stages.

The lite variant's encoder is a 4.7M-parameter ImageNet CNN, not the billion-parameter EVA ViT of
InstructBLIP: a linear probe on its frozen features tells only about three scenes in four apart, and a
wrong scene is the main caption error. Fine-tuning its top blocks (at 14x14 and 7x7 resolution, cheap on a
CPU) on the class labels that come with the train images fixes most of that; the stages that follow keep the
tuned encoder frozen, so their feature cache works as before. The lower blocks' output is cached once
(``variants`` variants of each image: dihedral views with zoom, colour, stretch and blur changes,
:func:`training.data.dataset.scene_variant`), the best epoch is chosen on the mean over sets of each set's val
accuracy (the argmax over that set's own classes), and a checkpoint
after every epoch makes the stage resumable. Batch-norm statistics stay as the base's (the tuned blocks run
in eval mode), so the checkpoint holds everything that changes. The classifier is kept as the model's scene
head (``vision.scene_classes``), from which the generative Instruction Router takes its plan's scene,
averaging its logits over ``scene_views`` dihedral views of the image at inference.
"""
from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from engine.errors import UserInputError
from engine.model import RSMoEModel
from engine.model.modeling import SCENE_HEAD_PREFIX
from training.checkpoints import StagePosition, keep_best, load_checkpoint, save_checkpoint, update_best
from training.config import TrainConfig
from training.data.dataset import scene_variant
from training.data.records import CaptionRecord
from training.data.sets import scene_index, scene_vocabulary
from training.data.vocab import class_phrase
from training.features import FeatureStore, build_feature_store

log = logging.getLogger(__name__)

TUNED_FILE = "vision_tuned.safetensors"
STATE_FILE = "vision_state.json"


@dataclass
class ClassifiedMaps:
    """Cached lower-block maps of some images, their class indices and sets."""

    store: FeatureStore
    labels: torch.Tensor  # (N,) class index per store row
    sets: list[str]  # the set of each row

    def __len__(self) -> int:
        return len(self.labels)


class SceneClassifier(nn.Module):
    """The encoder's top blocks and head, global average pooling and a linear layer over the classes (kept
    as the model's scene head after the stage)."""

    def __init__(self, model: RSMoEModel, blocks: int, dropout: float, classes: int) -> None:
        super().__init__()
        self.encoder = model.vision
        self.blocks = blocks
        self.dropout = dropout
        self.linear = nn.Linear(model.vision.num_features, classes)

    def forward(self, lower_maps: torch.Tensor) -> torch.Tensor:
        pooled = self.encoder.upper(lower_maps, self.blocks).mean(dim=(2, 3))
        return self.linear(F.dropout(pooled, self.dropout, self.training))


def tuned_parameters(classifier: SceneClassifier) -> dict[str, nn.Parameter]:
    """What stage 0 trains: the encoder's top blocks and head (``vision.*``) and the linear layer."""
    params = {f"vision.{prefix}.{name}": p
              for prefix, module in classifier.encoder.tuned_modules(classifier.blocks).items()
              for name, p in module.named_parameters()}
    return {**params, **{f"linear.{n}": p for n, p in classifier.linear.named_parameters()}}


def set_class_mask(phrases: Sequence[str], set_classes: Sequence[str]) -> torch.Tensor:
    """A boolean mask over ``phrases``: True for the phrases of one set's classes."""
    wanted = {class_phrase(c) for c in set_classes}
    return torch.tensor([p in wanted for p in phrases])


@torch.no_grad()
def accuracy(classifier: SceneClassifier, data: ClassifiedMaps, phrases: Sequence[str],
             batch_size: int = 64) -> dict[str, float]:
    """Top-1 accuracy on variant 0 (the image as it is) per set, each over its own classes (the argmax among
    the classes that occur in that set's rows), and ``mean`` over the sets."""
    classifier.eval()
    ids = data.store.image_ids
    predictions: list[int] = []
    masks = {name: torch.zeros(len(phrases), dtype=torch.bool) for name in set(data.sets)}
    for name, label in zip(data.sets, data.labels.tolist()):
        masks[name][label] = True
    for start in range(0, len(ids), batch_size):
        chunk = ids[start:start + batch_size]
        logits = classifier(data.store.get(chunk, [0] * len(chunk), torch.float32))
        for row, set_name in zip(logits, data.sets[start:start + batch_size]):
            predictions.append(int(row.masked_fill(~masks[set_name], float("-inf")).argmax()))
    out: dict[str, float] = {}
    for name in sorted(masks):
        rows = [i for i, s in enumerate(data.sets) if s == name]
        out[name] = sum(predictions[i] == int(data.labels[i]) for i in rows) / max(1, len(rows))
    out["mean"] = sum(out.values()) / max(1, len(out))
    return out


def _lower_maps(model: RSMoEModel, records: Sequence[CaptionRecord], phrases: Sequence[str], cache_dir: Path,
                name: str, blocks: int, variants: int) -> ClassifiedMaps:
    store = build_feature_store(model, records, cache_dir, f"{name}-lower{blocks}-scenevar", variants=variants,
                                encode=lambda pixels: model.vision.lower(pixels, blocks), variant_of=scene_variant)
    return ClassifiedMaps(store, torch.tensor(scene_index(records, phrases)), [r.dataset for r in records])


def _set_lr(optimizer: torch.optim.Optimizer, step: int, total: int) -> None:
    """Linear warm-up over the first 10% of steps, then cosine decay to zero."""
    warmup = max(1, total // 10)
    scale = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * scale


def tune_vision(model: RSMoEModel, train: Sequence[CaptionRecord], val: Sequence[CaptionRecord],
                config: TrainConfig, out: Path) -> dict[str, object]:
    """Run (or resume, or reuse) stage 0; leaves ``model`` with the tuned encoder and
    ``config.vision.tuned_blocks`` set. Returns the stage's record (val accuracy per set and epoch, time)."""
    from safetensors.torch import save_file

    from engine.base_models import load_safetensors_checked

    tuning = config.vision_tuning
    blocks = tuning.blocks
    stage_dir = out / "vision"
    state_path = stage_dir / STATE_FILE
    if state_path.is_file() and json.loads(state_path.read_text()).get("done"):
        log.info("stage 0 (vision tuning) already done: %s", stage_dir)
        record = json.loads(state_path.read_text())
        _load_tuned(model, load_safetensors_checked(stage_dir / TUNED_FILE), stage_dir, blocks,
                    record["scene_classes"])
        model.config.vision.scene_views = tuning.scene_views
        return record
    phrases = scene_vocabulary(train)
    classifier = SceneClassifier(model, blocks, tuning.dropout, len(phrases))
    params = tuned_parameters(classifier)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        nn.init.zeros_(classifier.linear.bias)
        nn.init.normal_(classifier.linear.weight, std=0.01)
    cache = Path(config.cache_dir)
    train_maps = _lower_maps(model, train, phrases, cache, "train", blocks, tuning.variants)
    val_maps = _lower_maps(model, val, phrases, cache, "val", blocks, 1)

    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    encoder_params = [p for k, p in params.items() if k.startswith("vision.")]
    optimizer = torch.optim.AdamW([{"params": encoder_params, "lr": tuning.lr, "base_lr": tuning.lr},
                                   {"params": list(classifier.linear.parameters()), "lr": tuning.head_lr,
                                    "base_lr": tuning.head_lr}], weight_decay=tuning.weight_decay)
    checkpoint_dir = out / "checkpoints" / "vision"
    position, best = StagePosition(), None
    if (checkpoint_dir / "state.json").is_file():
        position, best = load_checkpoint(checkpoint_dir, params, optimizer)
        log.info("stage 0: resuming at epoch %d", position.epoch)
    steps_per_epoch = len(train_maps) // tuning.batch_size
    total = steps_per_epoch * tuning.epochs
    ids = train_maps.store.image_ids
    while position.epoch < tuning.epochs:
        rng = random.Random(config.seed * 1000 + 900 + position.epoch)
        order = rng.sample(range(len(ids)), len(ids))
        classifier.train()
        _freeze_batch_norm(classifier)
        started = time.perf_counter()
        bar = tqdm(range(steps_per_epoch), desc=f"stage0 (vision) epoch {position.epoch + 1}/{tuning.epochs}",
                   unit="step")
        for step in bar:
            rows = order[step * tuning.batch_size:(step + 1) * tuning.batch_size]
            maps = train_maps.store.get([ids[r] for r in rows], [rng.randrange(tuning.variants) for _ in rows],
                                        torch.float32)
            _set_lr(optimizer, position.global_step, total)
            loss = F.cross_entropy(classifier(maps), train_maps.labels[rows], label_smoothing=tuning.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            position.global_step += 1
            position.samples += len(rows)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        position.seconds += time.perf_counter() - started
        scores = accuracy(classifier, val_maps, phrases)
        score = scores["mean"]
        entry = {"epoch": position.epoch + 1, "val_accuracy": round(score, 4),
                 **{f"val_accuracy_{k}": round(v, 4) for k, v in scores.items() if k != "mean"},
                 "train_seconds": round(position.seconds, 1)}
        position.history.append(entry)
        log.info("stage 0 (vision) epoch %d: %s", position.epoch + 1, json.dumps(entry))
        best = update_best(position, score, params, best)
        position.epoch += 1
        save_checkpoint(checkpoint_dir, params, optimizer, position, best)

    keep_best(params, best)
    model.eval()
    model.config.vision.tuned_blocks = blocks
    model.config.vision.scene_views = tuning.scene_views
    model.set_scene_head(phrases, classifier.linear)
    stage_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in stage_state(model, blocks).items()}, str(stage_dir / TUNED_FILE))
    position.done = True
    record = {"stage": "vision", "blocks": blocks, "classes": len(phrases), "scene_classes": list(phrases),
              **position.__dict__}
    state_path.write_text(json.dumps(record, indent=1))
    return record


def _freeze_batch_norm(classifier: SceneClassifier) -> None:
    """Batch-norm layers keep the base's running statistics (eval mode) while the rest trains."""
    for module in classifier.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def stage_state(model: RSMoEModel, blocks: int) -> dict[str, torch.Tensor]:
    """What stage 0 leaves: the tuned blocks (``net.*``) and the scene head (``scene_head.*``)."""
    assert model.scene_head is not None
    return {**model.vision.tuned_state_dict(blocks), **model.scene_head_state_dict()}


def _load_tuned(model: RSMoEModel, state: dict[str, torch.Tensor], stage_dir: Path, blocks: int,
                phrases: Sequence[str]) -> None:
    source = str(stage_dir / TUNED_FILE)
    if not any(k.startswith(SCENE_HEAD_PREFIX) for k in state):
        raise UserInputError(f"{source} has no scene head (written by an older version); delete {stage_dir} "
                             "to run stage 0 again")
    model.vision.load_tuned_state_dict({k: v for k, v in state.items() if not k.startswith(SCENE_HEAD_PREFIX)},
                                       blocks, source)
    model.config.vision.tuned_blocks = blocks
    model.set_scene_head(list(phrases), nn.Linear(model.vision.num_features, len(phrases)))
    model.load_scene_head(state, source)
