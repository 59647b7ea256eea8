"""The real lite architecture built from the provisioned base weights (integration, CPU)."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from engine.cli import main
from engine.model import RSMoEConfig, RSMoEModel

REPO = Path(__file__).resolve().parents[1]
UCM_IMAGE = REPO / "examples" / "ucm_denseresidential_test.png"
LITE_DIR = REPO / "engine" / "models" / "rsmoe-lite"


@pytest.fixture(scope="module")
def lite() -> RSMoEModel:
    return RSMoEModel.from_pretrained(LITE_DIR)


def test_lite_builds_from_the_base_weights_and_captions_a_real_image(lite: RSMoEModel) -> None:
    pixels = lite.preprocess([UCM_IMAGE])
    visual = lite.encode_images(pixels)
    assert visual.shape == (1, 49, 1280)  # EfficientNet-Lite0: a 7x7 map of 1280 features
    (result,) = lite.caption_features(visual, style="concise")
    assert result.text.strip()  # real generated text (meaningful once the trained weights land)
    assert [s.expert for s in result.segments] == ["theme"]


def test_qformer_text_path_equals_minilm(lite: RSMoEModel) -> None:
    """The MiniLM initialisation is exact: with no queries the Q-Former is the BERT it came from."""
    from transformers import BertModel

    from engine.base_models import base_model_dir

    bert = BertModel.from_pretrained(base_model_dir("minilm-l6")).eval()
    enc = lite.qformer_tokenizer(["many buildings along a road"], return_tensors="pt")
    with torch.no_grad():
        expected = bert(**enc).last_hidden_state
        got = lite.bridge.qformer(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    assert (expected - got).abs().max().item() < 1e-4


def test_cli_errors_are_one_line_with_distinct_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def run(*argv: str) -> tuple[int, str]:
        code = main(["-q", *argv])
        err = capsys.readouterr().err.strip()
        return code, err

    code, err = run("caption", "--model", str(tmp_path / "missing"), str(UCM_IMAGE))
    assert code == 3 and err.count("\n") == 0 and "model directory not found" in err

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    shutil.copy(REPO / "engine" / "models" / "rsmoe-lite" / "config.json", corrupt / "config.json")
    (corrupt / "model.safetensors").write_bytes(b"not safetensors at all")
    code, err = run("caption", "--model", str(corrupt), str(UCM_IMAGE))
    assert code == 5 and err.count("\n") == 0 and "corrupt" in err

    # base weights that are neither cached nor installable
    from engine import base_models

    config = json.loads((corrupt / "config.json").read_text())
    (corrupt / "model.safetensors").unlink()
    spec = base_models.BASE_MODELS["minilm-l6"]
    monkeypatch.setitem(base_models.BASE_MODELS, "minilm-l6", dataclasses.replace(spec, package="no_such_package_xyz"))
    home = tmp_path / "home"
    (home / "base").mkdir(parents=True)
    for name in ("efficientnet-lite0", "smollm2-135m-instruct"):  # only MiniLM is missing
        (home / "base" / name).symlink_to(base_models.base_model_dir(name))
    monkeypatch.setenv("RSMOE_HOME", str(home))
    (corrupt / "config.json").write_text(json.dumps(config))
    code, err = run("caption", "--model", str(corrupt), str(UCM_IMAGE))
    assert code == 4 and err.count("\n") == 0 and "pip install" in err


def test_init_model_writes_a_variant_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "rsmoe-7b"
    assert main(["-q", "init-model", "--variant", "7b", "--out", str(out), "--set", "llm.path=/models/ib7b"]) == 0
    config = RSMoEConfig.load(out)
    assert config.variant == "7b" and config.llm.path == "/models/ib7b"
    assert main(["-q", "init-model", "--variant", "13b", "--out", str(tmp_path / "x")]) == 3
    assert "unknown variant" in capsys.readouterr().err


def test_embedded_adapters_are_four_distinct_trained_adapters() -> None:
    """Stage 2 trains the router and each expert apart: no two of the shipped adapters are the same weights."""
    from safetensors.torch import load_file

    names = ["theme", "objects", "relations", "router"]
    weights = {n: load_file(str(LITE_DIR / "adapters" / n / "adapter_model.safetensors")) for n in names}
    for i, a in enumerate(names):
        assert any(v.abs().sum() > 0 for k, v in weights[a].items() if "lora_B" in k), f"{a} is the zero init"
        for b in names[i + 1:]:
            assert any(not torch.equal(weights[a][k], weights[b][k]) for k in weights[a]), f"{a} == {b}"


def test_embedded_router_writes_plans_and_the_scene_head_names_the_scene(lite: RSMoEModel) -> None:
    """The trained Instruction Router answers with a plan (not a caption) on a real image; the scene head names
    its scene, which the plan and the expert's prompt carry."""
    from engine.model.router_plan import parse_router_plan

    from engine.model.routing import router_prompt

    seen = 0.3048 * 256 / 224  # UCM's 1-foot pixels, 256 px read to 224: as the model was trained on it
    prompt = router_prompt(lite.config, lite.config.router.concise_instruction, seen)
    visual = lite.encode_images(lite.preprocess([UCM_IMAGE]))
    (text,) = lite.generate_texts(visual, [prompt], ["router"], lite.config.router.max_new_tokens)
    plan = parse_router_plan(text, lite.config.expert_names)
    assert plan is not None and plan.experts, f"the router wrote no plan: {text!r}"
    _, scene_logits = lite.encode([UCM_IMAGE])  # the head over the image's dihedral views
    (scene,) = lite.recognise_scenes(visual, scene_logits)
    assert scene in lite.config.vision.scene_classes and "residential" in scene  # a UCM dense-residential image
    (result,) = lite.caption([UCM_IMAGE], style="concise", resolutions=[seen])
    assert result.router == "generative" and result.plan.scene == scene
    assert scene in result.segments[0].prompt
