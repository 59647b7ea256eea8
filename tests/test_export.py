"""``rsmoe export`` and the ONNX Runtime backend.

Unit tests export a tiny random checkpoint (trained-looking adapters, every variant) once per module and
compare every graph and the backend's greedy texts with PyTorch. The ``slow`` tests export the real lite
model (base weights from ``rsmoe base-models``, randomised adapters so the experts differ) and compare
greedy captions of real UCM images.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from engine.backends import manifest as mf
from engine.backends.onnx import OnnxRSMoE, choose_providers, position_ids
from engine.errors import ModelDirError, UserInputError
from engine.model import RSMoEModel
from engine.runtime import load_model
from export.exporter import ExportOptions, export_model
from tests.tiny_models import randomize_adapters, write_tiny_model_dir

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FP32_TOL = 1e-3


def _images(n: int, size: int = 40, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


@pytest.fixture(scope="module")
def tiny_trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model dir whose adapters (router included) are saved with distinct non-zero weights, with a
    scene head."""
    root = tmp_path_factory.mktemp("onnx-tiny")
    model = RSMoEModel.from_pretrained(write_tiny_model_dir(root))
    randomize_adapters(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model.set_scene_head(["beach", "forest", "harbor"], torch.nn.Linear(model.vision.num_features, 3))
    model.save_pretrained(root / "trained")
    return root / "trained"


@pytest.fixture(scope="module")
def manifest(tiny_trained: Path) -> mf.Manifest:
    options = ExportOptions(variants=["fp32", "fp16", "int8", "static"], static_cache=96)
    return export_model(tiny_trained, options=options)


@pytest.fixture(scope="module")
def torch_model(tiny_trained: Path) -> RSMoEModel:
    return RSMoEModel.from_pretrained(tiny_trained)


@pytest.fixture(scope="module")
def backends(tiny_trained: Path, manifest: mf.Manifest) -> dict[str, OnnxRSMoE]:
    return {name: OnnxRSMoE.from_model_dir(tiny_trained, device="cpu", variant=name) for name in manifest.variants}


def _mixed_rows(model: RSMoEModel) -> tuple[list[str], list[str]]:
    adapters = ["theme", "objects", "relations", "router", "__base__", "objects"]
    prompts = ["describe the scene", "how many cars are there near the river", "what is next to the road",
               "plan the answer to: is this area urban", "describe", "count the houses and the trees in this image"]
    return prompts, adapters


# ------------------------------------------------------------------------------------------ manifest
def test_manifest_records_layout_io_precision_and_parity(manifest: mf.Manifest, tiny_trained: Path,
                                                          torch_model: RSMoEModel) -> None:
    export_dir = tiny_trained / mf.ONNX_DIR
    on_disk = json.loads((export_dir / mf.MANIFEST_NAME).read_text())
    assert mf.Manifest.from_dict(on_disk) == manifest
    assert on_disk["format"] == mf.FORMAT and on_disk["opset"] == 18
    assert manifest.layout["experts"] == "shared-base-row-lora" and "experts_why" in manifest.layout
    assert manifest.decoder.adapters == ["theme", "objects", "relations", "router"]
    assert set(manifest.trained_adapters) == set(manifest.decoder.adapters)
    geo = torch_model.language_model.get_base_model().config
    assert manifest.decoder.num_layers == geo.num_hidden_layers
    assert len(manifest.decoder.lora_modules) == geo.num_hidden_layers * len(torch_model.config.lora.target_modules)
    assert set(manifest.variants) == {"fp32", "fp16", "int8", "static"}
    assert {v.precision for v in manifest.variants.values()} == {"float32", "float16", "int8"}
    decoder = manifest.variants["fp32"].graphs["decoder"]
    names = [t.name for t in decoder.inputs]
    assert names[:4] == [mf.INPUTS_EMBEDS, mf.ATTENTION_MASK, mf.POSITION_IDS, mf.ADAPTER_MASK]
    assert names[4:] == [mf.past_name(i, k) for i in range(geo.num_hidden_layers) for k in ("key", "value")]
    assert [t.name for t in decoder.outputs][:2] == [mf.LOGITS, mf.present_name(0, "key")]
    assert decoder.inputs[0].shape == ["batch", "sequence", geo.hidden_size]
    assert decoder.inputs[4].shape[2] == "past_sequence" and decoder.outputs[1].shape[2] == "total_sequence"
    for name in ("fp32", "static"):
        parity = manifest.variants[name].parity
        for key in ("vision_max_abs", "bridge_max_abs", "prefill_logits_max_abs", "step_with_past_logits_max_abs"):
            assert parity[key] <= FP32_TOL, (name, key, parity[key])
        assert parity["greedy_identical"] is True
    assert manifest.variants["int8"].parity["prefill_top1_agreement"] >= 0.5
    for sub in (mf.TOKENIZER_DIR, mf.QFORMER_TOKENIZER_DIR):
        assert (export_dir / sub).is_dir()
    assert manifest.variants["int8"].decoder_bytes < manifest.variants["fp32"].decoder_bytes


# ------------------------------------------------------------------------------------------ graph parity
def test_vision_and_bridge_graphs_match_pytorch(torch_model: RSMoEModel, tiny_trained: Path,
                                                manifest: mf.Manifest) -> None:
    export_dir = tiny_trained / mf.ONNX_DIR
    pixels = torch_model.preprocess(_images(3, seed=7))
    vision = ort.InferenceSession(str(export_dir / manifest.variants["fp32"].graphs["vision"].path),
                                  providers=["CPUExecutionProvider"])
    with torch.no_grad():
        visual = torch_model.encode_images(pixels)
    (ort_visual,) = vision.run(None, {mf.PIXELS: pixels.numpy()})
    assert np.abs(ort_visual - visual.numpy()).max() <= FP32_TOL

    bridge = ort.InferenceSession(str(export_dir / manifest.variants["fp32"].graphs["bridge"].path),
                                  providers=["CPUExecutionProvider"])
    instructions = ["describe", "how many tennis courts are there near the river", "layout"]
    enc = torch_model.tokenize_instructions(instructions, return_tensors="np")
    with torch.no_grad():
        prefix = torch_model.query_embeddings(visual, instructions)
    (ort_prefix,) = bridge.run(None, {mf.VISUAL: visual.numpy(), mf.INSTRUCTION_IDS: enc["input_ids"],
                                      mf.INSTRUCTION_MASK: enc["attention_mask"]})
    assert ort_prefix.shape == tuple(prefix.shape)
    assert np.abs(ort_prefix - prefix.numpy()).max() <= FP32_TOL


def test_backend_encodes_many_images_in_cpu_chunks_with_the_same_tokens(backends: dict[str, OnnxRSMoE],
                                                                        torch_model: RSMoEModel) -> None:
    """More images than one CPU vision call takes (VISION_ROWS_CPU) are encoded in chunks: same tokens, in
    order, as torch's single pass."""
    from engine.backends import onnx as onnx_backend

    count = onnx_backend.VISION_ROWS_CPU * 2 + 3
    backend = backends["fp32"]
    calls: list[int] = []
    run = backend.graphs["vision"].run
    backend.graphs["vision"].run = lambda feeds: calls.append(len(feeds[mf.PIXELS])) or run(feeds)  # type: ignore[method-assign]
    try:
        pixels = torch_model.preprocess(_images(count, seed=11))
        got = backend.encode_images(pixels.numpy())
    finally:
        backend.graphs["vision"].run = run  # type: ignore[method-assign]
    assert calls == [onnx_backend.VISION_ROWS_CPU, onnx_backend.VISION_ROWS_CPU, 3]
    with torch.no_grad():
        expected = torch_model.encode_images(pixels).numpy()
    assert got.shape == expected.shape and np.abs(got - expected).max() <= FP32_TOL


@pytest.mark.parametrize("variant", ["fp32", "static"])
def test_decoder_logits_match_pytorch_with_past(variant: str, torch_model: RSMoEModel,
                                                backends: dict[str, OnnxRSMoE]) -> None:
    """Mixed-adapter prefill and three steps with past key/values: last-position logits within 1e-3."""
    model, backend = torch_model, backends[variant]
    prompts, adapters = _mixed_rows(model)
    if backend.variant.static:
        prompts, adapters = prompts[: backend.variant.static.batch], adapters[: backend.variant.static.batch]
    with torch.no_grad():
        visual = model.encode_images(model.preprocess(_images(len(prompts), seed=3)))
        batch = model.language_inputs(model.query_embeddings(visual, prompts), prompts)
        mask = batch.attention_mask
        out = model.language_model(inputs_embeds=batch.inputs_embeds, attention_mask=mask,
                                   position_ids=torch.from_numpy(position_ids(mask.numpy())),
                                   adapter_names=adapters, use_cache=True)
        logits = backend.decoder.start(batch.inputs_embeds.numpy(), mask.numpy(), backend.adapter_mask(adapters))
        assert np.abs(logits - out.logits[:, -1].numpy()).max() <= FP32_TOL
        past = out.past_key_values
        for _ in range(3):
            token = out.logits[:, -1].argmax(-1)
            embeds = model.language_model.get_input_embeddings()(token)[:, None]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = model.language_model(inputs_embeds=embeds, attention_mask=mask, past_key_values=past,
                                       position_ids=torch.from_numpy(position_ids(mask.numpy()))[:, -1:],
                                       adapter_names=adapters, use_cache=True)
            past = out.past_key_values
            logits = backend.decoder.step(embeds.numpy())
            assert np.abs(logits - out.logits[:, -1].numpy()).max() <= FP32_TOL
    # the adapters really differ (so the comparison above covers per-row LoRA)
    assert np.abs(logits[0] - logits[1]).max() > 1e-3


def test_cpu_decoding_in_row_groups_gives_torch_texts(torch_model: RSMoEModel, backends: dict[str, OnnxRSMoE],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """More rows than one CPU decode takes (DECODE_ROWS_CPU) decode in groups, unpadded, with torch's texts."""
    from engine.backends import onnx as onnx_backend

    monkeypatch.setattr(onnx_backend, "DECODE_ROWS_CPU", 4)
    backend = backends["fp32"]
    prompts, adapters = _mixed_rows(torch_model)
    visual = torch_model.encode_images(torch_model.preprocess(_images(len(prompts), seed=5)))
    groups: list[int] = []
    greedy = backend.greedy
    monkeypatch.setattr(backend, "greedy", lambda embeds, *rest: groups.append(len(embeds)) or greedy(embeds, *rest))
    got = backend.generate_texts(visual.numpy(), prompts, adapters, max_new_tokens=8)
    assert groups == [4, 2]
    assert got == torch_model.generate_texts(visual, prompts, adapters, max_new_tokens=8)


# ------------------------------------------------------------------------------------------ backend
def _assert_same_results(got: list, expected: list) -> None:
    """The same texts, plans and segments; the scene head's probability equal up to float rounding."""
    got_dicts, expected_dicts = [r.to_dict() for r in got], [r.to_dict() for r in expected]
    got_confidences = [d.pop("scene_confidence") for d in got_dicts]
    expected_confidences = [d.pop("scene_confidence") for d in expected_dicts]
    assert got_dicts == expected_dicts
    assert got_confidences == pytest.approx(expected_confidences, abs=2e-4)  # rounded to 4 places


@pytest.mark.parametrize("variant", ["fp32", "static"])
def test_onnx_backend_greedy_texts_equal_torch(variant: str, torch_model: RSMoEModel,
                                              backends: dict[str, OnnxRSMoE]) -> None:
    backend = backends[variant]
    images = _images(2, seed=11)
    visual = torch_model.encode_images(torch_model.preprocess(images))
    prompts, adapters = _mixed_rows(torch_model)
    rows = visual[[i % 2 for i in range(len(prompts))]]
    # one mixed batch: every expert, the router and the base model (6 rows: two static batches)
    expected = torch_model.generate_texts(rows, prompts, adapters, max_new_tokens=8)
    assert backend.generate_texts(rows.numpy(), prompts, adapters, max_new_tokens=8) == expected
    assert len(set(expected)) > 1
    # the whole flow (generative router, experts, fusion) and torch features from a feature cache
    _assert_same_results(backend.caption(images, style="detailed"), torch_model.caption(images, style="detailed"))
    _assert_same_results(backend.caption_features(visual, style="concise"),
                         torch_model.caption_features(visual, style="concise"))
    _assert_same_results(backend.ask(images[:1], "How many cars are there?"),
                         torch_model.ask(images[:1], "How many cars are there?"))


@pytest.mark.parametrize(("variant", "beams"), [("fp32", 3), ("fp32", 2), ("static", 3), ("static", 2)])
def test_onnx_backend_beam_search_texts_equal_torch(variant: str, beams: int, torch_model: RSMoEModel,
                                                   backends: dict[str, OnnxRSMoE]) -> None:
    """Beam search in numpy over the exported decoder writes transformers' beam-search texts (the static profile:
    its fixed batch of 3 rows holds one prompt's beams, padded for 2 beams), and they are not the greedy ones."""
    backend = backends[variant]
    visual = torch_model.encode_images(torch_model.preprocess(_images(2, seed=11)))
    prompts, adapters = _mixed_rows(torch_model)
    rows = visual[[i % 2 for i in range(len(prompts))]]
    expected = torch_model.generate_texts(rows, prompts, adapters, max_new_tokens=10, num_beams=beams)
    assert backend.generate_texts(rows.numpy(), prompts, adapters, max_new_tokens=10, num_beams=beams) == expected
    assert expected != torch_model.generate_texts(rows, prompts, adapters, max_new_tokens=10)


def test_beam_search_drops_finished_prompts_with_the_same_tokens() -> None:
    """A prompt whose search is over leaves the cache (its beams' rows) and no prompt's result changes."""
    from engine.backends.decoding import beam_search

    lengths = [1, 6, 2, 9, 3]
    outputs = {}
    for can_drop in (False, True):
        decoder = _ScriptedDecoder([n for n in lengths for _ in range(2)], can_drop)
        n = len(lengths)
        tokens = beam_search(decoder, lambda ids: np.zeros((len(ids), 4), np.float32), np.zeros((n, 3, 4)),
                             np.ones((n, 3)), np.zeros((n, 2)), max_new_tokens=12, num_beams=2, eos=7, pad=0)
        outputs[can_drop] = tokens, decoder.batches
    (kept, kept_batches), (dropped, dropped_batches) = outputs[False], outputs[True]
    np.testing.assert_array_equal(dropped, kept)
    assert [int((row == 7).argmax()) for row in kept] == lengths
    assert set(kept_batches) == {10} and dropped_batches[-1] == 2 and sum(dropped_batches) < sum(kept_batches)


def test_int8_variant_runs_with_quantised_weights(backends: dict[str, OnnxRSMoE], tiny_trained: Path,
                                                   manifest: mf.Manifest) -> None:
    graph = onnx.load(str(tiny_trained / mf.ONNX_DIR / manifest.variants["int8"].graphs["decoder"].path),
                      load_external_data=False)
    ops = {n.op_type for n in graph.graph.node}
    assert "MatMulNBits" in ops, ops
    results = backends["int8"].caption(_images(2, seed=5), style="detailed")
    assert len(results) == 2 and all(len(r.segments) == 3 for r in results)
    assert backends["int8"].describe()["precision"] == "int8"


def test_int8_dynamic_scheme_keeps_down_projections_float(tiny_trained: Path, tmp_path: Path) -> None:
    out = tmp_path / "onnx-dynamic"
    manifest = export_model(tiny_trained, out, ExportOptions(variants=["int8"], int8_scheme="dynamic", parity=False))
    assert set(manifest.variants) == {"fp32", "int8"} and manifest.versions["int8_scheme"] == "dynamic"
    graph = onnx.load(str(out / manifest.variants["int8"].graphs["decoder"].path), load_external_data=False).graph
    shapes = {i.name: list(i.dims) for i in graph.initializer}
    assert {n.op_type for n in graph.node} & {"MatMulInteger", "DynamicQuantizeMatMul"}
    float_weights = [shapes[n.input[1]] for n in graph.node if n.op_type == "MatMul" and n.input[1] in shapes]
    intermediate = json.loads((tiny_trained.parent / "llama" / "config.json").read_text())["intermediate_size"]
    assert float_weights and all(w[0] == intermediate for w in float_weights)  # only the down projections
    backend = OnnxRSMoE.from_model_dir(tiny_trained, device="cpu", variant="int8", export_dir=out)
    assert len(backend.caption(_images(1), style="detailed")[0].segments) == 3


def test_fp16_variant_has_float16_io_and_runs(backends: dict[str, OnnxRSMoE], manifest: mf.Manifest) -> None:
    decoder = manifest.variants["fp16"].graphs["decoder"]
    dtypes = {t.name: t.dtype for t in decoder.inputs + decoder.outputs}
    assert dtypes[mf.INPUTS_EMBEDS] == "float16" and dtypes[mf.present_name(0, "key")] == "float16"
    assert dtypes[mf.ATTENTION_MASK] == "int64"
    assert manifest.variants["fp16"].parity["prefill_logits_max_abs"] < 0.1
    assert all(isinstance(r.text, str) for r in backends["fp16"].caption(_images(1), style="concise"))


def test_static_profile_has_no_dynamic_dims(tiny_trained: Path, manifest: mf.Manifest) -> None:
    static = manifest.variants["static"]
    assert static.static == mf.StaticProfile(batch=3, cache_length=96, instruction_tokens=64, image_size=32)
    for name, spec in static.graphs.items():
        graph = onnx.load(str(tiny_trained / mf.ONNX_DIR / spec.path), load_external_data=False).graph
        for value in list(graph.input) + list(graph.output):
            dims = value.type.tensor_type.shape.dim
            assert dims and all(d.HasField("dim_value") and d.dim_value > 0 for d in dims), (name, value.name)
        assert all(isinstance(d, int) for t in spec.inputs + spec.outputs for d in t.shape)
    assert [t.shape for t in static.graphs["decoder"].inputs][:4] == [[3, 1, 32], [3, 96], [3, 1], [1]]


def test_backend_describe_and_providers(backends: dict[str, OnnxRSMoE], torch_model: RSMoEModel) -> None:
    info = backends["fp32"].describe()
    assert info["backend"] == "onnx" and info["device"] == "cpu" and info["precision"] == "float32"
    assert info["providers"] == ["CPUExecutionProvider"]
    assert torch_model.describe()["backend"] == "torch"


def test_providers_prefer_tensorrt_then_cuda_then_cpu() -> None:
    offered = ["CPUExecutionProvider", "AzureExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"]
    assert choose_providers("auto", offered) == ["TensorrtExecutionProvider", "CUDAExecutionProvider",
                                                  "CPUExecutionProvider"]
    assert choose_providers("cuda", offered)[0] == "TensorrtExecutionProvider"
    assert choose_providers("cpu", offered) == ["CPUExecutionProvider"]
    assert choose_providers("auto", ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    with pytest.raises(UserInputError):
        choose_providers("cuda", ["CPUExecutionProvider"])
    assert choose_providers("auto") == [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider",
                                                    "CPUExecutionProvider") if p in ort.get_available_providers()]


def test_load_model_onnx_backend_and_errors(tiny_trained: Path, manifest: mf.Manifest, tmp_path: Path) -> None:
    backend = load_model(tiny_trained, backend="onnx", device="cpu", dtype="int8")
    assert isinstance(backend, OnnxRSMoE) and backend.variant_name == "int8"
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((tiny_trained / "config.json").read_text())
    with pytest.raises(ModelDirError, match=re.escape(f"rsmoe export --model {bare}")):
        load_model(bare, backend="onnx", device="cpu")
    with pytest.raises(UserInputError):
        load_model(tiny_trained, backend="onnx", device="cpu", dtype="bfloat16")
    with pytest.raises(ModelDirError, match="--variants"):
        OnnxRSMoE.from_model_dir(tiny_trained, device="cpu", variant="nope")
    with pytest.raises(ModelDirError):
        backend.adapter_mask(["no-such-expert"])


def test_stale_export_is_refused(tiny_trained: Path, manifest: mf.Manifest, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_trained, copy)
    assert OnnxRSMoE.from_model_dir(copy, device="cpu").describe()["backend"] == "onnx"
    config = json.loads((copy / "config.json").read_text())
    config["qformer"]["num_query_tokens"] = 8
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelDirError, match="since its ONNX export"):
        OnnxRSMoE.from_model_dir(copy, device="cpu")


def test_auto_backend_takes_a_current_export_and_falls_back_to_torch(tiny_trained: Path,
                                                                      manifest: mf.Manifest) -> None:
    """``--backend auto`` runs the exported graphs when they are there and made from the model as it is, torch
    otherwise (no export, a stale one, or a precision only torch has); ``int8`` needs the export."""
    import shutil

    from engine.pipeline import Pipeline

    def resolve_backend(model_dir: Path, backend: str, device: str, dtype: str | None = None) -> str:
        return load_model(model_dir, backend, device, dtype).describe()["backend"]

    assert resolve_backend(tiny_trained, "auto", "cpu") == "onnx"
    assert resolve_backend(tiny_trained, "auto", "cpu", "bfloat16") == "torch"
    assert resolve_backend(tiny_trained, "auto", "cpu", "int8") == "onnx"
    assert load_model(tiny_trained, "auto", "cpu", "int8").variant_name == "int8"
    assert resolve_backend(tiny_trained, "torch", "cpu") == "torch"  # asked for: taken as asked
    pipeline = Pipeline.load(tiny_trained, "auto", "cpu")
    assert isinstance(pipeline.model, OnnxRSMoE) and pipeline.info.backend == "onnx"
    copy = tiny_trained.parent / "auto-copy"  # beside it: the tiny model names its base parts relatively
    shutil.copytree(tiny_trained, copy, ignore=shutil.ignore_patterns(mf.ONNX_DIR))
    assert resolve_backend(copy, "auto", "cpu") == "torch"  # no export
    shutil.copytree(tiny_trained / mf.ONNX_DIR, copy / mf.ONNX_DIR)
    assert resolve_backend(copy, "auto", "cpu") == "onnx"
    config = json.loads((copy / "config.json").read_text())
    config["generation"]["max_new_tokens"] = 7
    (copy / "config.json").write_text(json.dumps(config))
    assert resolve_backend(copy, "auto", "cpu") == "torch"  # stale export
    assert Pipeline.load(copy, "auto", "cpu").info.backend == "torch"
    with pytest.raises(UserInputError, match="unknown backend"):
        resolve_backend(copy, "tensorflow", "cpu")
    # `rsmoe export --if-needed` (what set-up runs) leaves a current export alone and redoes a stale one
    from engine.cli import main

    written = (tiny_trained / mf.ONNX_DIR / mf.MANIFEST_NAME).stat().st_mtime_ns
    assert main(["export", "--model", str(tiny_trained), "--variants", "fp32", "--if-needed"]) == 0
    assert (tiny_trained / mf.ONNX_DIR / mf.MANIFEST_NAME).stat().st_mtime_ns == written
    assert main(["export", "--model", str(copy), "--variants", "fp32", "--if-needed", "--no-parity"]) == 0
    assert resolve_backend(copy, "auto", "cpu") == "onnx"


class _ScriptedDecoder:
    """A decoder whose rows emit scripted tokens (row i: ``lengths[i]`` tokens, then EOS), recording the batch
    size of each call; ``can_drop_rows`` as given."""

    max_batch = None  # a dynamic batch

    def __init__(self, lengths: list[int], can_drop: bool, vocab: int = 8, eos: int = 7) -> None:
        self.lengths, self.can_drop_rows, self.vocab, self.eos = lengths, can_drop, vocab, eos
        self.rows = np.arange(len(lengths))
        self.step_no, self.batches = 0, []

    def _logits(self) -> np.ndarray:
        self.batches.append(len(self.rows))
        logits = np.zeros((len(self.rows), self.vocab), np.float32)
        for k, row in enumerate(self.rows):
            logits[k, self.eos if self.step_no >= self.lengths[row] else 1 + row % 5] = 1.0
        return logits

    def start(self, embeds: np.ndarray, mask: np.ndarray, selector: np.ndarray) -> np.ndarray:
        return self._logits()

    def step(self, token_embeds: np.ndarray) -> np.ndarray:
        assert len(token_embeds) == len(self.rows)
        self.step_no += 1
        return self._logits()

    def keep_rows(self, rows: np.ndarray) -> None:
        self.rows = self.rows[rows]

    def steps_that_fit(self, max_new_tokens: int) -> int:
        return max_new_tokens


def test_greedy_drops_finished_rows_with_the_same_tokens() -> None:
    """Rows that emitted EOS leave the batch (the cache shrinks) and every row's tokens stay what they were."""
    from types import SimpleNamespace

    lengths = [1, 6, 2, 2, 9, 1, 3, 2]
    outputs = {}
    for can_drop in (False, True):
        decoder = _ScriptedDecoder(lengths, can_drop)
        backend = SimpleNamespace(decoder=decoder, tokenizer=SimpleNamespace(eos_token_id=7, pad_token_id=0),
                                  config=SimpleNamespace(generation=SimpleNamespace(repetition_penalty=1.3)),
                                  embed=lambda ids: np.zeros((len(ids), 4), np.float32))
        n = len(lengths)
        outputs[can_drop] = (OnnxRSMoE.greedy(backend, np.zeros((n, 3, 4)), np.ones((n, 3)), np.zeros((n, 2)), 12),
                             decoder.batches)
    (kept, kept_batches), (dropped, dropped_batches) = outputs[False], outputs[True]
    np.testing.assert_array_equal(dropped, kept)
    assert [int((row == 7).argmax()) for row in kept] == lengths  # each row ends where scripted
    assert set(kept_batches) == {8} and dropped_batches[-1] == 1 and sum(dropped_batches) < sum(kept_batches)


def test_export_cli_is_registered(tmp_path: Path) -> None:
    from engine.cli import build_parser, main

    args = build_parser().parse_args(["export", "--model", str(tmp_path), "--variants", "fp32,int8"])
    assert args.func.__module__ == "export.cli" and args.variants == "fp32,int8"
    assert build_parser().parse_args(["caption", "x.png", "--backend", "onnx"]).backend == "onnx"
    assert main(["export", "--model", str(tmp_path / "missing"), "--variants", "fp32"]) == ModelDirError.exit_code
    assert main(["export", "--model", str(tmp_path), "--variants", "fp64"]) == UserInputError.exit_code


def test_engine_never_imports_export() -> None:
    pattern = re.compile(r"^\s*(from|import)\s+export\b", re.M)
    offenders = [p for p in (REPO / "engine").rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []


# ------------------------------------------------------------------------------------------ real lite model
UCM_IMAGES = SHARED_DATA / "ucm_captions" / "images"


def _lite_ready() -> bool:
    try:
        from engine.base_models import resolve_model_ref

        resolve_model_ref("base:smollm2-135m-instruct")
        return True
    except Exception:  # noqa: BLE001 - any failure means the base weights are not provisioned
        return False


@pytest.mark.slow
@pytest.mark.skipif(not UCM_IMAGES.is_dir(), reason="../shared/data/ucm_captions not present")
def test_lite_model_onnx_captions_equal_torch(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Real lite model, adapters randomised so the experts differ: identical greedy captions torch vs ORT fp32."""
    if not _lite_ready():
        pytest.skip("base weights not provisioned (rsmoe base-models)")
    root = tmp_path_factory.mktemp("onnx-lite")
    model = RSMoEModel.from_pretrained(REPO / "engine" / "models" / "rsmoe-lite")
    randomize_adapters(model, scale=0.05)
    model.save_pretrained(root / "lite")
    manifest = export_model(root / "lite", options=ExportOptions(variants=["fp32"], parity=False))
    assert manifest.decoder.num_layers == 30 and manifest.decoder.adapters[-1] == "router"
    backend = OnnxRSMoE.from_model_dir(root / "lite", device="cpu", variant="fp32")
    for m in (model, backend):
        m.config.generation.max_new_tokens = 12
        m.config.router.max_new_tokens = 8
    data = json.loads((UCM_IMAGES.parent / "dataset.json").read_text())
    images = [UCM_IMAGES / i["filename"] for i in data["images"] if i.get("split") == "test"][:2]
    expected = model.caption(images, style="detailed")
    got = backend.caption(images, style="detailed")
    _assert_same_results(got, expected)
    segments = [s.text for s in expected[0].segments]
    assert len(set(segments)) == len(segments)  # the experts really differ


def test_scene_head_runs_on_onnx_as_in_torch(torch_model: RSMoEModel, backends: dict[str, OnnxRSMoE],
                                            tiny_trained: Path) -> None:
    """The scene head travels with the export (scene_head.safetensors) and names the same scenes."""
    rng = np.random.default_rng(7)
    images = [rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) for _ in range(4)]
    visual = torch_model.encode_images(torch_model.preprocess(images))
    expected = torch_model.scene_logits(visual).numpy()
    got = backends["fp32"].scene_logits(backends["fp32"].encode_images(backends["fp32"].preprocess(images)))
    assert np.abs(got - expected).max() < 1e-4
    assert backends["int8"].recognise_scenes(visual) == torch_model.recognise_scenes(visual)
    for model in (torch_model, backends["fp32"], backends["static"]):  # the averaged views, as in torch
        model.config.vision.scene_views = 8
    try:
        expected_views = torch_model.encode(images)[1].numpy()
        assert np.abs(expected_views - expected).max() > 1e-3  # the views change the logits
        for name in ("fp32", "static"):  # the static graph takes the 4 x 7 extra views in fixed-size chunks
            assert np.abs(backends[name].encode(images)[1] - expected_views).max() < 1e-4, name
    finally:
        for model in (torch_model, backends["fp32"], backends["static"]):
            model.config.vision.scene_views = 1
    (tiny_trained / mf.ONNX_DIR / mf.SCENE_HEAD_FILE).rename(tiny_trained / "moved.safetensors")
    try:
        with pytest.raises(ModelDirError, match="re-run `rsmoe export`"):
            OnnxRSMoE.from_model_dir(tiny_trained, device="cpu", variant="fp32")
    finally:
        (tiny_trained / "moved.safetensors").rename(tiny_trained / mf.ONNX_DIR / mf.SCENE_HEAD_FILE)
