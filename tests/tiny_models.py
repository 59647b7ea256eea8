"""Tiny random checkpoints written to disk in the real formats (BERT, Llama, ViT, InstructBLIP).

They let unit tests build every RS-MoE variant in seconds without any pretrained weights.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = (
    "a an the this is are there many some two three four five several and with of in on at to by near next beside "
    "along around between surrounded arranged rows neatly green white red large small dense sparse residential "
    "area scene image houses buildings trees roads road cars river lake beach forest farmland parking lot court "
    "tennis baseball field airplane airport runway harbor ships storage tanks freeway overpass intersection "
    "describe what kind how objects main number size colour relative each other answer briefly plan scene "
    "experts theme relations remote sensing question sentence one it its they sparse rural urban"
).split()


def _corpus() -> list[str]:
    return [" ".join(WORDS[i:i + 12]) for i in range(0, len(WORDS), 6)] * 4


def write_tiny_llama(path: Path, seed: int = 0) -> Path:
    """A 2-layer Llama with a small byte-level BPE tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", pad_token="<pad>")
    tokenizer.save_pretrained(path)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    return path


def write_tiny_bert(path: Path, seed: int = 0) -> Path:
    """A 2-layer BERT with a WordPiece vocabulary (stands in for MiniLM)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "?", "{", "}", ":"] + sorted(set(WORDS))
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(path / "vocab.txt")).save_pretrained(path)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(path, safe_serialization=True)
    return path


def write_tiny_vit(path: Path, image_size: int = 32, seed: int = 0) -> Path:
    """A tiny ViT vision model (stands in for any transformers vision tower)."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(seed)
    config = ViTConfig(image_size=image_size, patch_size=8, hidden_size=24, num_hidden_layers=1, num_attention_heads=4,
                       intermediate_size=48)
    ViTModel(config, add_pooling_layer=False).save_pretrained(path, safe_serialization=True)
    return path


def write_tiny_instructblip(path: Path, image_size: int = 32, seed: int = 0) -> Path:
    """A tiny InstructBLIP checkpoint (vision tower, Q-Former, projection, Llama) with both tokenizers."""
    from transformers import (AutoTokenizer, InstructBlipConfig, InstructBlipForConditionalGeneration,
                              InstructBlipQFormerConfig, InstructBlipVisionConfig, LlamaConfig)

    path.mkdir(parents=True, exist_ok=True)
    llama_dir = write_tiny_llama(path / "_llama", seed)
    bert_dir = write_tiny_bert(path / "_bert", seed)
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    llama_config = LlamaConfig.from_pretrained(llama_dir)
    torch.manual_seed(seed)
    config = InstructBlipConfig(
        vision_config=InstructBlipVisionConfig(image_size=image_size, patch_size=8, hidden_size=24,
                                               intermediate_size=48, num_hidden_layers=1,
                                               num_attention_heads=4).to_dict(),
        qformer_config=InstructBlipQFormerConfig(vocab_size=AutoTokenizer.from_pretrained(bert_dir).vocab_size,
                                                 hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                 intermediate_size=64, encoder_hidden_size=24).to_dict(),
        text_config=llama_config.to_dict(),
        num_query_tokens=4,
    )
    model = InstructBlipForConditionalGeneration(config)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    AutoTokenizer.from_pretrained(bert_dir).save_pretrained(path / "qformer_tokenizer")
    return path


def tiny_config_dict(vision: str, qformer: str, llm: str, variant: str = "tiny", router: str = "generative",
                     vision_type: str = "hf", qformer_init: str = "minilm", llm_type: str = "causal_lm",
                     image_size: int = 32) -> dict:
    """An RS-MoE config over tiny checkpoints (three experts, short generations)."""
    from engine.model.config import RSMoEConfig

    base = RSMoEConfig.variant("lite").to_dict()
    base.update(
        variant=variant, model_id=f"rsmoe-{variant}",
        vision={"type": vision_type, "path": vision},
        qformer={**base["qformer"], "init": qformer_init, "path": qformer, "num_query_tokens": 4,
                 "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
                 "cross_attention_frequency": 1, "train_base_layers": True},
        llm={"type": llm_type, "path": llm, "use_chat_template": False},
        lora={**base["lora"], "r": 4, "alpha": 8, "dropout": 0.0},
        router={**base["router"], "type": router, "max_new_tokens": 6},
        image={"image_size": image_size, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
        generation={"max_new_tokens": 8, "max_new_tokens_answer": 5, "repetition_penalty": 1.0},
    )
    return base


def write_tiny_model_dir(root: Path, router: str = "generative") -> Path:
    """A config-only RS-MoE model dir over tiny ViT + BERT + Llama checkpoints stored beside it."""
    write_tiny_vit(root / "vision")
    write_tiny_bert(root / "bert")
    write_tiny_llama(root / "llama")
    model_dir = root / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    config = tiny_config_dict("../vision", "../bert", "../llama", router=router)
    (model_dir / "config.json").write_text(json.dumps(config, indent=2))
    return model_dir


def randomize_adapters(model, seed: int = 1, scale: float = 0.5) -> None:
    """Give every LoRA adapter (router included) distinct non-zero weights, as if trained
    (fresh LoRA B matrices are zero)."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.language_model.named_parameters():
        if "lora_" in name:
            param.data.copy_(torch.randn(param.shape, generator=gen) * scale)
    model.trained_adapters.update(model.language_model.peft_config)
