"""RS-MoE model core on tiny random checkpoints: persistence, mixed-adapter decoding, routing, variants."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.errors import CorruptWeightsError, ModelDirError, UserInputError
from engine.model import RSMoEConfig, RSMoEModel
from engine.model.config import GenerationSettings
from engine.model.image_processing import ImageProcessor, dihedral
from engine.model.router_plan import RouterPlan
from tests.tiny_models import (randomize_adapters, tiny_config_dict, write_tiny_instructblip, write_tiny_model_dir)


def _images(n: int, size: int = 40, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model_dir(tmp_path_factory.mktemp("tiny"))


@pytest.fixture()
def tiny_model(tiny_dir: Path) -> RSMoEModel:
    model = RSMoEModel.from_pretrained(tiny_dir)
    randomize_adapters(model)
    return model


def test_save_load_round_trip_is_bit_exact(tiny_dir: Path, tmp_path: Path) -> None:
    model = RSMoEModel.from_pretrained(tiny_dir)
    randomize_adapters(model)
    with torch.no_grad():
        for p in model.bridge.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    out = tiny_dir.parent / "roundtrip"
    model.save_pretrained(out)
    again = RSMoEModel.from_pretrained(out)
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    images = _images(2)
    assert [r.to_dict() for r in model.caption(images)] == [r.to_dict() for r in again.caption(images)]

    saved_llm = json.loads((out / "config.json").read_text())["llm"]["path"]
    adapter_config = json.loads((out / "adapters" / "theme" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == saved_llm  # portable: no machine-local path
    assert not (out / "adapters" / "README.md").exists()

    # from_config on that trained directory starts afresh (a training run's `init` may be a trained model)
    fresh = RSMoEModel.from_config(RSMoEConfig.load(out), model_dir=out)
    assert fresh.trained_adapters == set()
    lora_b = [p for n, p in fresh.language_model.named_parameters() if ".lora_B." in n]
    assert lora_b and all(torch.count_nonzero(p) == 0 for p in lora_b)


def test_fp16_save_is_compact_and_loads(tiny_model: RSMoEModel, tiny_dir: Path) -> None:
    out = tiny_dir.parent / "fp16"
    tiny_model.save_pretrained(out, dtype=torch.float16)
    from safetensors.torch import load_file

    assert all(v.dtype == torch.float16 for v in load_file(str(out / "model.safetensors")).values())
    again = RSMoEModel.from_pretrained(out)
    assert again.dtype == torch.float32
    diff = max((x - y).abs().max().item() for x, y in zip(tiny_model.bridge.parameters(), again.bridge.parameters()))
    assert diff < 1e-2


def test_mixed_adapter_batch_equals_each_expert_alone(tiny_model: RSMoEModel) -> None:
    model = tiny_model
    images = _images(2)
    visual = model.encode_images(model.preprocess(images))
    experts = model.config.expert_names
    prompts = [f"describe the {e} of this image" for e in experts for _ in range(2)]
    adapters = [e for e in experts for _ in range(2)]
    rows = visual.repeat(len(experts), 1, 1)
    # logits of one forward pass
    with torch.no_grad():
        prefix = model.query_embeddings(rows, prompts)
        batch = model.language_inputs(prefix, prompts)
        mixed = model.language_model(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask,
                                     adapter_names=adapters).logits
        for i, name in enumerate(adapters):
            with model.use_adapter(name):
                alone = model.language_model(inputs_embeds=batch.inputs_embeds[i:i + 1],
                                             attention_mask=batch.attention_mask[i:i + 1]).logits
            valid = batch.attention_mask[i].bool()
            assert (mixed[i, valid] - alone[0, valid]).abs().max().item() < 1e-5
    # the adapters really differ, so the test above can fail
    assert (mixed[0] - mixed[2]).abs().max().item() > 1e-3
    # tokens of greedy decoding with KV cache
    together = model.generate_texts(rows, prompts, adapters, max_new_tokens=8)
    for i, name in enumerate(adapters):
        alone = model.generate_texts(rows[i:i + 1], prompts[i:i + 1], [name], max_new_tokens=8)
        assert alone[0] == together[i]


def test_generation_is_deterministic(tiny_model: RSMoEModel) -> None:
    images = _images(3, seed=4)
    first = [r.text for r in tiny_model.caption(images, style="detailed")]
    second = [r.text for r in tiny_model.caption(images, style="detailed")]
    assert first == second
    assert all(isinstance(t, str) for t in first)


def test_detailed_caption_has_one_segment_per_expert_in_order(tiny_model: RSMoEModel) -> None:
    result = tiny_model.caption(_images(1))[0]
    assert [s.expert for s in result.segments] == ["theme", "objects", "relations"]
    assert result.router == "generative"  # random router output is no plan -> template plan per image
    concise = tiny_model.caption(_images(1), style="concise")[0]
    assert [s.expert for s in concise.segments] == ["theme"]


def test_generative_router_prompts_reach_the_right_experts(tiny_model: RSMoEModel, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model
    model.trained_adapters.add("router")  # pretend the router adapter is trained
    calls: list[tuple[list[str], list[str]]] = []
    real = model.generate_texts

    def spy(visual, prompts, adapters, max_new_tokens, num_beams=1):
        calls.append((list(prompts), list(adapters)))
        if adapters[0] == "router":
            return ["scene: beach | experts: relations", "garbage that is no plan"]
        return real(visual, prompts, adapters, max_new_tokens, num_beams)

    monkeypatch.setattr(model, "generate_texts", spy)
    results = model.ask(_images(2), "How many cars are there?")
    router_call, expert_call = calls
    assert router_call[1] == ["router", "router"]
    assert "How many cars are there?" in router_call[0][0]
    # image 0: the router chose relations and recognised a beach; image 1: garbage -> template (objects)
    assert expert_call[1] == ["relations", "objects"]
    assert "beach" in expert_call[0][0] and "How many cars are there?" in expert_call[0][0]
    assert results[0].plan == RouterPlan(scene="beach", experts=["relations"])
    assert results[1].plan.experts == ["objects"] and results[1].router == "generative"


def test_concise_captions_decode_with_the_configs_beams_and_the_rest_greedily(
        tiny_model: RSMoEModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """generation.num_beams reaches the concise caption's decoding only (a beam-search caption, not the greedy
    one); detailed captions and answers decode greedily."""
    model = tiny_model
    beams_asked: list[tuple[bool, int]] = []  # (a router call, beams)
    real = model.generate_texts

    def spy(visual, prompts, adapters, max_new_tokens, num_beams=1):
        beams_asked.append((adapters[0] == "router", num_beams))
        return real(visual, prompts, adapters, max_new_tokens, num_beams)

    images = _images(2)
    greedy = [r.text for r in model.caption(images, style="concise")]
    monkeypatch.setattr(model, "generate_texts", spy)
    monkeypatch.setattr(model.config.generation, "num_beams", 3)
    searched = [r.text for r in model.caption(images, style="concise")]
    model.caption(images, style="detailed")
    model.ask(images, "What is next to the road?")
    assert [beams for router, beams in beams_asked if not router] == [3, 1, 1]  # concise, detailed, the answer
    assert {beams for router, beams in beams_asked if router} == {1}  # the router's plans
    assert searched != greedy


def test_detailed_caption_says_each_sentence_once() -> None:
    from engine.model.routing import ExpertOutput, fuse

    outputs = [ExpertOutput("theme", "p", "This is a rural area of farmland."),
               ExpertOutput("objects", "p", "this is a rural area of farmland"),
               ExpertOutput("relations", "p", "A road runs along the fields.")]
    order = ["theme", "objects", "relations"]
    assert fuse(outputs, "caption", "detailed", order) == "This is a rural area of farmland. A road runs along the fields."
    assert fuse(outputs, "caption", "concise", order) == "This is a rural area of farmland."
    # a near-duplicate (most words shared) is said once too; a sentence that only shares some words stays
    near = [ExpertOutput("theme", "p", "This is a rural area of farmland."),
            ExpertOutput("objects", "p", "This is a rural area with farmland."),
            ExpertOutput("relations", "p", "The houses and farmland are in a rural area of grassland.")]
    assert fuse(near, "caption", "detailed", order) == ("This is a rural area of farmland. "
                                                        "The houses and farmland are in a rural area of grassland.")
    wider = [ExpertOutput("theme", "p", "This is a rural area of farmland with a forest and a river."), *near[1:]]
    assert fuse(wider, "caption", "detailed", order) == (  # all of the objects' words are in the theme's sentence
        "This is a rural area of farmland with a forest and a river. "
        "The houses and farmland are in a rural area of grassland.")


def test_template_router_routes_questions_by_kind(tiny_dir: Path) -> None:
    untrained = RSMoEModel.from_pretrained(tiny_dir)
    assert untrained.router_kind == "template"  # no trained router adapter: the fixed-template router
    image = _images(1)
    assert untrained.ask(image, "How many tennis courts are there?")[0].router == "template"
    tiny_model = untrained
    assert tiny_model.ask(image, "How many tennis courts are there?")[0].plan.experts == ["objects"]
    assert tiny_model.ask(image, "What is next to the river?")[0].plan.experts == ["relations"]
    assert tiny_model.ask(image, "Is this area rural or urban?")[0].plan.experts == ["theme"]


def test_bad_questions_and_styles_are_user_errors(tiny_model: RSMoEModel) -> None:
    with pytest.raises(UserInputError):
        tiny_model.ask(_images(1), "x" * 10_000)
    with pytest.raises(UserInputError):
        tiny_model.ask(_images(1), "   ")
    with pytest.raises(UserInputError):
        tiny_model.caption(_images(1), style="poetic")


def test_training_loss_is_finite_and_differentiable(tiny_model: RSMoEModel) -> None:
    model = tiny_model
    model.bridge.requires_grad_(True)
    visual = model.encode_images(model.preprocess(_images(2)))
    loss = model.loss(visual, ["describe", "describe"], ["many houses", "a river"], adapter="theme")
    loss.backward()
    assert torch.isfinite(loss)
    assert model.bridge.projection.weight.grad is not None


def test_instructblip_variant_from_a_local_checkpoint(tmp_path: Path) -> None:
    ckpt = write_tiny_instructblip(tmp_path / "instructblip")
    config = tiny_config_dict(str(ckpt), str(ckpt), str(ckpt), variant="7b", vision_type="instructblip",
                              qformer_init="instructblip", llm_type="instructblip")
    model_dir = tmp_path / "rsmoe-7b"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(config))
    model = RSMoEModel.from_pretrained(model_dir)
    from safetensors.torch import load_file

    source = load_file(str(ckpt / "model.safetensors"))
    assert torch.equal(model.bridge.query_tokens.data, source["query_tokens"])
    assert torch.equal(model.bridge.projection.weight.data, source["language_projection.weight"])
    vision_key = next(k for k in source if k.startswith("vision_model.") and k.endswith("weight"))
    assert torch.equal(model.vision.model.state_dict()[vision_key[len("vision_model."):]], source[vision_key])
    results = model.caption(_images(2, size=32))
    assert len(results) == 2 and [s.expert for s in results[0].segments] == ["theme", "objects", "relations"]


def test_packaged_variant_configs_parse() -> None:
    from engine.model import list_variants

    assert {"lite", "1b", "7b"} <= set(list_variants())
    lite = RSMoEConfig.variant("lite")
    assert lite.expert_names == ["theme", "objects", "relations"]
    assert lite.vision.type == "efficientnet_lite0" and lite.llm.path.startswith("base:")
    with pytest.raises(ModelDirError):
        RSMoEConfig.variant("13b")
    for bad in ({"num_beams": 0}, {"num_beams": 64}, {"repetition_penalty": 0.0}):
        with pytest.raises(ModelDirError, match="generation"):
            GenerationSettings(**bad)


def test_model_dir_errors(tmp_path: Path, tiny_dir: Path) -> None:
    with pytest.raises(ModelDirError):
        RSMoEModel.from_pretrained(tmp_path / "nope")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(ModelDirError):
        RSMoEModel.from_pretrained(tmp_path / "bad")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text((tiny_dir / "config.json").read_text().replace('"../', f'"{tiny_dir.parent}/'))
    (corrupt / "model.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(CorruptWeightsError):
        RSMoEModel.from_pretrained(corrupt)


def test_target_only_loss_equals_the_full_forward_loss(tiny_model: RSMoEModel) -> None:
    model = tiny_model
    visual = model.encode_images(model.preprocess(_images(2)))
    prompts, targets = ["describe", "what objects"], ["many houses near the road", "a river"]
    with torch.no_grad():
        fast = model.loss(visual, prompts, targets, adapter="objects")
        batch = model.language_inputs(model.query_embeddings(visual, prompts), prompts, targets)
        with model.use_adapter("objects"):
            full = model.language_model(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask,
                                        labels=batch.labels).loss
    assert abs(fast.item() - full.item()) < 1e-5


def test_frozen_base_layers_are_not_stored_and_reload_from_the_base(tiny_dir: Path) -> None:
    config = json.loads((tiny_dir / "config.json").read_text())
    config["qformer"]["train_base_layers"] = False
    frozen_dir = tiny_dir.parent / "frozen"
    frozen_dir.mkdir(exist_ok=True)
    (frozen_dir / "config.json").write_text(json.dumps(config))
    model = RSMoEModel.from_pretrained(frozen_dir)
    trainable = model.trainable_bridge_parameters()
    assert 0 < len(trainable) < len(list(model.bridge.parameters()))
    with torch.no_grad():
        for p in trainable:
            p.add_(0.01)
    model.save_pretrained(frozen_dir)
    from safetensors.torch import load_file

    stored = load_file(str(frozen_dir / "model.safetensors"))
    assert not any(k.startswith("bridge.qformer.") and ".crossattention." not in k for k in stored)
    assert any(".crossattention." in k for k in stored)
    again = RSMoEModel.from_pretrained(frozen_dir)
    for (key, a), b in zip(model.bridge.state_dict().items(), again.bridge.state_dict().values()):
        assert torch.equal(a, b), key


def test_scene_head_round_trip_and_the_router_takes_its_scene(tiny_dir: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A model with a scene head saves and reloads it exactly; the generative router's plans carry the head's
    scene (the router adapter still picks the experts); a head that does not match its config is corrupt."""
    model = RSMoEModel.from_pretrained(tiny_dir)
    randomize_adapters(model)
    head = torch.nn.Linear(model.vision.num_features, 2)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([0.0, 1.0]))  # always the second scene
    model.set_scene_head(["beach", "tennis court"], head)
    model.save_pretrained(tmp_path / "m")
    loaded = RSMoEModel.from_pretrained(tmp_path / "m")
    assert loaded.config.vision.scene_classes == ["beach", "tennis court"]
    visual = loaded.encode_images(loaded.preprocess(_images(2)))
    assert torch.equal(loaded.scene_logits(visual), model.scene_logits(visual))
    assert loaded.recognise_scenes(visual) == ["tennis court", "tennis court"]

    loaded.trained_adapters.add("router")
    real = loaded.generate_texts
    plan_text = "scene: beach | experts: relations"
    monkeypatch.setattr(loaded, "generate_texts", lambda v, prompts, adapters, n, beams=1: (
        [plan_text] * len(prompts) if adapters[0] == "router" else real(v, prompts, adapters, n, beams)))
    results = loaded.ask_features(visual, ["Where is the road?", "Where is the road?"])
    head_probability = math.exp(1.0) / (1.0 + math.exp(1.0))  # softmax of the logits (0, 1)
    for result in results:
        assert (result.plan.scene, result.plan.experts) == ("tennis court", ["relations"])
        assert result.plan.scene_confidence == pytest.approx(head_probability, abs=1e-6)
    assert "tennis court" in results[0].segments[0].prompt
    assert results[0].to_dict()["scene_confidence"] == pytest.approx(head_probability, abs=1e-4)  # rounded to 4 places
    # below vision.scene_min_confidence the plan names no scene: the experts get the neutral phrase
    loaded.config.vision.scene_min_confidence = 0.75
    (gated,) = loaded.caption_features(visual[:1], "concise")
    assert gated.plan.scene is None and gated.plan.scene_confidence == pytest.approx(head_probability, abs=1e-6)
    assert "tennis court" not in gated.segments[0].prompt
    assert loaded.config.router.unknown_scene in gated.segments[0].prompt
    assert loaded.ask_features(visual[:1], ["Where is the road?"])[0].plan.scene == "tennis court"  # concise only
    assert loaded.caption_features(visual[:1], "detailed")[0].plan.scene == "tennis court"
    loaded.config.vision.scene_min_confidence = 0.7
    assert loaded.caption_features(visual[:1], "concise")[0].plan.scene == "tennis court"
    loaded.trained_adapters.discard("router")  # no trained router (the dense baseline): template plan, no scene
    assert loaded.caption_features(visual, "concise")[0].plan.scene is None

    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["vision"]["scene_min_confidence"] = 1.5
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelDirError, match="scene_min_confidence"):
        RSMoEModel.from_pretrained(tmp_path / "m")
    config["vision"]["scene_min_confidence"] = 0.0
    config["vision"]["scene_classes"] = ["beach", "tennis court", "forest"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CorruptWeightsError, match="scene head"):
        RSMoEModel.from_pretrained(tmp_path / "m")

