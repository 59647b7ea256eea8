"""The RS-MoE model: frozen vision encoder -> instruction-aware Q-Former -> projection -> MoE block.

The MoE block is one shared base causal LM with one LoRA adapter per expert plus one for the generative
Instruction Router (peft). K experts therefore cost one model in memory and decode together in ONE
mixed-adapter batch (``adapter_names``) with a KV cache.

A model directory (see DESIGN.md) holds ``config.json``, ``model.safetensors`` (the weights that the base
models do not hold: query tokens, Q-Former, visual norm, projection), ``adapters/<name>/`` (peft LoRA),
and the tokenizers. Only safetensors are read.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from engine.errors import CorruptWeightsError, ModelDirError
from engine.model.answer_head import ANSWER_HEAD_FILE, load_answer_head
from engine.model.config import ADAPTERS_DIR, ROUTER_ADAPTER, WEIGHTS_NAME, RSMoEConfig
from engine.model.image_processing import ImageProcessor
from engine.model.qformer import (
    InstructionAwareQFormer,
    build_qformer_from_bert,
    build_random_qformer,
    load_qformer_tokenizer,
)
from engine.model.routing import MoEInference, ensure_pad_token
from engine.model.vision import VisionEncoder, build_vision_encoder

log = logging.getLogger(__name__)

TOKENIZER_DIR = "tokenizer"
SCENE_HEAD_PREFIX = "scene_head."  # its keys in model.safetensors
QFORMER_TOKENIZER_DIR = "qformer_tokenizer"


@dataclass
class LanguageInputs:
    """A batch ready for the LLM: embeddings, attention mask and (for training) labels."""

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None = None


def _resolve(ref: str, model_dir: Path | None) -> Path:
    from engine.base_models import resolve_model_ref

    return resolve_model_ref(ref, relative_to=model_dir)


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Deterministic initialisation of new parameters without touching the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class RSMoEModel(MoEInference, nn.Module):
    """RS-MoE. Build with :meth:`from_pretrained` (a model directory) or :meth:`from_config`."""

    def __init__(self, config: RSMoEConfig, vision: VisionEncoder, bridge: InstructionAwareQFormer,
                 qformer_tokenizer: Any, language_model: nn.Module, tokenizer: Any,
                 trained_adapters: set[str] | None = None) -> None:
        super().__init__()
        self.config = config
        self.vision = vision
        self.bridge = bridge
        self.qformer_tokenizer = qformer_tokenizer
        self.language_model = language_model  # peft model: base LM + router/expert adapters
        self.tokenizer = tokenizer
        self.image_processor = ImageProcessor(config.image)
        self.trained_adapters = set(trained_adapters or ())
        self.source_dir: Path | None = None  # where relative model references were resolved from
        # the scene head (config.vision.scene_classes): mean visual token -> one logit per scene
        self.scene_head: nn.Linear | None = (nn.Linear(vision.num_features, len(config.vision.scene_classes))
                                             if config.vision.scene_classes else None)
        ensure_pad_token(tokenizer)

    # ------------------------------------------------------------------------------------ building
    @classmethod
    def from_config(cls, config: RSMoEConfig, model_dir: Path | None = None) -> "RSMoEModel":
        """Build from the config's pretrained parts, with the new parts freshly initialised (untrained),
        even when ``model_dir`` (which resolves relative paths and tokenizers) holds trained adapters.
        The vision encoder is the base's as shipped (``tuned_blocks`` reset to 0, no scene head)."""
        config = RSMoEConfig.from_dict({**config.to_dict(),
                                        "vision": {**config.vision.__dict__, "tuned_blocks": 0, "scene_classes": []}})
        return cls._build(config, model_dir, weights=None, load_adapters=False)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None) -> "RSMoEModel":
        """Load a model directory written by :meth:`save_pretrained` (or a config-only directory, which
        gives the untrained architecture and says so)."""
        model_dir = Path(model_dir)
        config = RSMoEConfig.load(model_dir)
        weights_path = model_dir / WEIGHTS_NAME
        weights = None
        if weights_path.exists():
            from engine.base_models import load_safetensors_checked

            weights = load_safetensors_checked(weights_path)
        else:
            log.warning("%s has no %s: running the UNTRAINED %s architecture (captions are not meaningful)",
                        model_dir, WEIGHTS_NAME, config.variant)
        model = cls._build(config, model_dir, weights=weights)
        model.eval()
        if dtype is not None:
            model.to(dtype=dtype)
        return model.to(device)

    @classmethod
    def _build(cls, config: RSMoEConfig, model_dir: Path | None, weights: dict[str, torch.Tensor] | None,
               load_adapters: bool = True) -> "RSMoEModel":
        instructblip = None
        if "instructblip" in (config.vision.type, config.qformer.init, config.llm.type):
            instructblip = cls._load_instructblip(config, model_dir)

        with _seeded(config.seed):  # anything a checkpoint leaves uninitialised is deterministic too
            vision = build_vision_encoder(config.vision, _resolve(config.vision.path, model_dir)
                                          if config.vision.type != "instructblip" else Path("."), instructblip)
            language_model, tokenizer = cls._load_language_model(config, model_dir, instructblip)
            llm_width = language_model.get_input_embeddings().embedding_dim
            bridge, qformer_tokenizer = cls._build_bridge(config, model_dir, instructblip, vision.num_features, llm_width)
            peft_model, trained = cls._attach_adapters(config, model_dir if load_adapters else None, language_model)
        del instructblip

        if weights is not None:
            cls._load_bridge_weights(bridge, weights, model_dir, frozen_base_keys(config, bridge))
            if config.vision.tuned_blocks:
                vision.load_tuned_state_dict({k[len("vision."):]: v for k, v in weights.items() if k.startswith("vision.")},
                                             config.vision.tuned_blocks, f"{model_dir}/{WEIGHTS_NAME}")
        model = cls(config, vision, bridge, qformer_tokenizer, peft_model, tokenizer, trained)
        if weights is not None and model.scene_head is not None:
            model.load_scene_head(weights, f"{model_dir}/{WEIGHTS_NAME}")
        model.answer_head = load_answer_head(config.answer_head.enabled, model_dir)
        model.source_dir = model_dir
        model.eval()
        return model

    @staticmethod
    def _load_instructblip(config: RSMoEConfig, model_dir: Path | None) -> nn.Module:
        from transformers import InstructBlipForConditionalGeneration

        ref = next(c.path for c in (config.vision, config.qformer, config.llm)
                   if getattr(c, "type", getattr(c, "init", "")) == "instructblip")
        path = _resolve(ref, model_dir)
        try:
            return InstructBlipForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
        except (OSError, ValueError) as exc:
            raise ModelDirError(f"cannot load the InstructBLIP checkpoint at {path}: {exc}") from exc

    @staticmethod
    def _load_language_model(config: RSMoEConfig, model_dir: Path | None, instructblip: nn.Module | None) -> tuple[nn.Module, Any]:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = _resolve(config.llm.path, model_dir)
        tokenizer_dir = model_dir / TOKENIZER_DIR if model_dir and (model_dir / TOKENIZER_DIR).is_dir() else path
        try:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
            if config.llm.type == "instructblip":
                assert instructblip is not None
                language_model = instructblip.language_model
            elif config.llm.type == "causal_lm":
                language_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            else:
                raise ModelDirError(f"unknown llm type {config.llm.type!r} (causal_lm | instructblip)")
        except (OSError, ValueError) as exc:
            raise ModelDirError(f"cannot load the language model at {path}: {exc}") from exc
        language_model.requires_grad_(False)
        return language_model, tokenizer

    @staticmethod
    def _build_bridge(config: RSMoEConfig, model_dir: Path | None, instructblip: nn.Module | None,
                      visual_width: int, llm_width: int) -> tuple[InstructionAwareQFormer, Any]:
        q = config.qformer
        tokenizer_dir = model_dir / QFORMER_TOKENIZER_DIR if model_dir and (model_dir / QFORMER_TOKENIZER_DIR).is_dir() else None
        if q.init == "instructblip":
            assert instructblip is not None
            path = _resolve(q.path or config.llm.path, model_dir)
            tokenizer = load_qformer_tokenizer(tokenizer_dir or path / "qformer_tokenizer")
            bridge = InstructionAwareQFormer(
                instructblip.qformer, instructblip.query_tokens.shape[1], llm_width, visual_width,
                query_tokens=instructblip.query_tokens.data, projection=instructblip.language_projection,
                normalize_visual=False,
            )
            return bridge, tokenizer
        if q.path is None:
            raise ModelDirError("qformer.path must name a BERT checkpoint (for its tokenizer)")
        path = _resolve(q.path, model_dir)
        tokenizer = load_qformer_tokenizer(tokenizer_dir or path)
        if q.init == "minilm":
            qformer = build_qformer_from_bert(path, q, visual_width)
        elif q.init == "random":
            qformer = build_random_qformer(q, visual_width, len(tokenizer))
        else:
            raise ModelDirError(f"unknown qformer init {q.init!r} (minilm | instructblip | random)")
        return InstructionAwareQFormer(qformer, q.num_query_tokens, llm_width, visual_width), tokenizer

    @staticmethod
    def _attach_adapters(config: RSMoEConfig, model_dir: Path | None, language_model: nn.Module) -> tuple[nn.Module, set[str]]:
        """Wrap the LM with peft and add one LoRA adapter per expert (+ the router); load saved ones."""
        from peft import LoraConfig, PeftModel, get_peft_model

        names = list(config.expert_names)
        if config.router.type == "generative":
            names.append(ROUTER_ADAPTER)
        if not names:
            raise ModelDirError("the config defines no experts")
        adapters_dir = model_dir / ADAPTERS_DIR if model_dir else None
        saved = {n for n in names if adapters_dir and (adapters_dir / n / "adapter_config.json").is_file()}
        lora = config.lora
        fresh = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                           target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
        peft_model: Any = None
        for name in names:
            if name in saved:
                path = adapters_dir / name  # type: ignore[operator]
                try:
                    if peft_model is None:
                        peft_model = PeftModel.from_pretrained(language_model, path, adapter_name=name)
                    else:
                        peft_model.load_adapter(path, adapter_name=name)
                except Exception as exc:  # peft raises many types for a broken adapter
                    raise CorruptWeightsError(f"adapter {name!r} at {path} cannot be loaded: {exc}") from exc
            elif peft_model is None:
                peft_model = get_peft_model(language_model, fresh, adapter_name=name)
            else:
                peft_model.add_adapter(name, fresh)
        if saved != set(names) and model_dir is not None and (model_dir / WEIGHTS_NAME).exists():
            log.warning("adapters missing in %s (fresh, untrained): %s", model_dir, sorted(set(names) - saved))
        peft_model.requires_grad_(False)
        return peft_model, saved

    @staticmethod
    def _load_bridge_weights(bridge: nn.Module, weights: dict[str, torch.Tensor], model_dir: Path | None,
                             from_base: set[str]) -> None:
        state = {k[len("bridge."):]: v for k, v in weights.items() if k.startswith("bridge.")}
        expected = {k: v for k, v in bridge.state_dict().items() if k not in from_base}
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        wrong = [k for k in state if k in expected and state[k].shape != expected[k].shape]
        if missing or unexpected or wrong:
            raise CorruptWeightsError(
                f"{model_dir}/{WEIGHTS_NAME} does not match its config.json "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape {wrong[:3]})")
        bridge.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=False)

    def load_scene_head(self, weights: dict[str, torch.Tensor], source: str) -> None:
        """Load ``scene_head.*`` of ``weights`` into the head that ``config.vision.scene_classes`` sizes."""
        assert self.scene_head is not None
        state = {k[len(SCENE_HEAD_PREFIX):]: v for k, v in weights.items() if k.startswith(SCENE_HEAD_PREFIX)}
        expected = self.scene_head.state_dict()
        if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in state):
            raise CorruptWeightsError(f"{source}: the scene head does not match vision.scene_classes "
                                      f"({len(self.config.vision.scene_classes)} scenes)")
        self.scene_head.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})

    def scene_head_state_dict(self) -> dict[str, torch.Tensor]:
        """The scene head's tensors under their ``scene_head.*`` keys (empty without a head)."""
        if self.scene_head is None:
            return {}
        return {f"{SCENE_HEAD_PREFIX}{k}": v for k, v in self.scene_head.state_dict().items()}

    def set_scene_head(self, scenes: Sequence[str], head: nn.Linear) -> None:
        """Give the model a scene head (a copy of ``head``, one output per scene; stage 0's classifier)."""
        if head.out_features != len(scenes) or head.in_features != self.vision.num_features:
            raise ValueError(f"a scene head maps {self.vision.num_features} features to {len(scenes)} scenes")
        self.config.vision.scene_classes = list(scenes)
        self.scene_head = nn.Linear(head.in_features, head.out_features).to(self.device)
        self.scene_head.load_state_dict(head.state_dict())
        self.scene_head.requires_grad_(False)

    # ------------------------------------------------------------------------------------ saving
    def frozen_base_bridge_keys(self) -> set[str]:
        """Bridge weights that stay as initialised from the BERT checkpoint (``train_base_layers=False``)."""
        return frozen_base_keys(self.config, self.bridge)

    def trainable_bridge_parameters(self) -> list[nn.Parameter]:
        frozen = self.frozen_base_bridge_keys()
        return [p for k, p in self.bridge.named_parameters() if k not in frozen]

    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights a model directory stores in ``model.safetensors`` (not held by any base model)."""
        frozen = self.frozen_base_bridge_keys()
        state = {f"bridge.{k}": v for k, v in self.bridge.state_dict().items() if k not in frozen}
        if self.config.vision.tuned_blocks:
            state.update({f"vision.{k}": v for k, v in self.vision.tuned_state_dict(self.config.vision.tuned_blocks).items()})
        state.update(self.scene_head_state_dict())
        return state

    def _config_relative_to(self, target: Path) -> RSMoEConfig:
        """The config with relative local references re-expressed from ``target`` (``base:`` refs stay)."""
        config = RSMoEConfig.from_dict(self.config.to_dict())
        if self.source_dir is None:
            return config
        for part in (config.vision, config.qformer, config.llm):
            ref = part.path
            if ref and not ref.startswith("base:") and not Path(ref).is_absolute():
                absolute = (self.source_dir / ref).resolve()
                part.path = os.path.relpath(absolute, target.resolve())
        return config

    def save_pretrained(self, model_dir: str | Path, dtype: torch.dtype | None = None,
                        adapters: Sequence[str] | None = None) -> None:
        """Write config, trained weights (optionally cast, e.g. fp16), trained adapters and tokenizers.

        The directory is written next to the target and swapped in, so a failure never leaves a
        half-written model directory."""
        from safetensors.torch import save_file

        target = Path(model_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            saved_config = self._config_relative_to(target)
            saved_config.save(tmp)
            state = {k: (v.to(dtype) if dtype and v.is_floating_point() else v).detach().contiguous().cpu()
                     for k, v in self.trained_state_dict().items()}
            save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "model_id": self.config.model_id})
            # by default only adapters that were loaded trained or trained since (fresh ones rebuild the same)
            names = list(adapters) if adapters is not None else sorted(self.trained_adapters)
            for name in names:
                self.language_model.save_pretrained(tmp / ADAPTERS_DIR, selected_adapters=[name],
                                                    safe_serialization=True)
                if dtype is not None:
                    _cast_safetensors(tmp / ADAPTERS_DIR / name / "adapter_model.safetensors", dtype)
                _portable_adapter_config(tmp / ADAPTERS_DIR / name / "adapter_config.json", saved_config.llm.path)
            (tmp / ADAPTERS_DIR / "README.md").unlink(missing_ok=True)  # peft's generic card, with local paths
            self.tokenizer.save_pretrained(tmp / TOKENIZER_DIR)
            self.qformer_tokenizer.save_pretrained(tmp / QFORMER_TOKENIZER_DIR)
            if self.answer_head is not None:
                self.answer_head.save(tmp / ANSWER_HEAD_FILE)
            if target.exists():
                old = target.with_name(f".{target.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                # keep files the model does not write (model card, onnx/) across a re-save
                for extra in target.iterdir():
                    if not (tmp / extra.name).exists():
                        shutil.move(str(extra), tmp / extra.name)
                target.rename(old)
                tmp.rename(target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # ------------------------------------------------------------------------------------ forward parts
    @property
    def device(self) -> torch.device:
        return self.bridge.query_tokens.device

    @property
    def dtype(self) -> torch.dtype:
        return self.bridge.query_tokens.dtype

    def describe(self) -> dict[str, Any]:
        """Backend, device and precision (the service's health endpoint)."""
        return {"backend": "torch", "providers": [f"torch-{self.device.type}"], "device": str(self.device),
                "precision": str(self.dtype).removeprefix("torch.")}

    def preprocess(self, images: Sequence[Any]) -> torch.Tensor:
        """Images (HxWx3 uint8 arrays, PIL images or paths) -> pixel tensor on the model's device."""
        return self.image_processor(images).to(self.device, self.dtype)

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Frozen vision encoder: pixels -> visual tokens (B, N, D). Cache these per tile."""
        return self.vision(pixel_values.to(self.device, self.dtype))

    @torch.no_grad()
    def scene_logits(self, visual: torch.Tensor) -> torch.Tensor | None:
        """The scene head on the mean visual token (B, scenes), or ``None`` without a head."""
        if self.scene_head is None:
            return None
        return self.scene_head(visual.to(self.device, self.dtype).mean(dim=1))

    def query_embeddings(self, visual: torch.Tensor, instructions: Sequence[str]) -> torch.Tensor:
        """Q-Former + projection: visual tokens and instruction texts -> LLM prefix embeddings (B, Q, W)."""
        enc = self.tokenize_instructions(instructions, return_tensors="pt")
        return self.bridge(visual.to(self.device, self.dtype), enc["input_ids"].to(self.device),
                           enc["attention_mask"].to(self.device))

    def language_inputs(self, prefix: torch.Tensor, prompts: Sequence[str],
                        targets: Sequence[str] | None = None) -> LanguageInputs:
        """Assemble ``[visual prefix; prompt (; target + eos)]`` rows, left-padded for generation or
        right-padded with ``labels`` (-100 outside the target) for training."""
        embed = self.language_model.get_input_embeddings()
        rows: list[torch.Tensor] = []
        label_rows: list[torch.Tensor] = []
        for i, prompt in enumerate(prompts):
            prompt_ids = self.prompt_ids(prompt)
            target_ids: list[int] = []
            if targets is not None:
                target_ids = self.tokenizer(targets[i], add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
            ids = torch.tensor(prompt_ids + target_ids, dtype=torch.long, device=self.device)
            rows.append(torch.cat([prefix[i], embed(ids).to(prefix.dtype)], dim=0))
            if targets is not None:
                label = torch.full((prefix.shape[1] + len(prompt_ids),), -100, dtype=torch.long, device=self.device)
                label_rows.append(torch.cat([label, torch.tensor(target_ids, dtype=torch.long, device=self.device)]))
        length = max(r.shape[0] for r in rows)
        width = rows[0].shape[1]
        embeds = prefix.new_zeros((len(rows), length, width))
        mask = torch.zeros((len(rows), length), dtype=torch.long, device=self.device)
        labels = torch.full((len(rows), length), -100, dtype=torch.long, device=self.device) if targets is not None else None
        for i, row in enumerate(rows):
            n = row.shape[0]
            if targets is None:  # left padding: generation continues every row at the same position
                embeds[i, length - n:] = row
                mask[i, length - n:] = 1
            else:
                embeds[i, :n] = row
                mask[i, :n] = 1
                labels[i, :n] = label_rows[i]  # type: ignore[index]
        return LanguageInputs(embeds, mask, labels)

    def loss(self, visual: torch.Tensor, prompts: Sequence[str], targets: Sequence[str],
             adapter: str | None = None) -> torch.Tensor:
        """Teacher-forced LM loss on ``targets`` for one adapter (training).

        The LM head runs only on target positions (the vocabulary projection is a fifth of a small
        LM's compute), which gives the same loss as the full forward pass."""
        prefix = self.query_embeddings(visual, prompts)
        batch = self.language_inputs(prefix, prompts, targets)
        base = self.language_model.get_base_model()
        context = self.use_adapter(adapter) if adapter else contextlib.nullcontext()
        with context:
            hidden = base.get_decoder()(inputs_embeds=batch.inputs_embeds,
                                        attention_mask=batch.attention_mask).last_hidden_state
        labels = batch.labels[:, 1:]  # type: ignore[index]
        selected = labels != -100
        logits = base.get_output_embeddings()(hidden[:, :-1][selected])
        return nn.functional.cross_entropy(logits.float(), labels[selected])

    @contextlib.contextmanager
    def use_adapter(self, name: str) -> Iterator[None]:
        """Run the LM through adapter ``name`` inside the block, leaving which parameters train unchanged.

        peft's ``set_adapter`` also sets ``requires_grad`` (True for the adapter it activates, False for every
        other). Autograd drops the gradient of a leaf that no longer requires grad when ``backward`` runs, so
        without restoring the flags only the adapter active after the block would ever learn."""
        previous = self.language_model.active_adapter
        flags = [(p, p.requires_grad) for n, p in self.language_model.named_parameters() if "lora_" in n]
        self.language_model.set_adapter(name)
        try:
            yield
        finally:
            self.language_model.set_adapter(previous)
            for param, requires_grad in flags:
                param.requires_grad_(requires_grad)

    @torch.no_grad()
    def generate_texts(self, visual: torch.Tensor, prompts: Sequence[str], adapters: Sequence[str],
                       max_new_tokens: int, num_beams: int = 1) -> list[str]:
        """Greedy decoding (beam search with ``num_beams`` > 1) of many rows in ONE mixed-adapter batch with KV
        cache.

        Row ``i`` sees visual tokens ``visual[i]`` and ``prompts[i]`` and runs through adapter
        ``adapters[i]`` (an expert, ``router`` or ``__base__``)."""
        prefix = self.query_embeddings(visual, prompts)
        batch = self.language_inputs(prefix, prompts)
        out = self.language_model.generate(
            inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask,
            adapter_names=list(adapters), max_new_tokens=max_new_tokens, do_sample=False, num_beams=num_beams,
            length_penalty=self.config.generation.length_penalty,
            repetition_penalty=self.config.generation.repetition_penalty,
            pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id,
        )
        return self.decode_texts(out)

def frozen_base_keys(config: RSMoEConfig, bridge: nn.Module) -> set[str]:
    """Bridge state keys initialised from the BERT checkpoint and kept frozen (empty when trained)."""
    if config.qformer.init != "minilm" or config.qformer.train_base_layers:
        return set()
    return {k for k in bridge.state_dict() if k.startswith("qformer.") and ".crossattention." not in k}


def _portable_adapter_config(path: Path, llm_ref: str) -> None:
    """peft records the base model's local path; store the config's reference (``base:...``) instead."""
    data = json.loads(path.read_text())
    data["base_model_name_or_path"] = llm_ref
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _cast_safetensors(path: Path, dtype: torch.dtype) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}, str(path),
              metadata={"format": "pt"})