def test_scene_views_average_the_head_over_the_dihedral_views(tiny_dir: Path, tmp_path: Path) -> None:
    """With ``vision.scene_views`` = 8 the scene logits are the mean of the head's logits on the 8 rotated and
    flipped views, so an image and any turned copy of it get the same scene; with 1 view, the image alone."""
    model = RSMoEModel.from_pretrained(tiny_dir)
    torch.manual_seed(0)
    model.set_scene_head(["beach", "forest", "harbor"], torch.nn.Linear(model.vision.num_features, 3))
    images = _images(2, size=48)
    pixels = model.preprocess(images)
    visual = model.encode_images(pixels)
    assert torch.equal(model.view_scene_logits(pixels, visual), model.scene_logits(visual))

    model.config.vision.scene_views = 8
    averaged = model.view_scene_logits(pixels, visual)
    per_view = torch.stack([model.scene_logits(model.encode_images(model.preprocess([dihedral(a, v) for a in images])))
                            for v in range(8)])
    assert not torch.allclose(per_view[0], per_view[1], atol=1e-3)  # the views do differ
    torch.testing.assert_close(averaged, per_view.mean(dim=0), atol=1e-4, rtol=1e-4)
    model.trained_adapters.add("router")  # encode() computes the views for a generative router only
    turned, turned_logits = model.encode([dihedral(a, 6) for a in images])
    torch.testing.assert_close(turned_logits, averaged, atol=1e-4, rtol=1e-4)
    assert model.recognise_scenes(visual, averaged) == model.recognise_scenes(turned, turned_logits)

    # views only below a confidence: an image whose single view is surer keeps its single-view logits
    single = model.scene_logits(visual)
    confidence = torch.softmax(single.float(), dim=-1).max(dim=-1).values
    model.config.vision.scene_views_below = float(confidence.mean())  # between the two images' confidences
    assert confidence.min() < model.config.vision.scene_views_below < confidence.max()
    mixed = model.view_scene_logits(pixels, visual)
    sure, unsure = int(confidence.argmax()), int(confidence.argmin())
    torch.testing.assert_close(mixed[sure], single[sure])
    torch.testing.assert_close(mixed[unsure], averaged[unsure], atol=1e-4, rtol=1e-4)
    model.config.vision.scene_views_below = 0.0  # never: the image alone
    assert torch.equal(model.view_scene_logits(pixels, visual), single)
    model.config.vision.scene_views_below = 1.0

    model.save_pretrained(tmp_path / "m")  # the setting travels with the model directory
    assert RSMoEModel.from_pretrained(tmp_path / "m").config.vision.scene_views == 8
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["vision"]["scene_views"] = 9
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelDirError, match="scene_views"):
        RSMoEModel.from_pretrained(tmp_path / "m")


def test_dihedral_views_of_pixels_match_views_of_the_image() -> None:
    """Turning the preprocessed pixels (NumPy or torch, channels first) gives the pixels of the turned image
    (up to the resize's rounding)."""
    processor = ImageProcessor()
    image = _images(1, size=256, seed=4)[0]
    pixels = processor([image])
    for view in range(8):
        expected = processor([dihedral(image, view)])
        torch.testing.assert_close(dihedral(pixels, view, axes=(2, 3)), expected, atol=2e-4, rtol=0)
        np.testing.assert_allclose(dihedral(pixels.numpy(), view, axes=(2, 3)), expected.numpy(), atol=2e-4)
    assert len({dihedral(image, v).tobytes() for v in range(8)}) == 8
    with pytest.raises(ValueError):
        dihedral(image, 8)
