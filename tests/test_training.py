"""The two-stage training loop on a tiny model and a few real UCM images: stages, resume, ablation."""
from __future__ import annotations

import json
import math
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from engine.errors import UserInputError
from engine.model import RSMoEConfig, RSMoEModel
from engine.model.answer_head import ANSWER_HEAD_FILE
from tests.tiny_models import write_tiny_model_dir
from training.config import TrainConfig
from training.data import load_ucm_captions
from training.samples import stage1_samples, stage2_samples

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
pytestmark = pytest.mark.skipif(not (SHARED / "ucm_captions").is_dir(), reason="needs ../shared/data")


@pytest.fixture(scope="module")
def tiny_init(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model_dir(tmp_path_factory.mktemp("tiny-train"))


def _config(init: Path, out: Path, **overrides: object) -> TrainConfig:
    data = {
        "init": str(init), "out": str(out), "cache_dir": str(out.parent / "cache"),
        "data": {"ucm": str(SHARED / "ucm_captions"), "max_train_images": 6, "max_val_images": 3, "augment_variants": 2},
        "stage1": {"epochs": 2, "batch_size": 4, "max_steps_per_epoch": 2, "vqa_per_epoch": 2, "warmup_steps": 1},
        "stage2": {"epochs": 1, "batch_size": 4, "max_steps_per_epoch": 2, "vqa_per_epoch": 2, "warmup_steps": 1},
        "checkpoint_every_steps": 1, "precision": "fp32",
    }
    data.update(overrides)
    return TrainConfig.from_dict(data)


def test_two_stages_write_model_dirs_the_engine_loads(tiny_init: Path, tmp_path: Path) -> None:
    from training.train import train

    final = train(_config(tiny_init, tmp_path / "run"))
    stage1 = tmp_path / "run" / "stage1"
    assert final == tmp_path / "run" / "stage2"
    dense = RSMoEModel.from_pretrained(stage1)
    assert dense.router_kind == "template"  # the dense baseline
    # every expert of the dense model is the same stage-1 adapter
    a = load_file(str(stage1 / "adapters" / "theme" / "adapter_model.safetensors"))
    b = load_file(str(stage1 / "adapters" / "relations" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)  # trained, not the zero init
    moe = RSMoEModel.from_pretrained(final)
    assert moe.router_kind == "generative"
    # stage 2 keeps the bridge of stage 1 (frozen) and changes the adapters
    s1 = load_file(str(stage1 / "model.safetensors"))
    s2 = load_file(str(final / "model.safetensors"))
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    changed = []
    for expert in ("theme", "objects", "relations"):
        c = load_file(str(final / "adapters" / expert / "adapter_model.safetensors"))
        changed.append(any(not torch.equal(b[k], c[k]) for k in b))
    assert any(changed)  # stage 2 trained the experts it drew samples for
    state = json.loads((final / "training_state.json").read_text())
    assert state["done"] and state["stage"] == "stage2" and state["history"]
    # the epoch is chosen on val captions and val derived-VQA answers together
    entry = state["history"][0]
    assert 0.0 <= entry["VQA"] <= 1.0 and entry["selection"] == pytest.approx(entry["CIDEr"] + entry["VQA"])
    assert state["best_score"] == max(e["selection"] for e in state["history"])
    assert moe.caption([SHARED / "ucm_captions" / "images" / "694.png"])[0].segments


def test_stage1_validation_answers_with_the_dense_adapter_in_every_expert(
        tiny_init: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The template router sends presence and count questions to the objects expert: while stage 1 trains
    only the dense adapter, its val answers must come from that adapter, as in the saved dense model."""
    import training.train as tt

    seen: list[tuple[str, bool]] = []
    real_validate = tt.validate

    def checking_validate(model: RSMoEModel, *args: object, **kwargs: object) -> dict:
        dense = tt.lora_parameters(model, "theme")
        objects = tt.lora_parameters(model, "objects")
        same = all(torch.equal(v, objects[k.replace(".theme.", ".objects.")]) for k, v in dense.items())
        seen.append((model.router_kind, same))
        return real_validate(model, *args, **kwargs)

    monkeypatch.setattr(tt, "validate", checking_validate)
    tt.train(_config(tiny_init, tmp_path / "run"))
    stage1_calls = [same for kind, same in seen[:2]]
    assert len(seen) == 3 and stage1_calls == [True, True]  # 2 stage-1 epochs, then 1 stage-2 epoch
    assert not seen[2][1]  # stage 2 trains the experts apart


def test_killed_run_resumes_to_the_same_weights(tiny_init: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import training.train as tt

    reference = tt.train(_config(tiny_init, tmp_path / "straight"))
    real_step = tt.train_step
    calls = {"n": 0}

    def dying_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # a checkpoint was written after steps 1 and 2
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(tt, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        tt.train(_config(tiny_init, tmp_path / "killed"))
    assert (tmp_path / "killed" / "checkpoints" / "stage1" / "state.json").is_file()
    monkeypatch.setattr(tt, "train_step", real_step)
    resumed = tt.train(_config(tiny_init, tmp_path / "killed"))
    for name in ("model.safetensors", "adapters/objects/adapter_model.safetensors"):
        x, y = load_file(str(reference / name)), load_file(str(resumed / name))
        assert all(torch.allclose(x[k].float(), y[k].float(), atol=1e-3) for k in x), name


def test_one_stage_ablation_skips_the_dense_stage(tiny_init: Path, tmp_path: Path) -> None:
    from training.train import train

    final = train(_config(tiny_init, tmp_path / "ablation", one_stage=True))
    assert not (tmp_path / "ablation" / "stage1").exists()
    assert RSMoEModel.from_pretrained(final).router_kind == "generative"


def test_continue_from_tunes_a_trained_model_further(tiny_init: Path, tmp_path: Path) -> None:
    """A run that continues from a trained model starts from its weights (not fresh ones), skips stages 0-1,
    trains the bridge and the adapters (or the adapters only, keeping the answer head), and repeats a set's
    images as configured."""
    from training.train import repeated, train

    head = {"enabled": True, "epochs": 2, "hidden": 8}
    first = train(_config(tiny_init, tmp_path / "first", answer_head=head))
    again = train(_config(tiny_init, tmp_path / "again", continue_from=str(first), answer_head=head,
                          data={"ucm": str(SHARED / "ucm_captions"), "max_train_images": 6, "max_val_images": 3,
                                "augment_variants": 2, "caption_repeats": {"ucm": 2}}))
    assert not (tmp_path / "again" / "stage1").exists()
    # the answer head is learnt last, from each finished model: the continued model relearns its own
    assert RSMoEModel.from_pretrained(first).answer_head is not None
    head_before = load_file(str(first / ANSWER_HEAD_FILE))
    head_after = load_file(str(again / ANSWER_HEAD_FILE))
    assert not torch.equal(head_before["mean"], head_after["mean"])
    before, after = load_file(str(first / "model.safetensors")), load_file(str(again / "model.safetensors"))
    bridge = [k for k in before if "query_tokens" in k or "projection" in k]
    assert bridge and any(not torch.equal(before[k], after[k]) for k in bridge)  # the bridge was trained on
    fresh = train(_config(tiny_init, tmp_path / "fresh", one_stage=True))
    assert not (fresh / ANSWER_HEAD_FILE).exists() and not RSMoEConfig.load(fresh).answer_head.enabled
    a = load_file(str(again / "adapters/theme/adapter_model.safetensors"))
    f = load_file(str(fresh / "adapters/theme/adapter_model.safetensors"))
    b = load_file(str(first / "adapters/theme/adapter_model.safetensors"))
    # two steps from the first run's adapter stay nearer to it than a fresh run's adapter does
    distance = lambda x, y: sum(float((x[k].float() - y[k].float()).norm()) for k in x)  # noqa: E731
    assert distance(a, b) < distance(f, b)
    records = load_ucm_captions(SHARED / "ucm_captions", split="train")[:3]
    assert [r.image_id for r in repeated(records, {"ucm": 2})] == [r.image_id for r in records for _ in (0, 1)]
    # stage2.continued_bridge: false moves only the LoRA: the bridge and the answer head learnt on it come through
    kept = train(_config(tiny_init, tmp_path / "kept", continue_from=str(first), answer_head=head,
                         stage2={"epochs": 1, "batch_size": 4, "max_steps_per_epoch": 2, "vqa_per_epoch": 2,
                                 "warmup_steps": 1, "continued_bridge": False}))
    assert load_file(str(kept / "model.safetensors")).keys() == before.keys()
    assert all(torch.equal(before[k], load_file(str(kept / "model.safetensors"))[k]) for k in bridge)
    assert torch.equal(head_before["mean"], load_file(str(kept / ANSWER_HEAD_FILE))["mean"])
    assert RSMoEConfig.load(kept).answer_head.enabled
    k = load_file(str(kept / "adapters/theme/adapter_model.safetensors"))
    assert any(not torch.equal(k[name], b[name]) for name in b)  # the experts were trained on
    with pytest.raises(UserInputError, match="continue_from"):
        train(_config(tiny_init, tmp_path / "bad", continue_from=str(tmp_path / "nowhere")))
    with pytest.raises(UserInputError, match="caption_repeats"):
        _config(tiny_init, tmp_path / "bad", data={"ucm": "x", "caption_repeats": {"ucm": 0}})


def test_samples_use_the_engine_prompts_and_sub_task_targets(tiny_init: Path) -> None:
    model = RSMoEModel.from_pretrained(tiny_init)
    records = load_ucm_captions(SHARED / "ucm_captions", split="train")[:5]
    ids = {str(r.image_path): r.image_id for r in records}
    s1 = stage1_samples(model.config, records, [], ids, "theme", random.Random(0), 0)
    assert {s.prompt for s in s1} == {"Describe this remote sensing image in one sentence."}
    assert all(s.target in next(r.captions for r in records if r.image_id == s.image_id) for s in s1)
    s2 = stage2_samples(model.config, records, [], ids, random.Random(0), 0)
    router = [s for s in s2 if s.adapter == "router"]
    assert len(router) == len(records) and all(s.target.startswith("scene: ") for s in router)
    relations = [s for s in s2 if s.adapter == "relations" and "arranged" in s.prompt]
    assert relations and all("remote sensing" not in s.prompt for s in relations)  # the true scene is filled in


def test_vqa_pairs_are_drawn_evenly_across_question_types() -> None:
    from training.data import derive_ucm_vqa
    from training.samples import sample_vqa

    pool = [q for q in derive_ucm_vqa(load_ucm_captions(SHARED / "ucm_captions")) if q.split == "train"]
    in_pool = Counter(q.question_type for q in pool)
    drawn = sample_vqa(pool, 1200, random.Random(0))
    per_type = Counter(q.question_type for q in drawn)
    assert len(drawn) == 1200 and len({q.question_id for q in drawn}) == 1200
    rare = min(in_pool, key=in_pool.get)
    assert in_pool[rare] < 300 and per_type[rare] == in_pool[rare]  # a small type gives all it has ...
    others = [per_type[t] for t in in_pool if t != rare]
    assert max(others) - min(others) <= 1  # ... and the others share the rest evenly
    assert len(sample_vqa(pool, len(pool) + 5, random.Random(0))) == len(pool)


def test_router_fraction_thins_the_router_rows(tiny_init: Path) -> None:
    model = RSMoEModel.from_pretrained(tiny_init)
    records = load_ucm_captions(SHARED / "ucm_captions", split="train")[:200]
    ids = {str(r.image_path): r.image_id for r in records}
    rows = stage2_samples(model.config, records, [], ids, random.Random(0), 0, router_fraction=0.25)
    routed = sum(s.adapter == "router" for s in rows)
    assert 25 <= routed <= 75  # about a quarter of 200 images (binomial, sd ~6)
    assert sum(s.prompt.startswith("Describe this ") for s in rows) == 200  # every image keeps its concise row
    for bad in (0.0, 1.5):
        with pytest.raises(UserInputError, match="router_fraction"):
            TrainConfig.from_dict({"stage2": {"router_fraction": bad}})


def test_concise_per_image_gives_distinct_references(tiny_init: Path) -> None:
    model = RSMoEModel.from_pretrained(tiny_init)
    records = load_ucm_captions(SHARED / "ucm_captions", split="train")[:50]
    ids = {str(r.image_path): r.image_id for r in records}
    rows = stage2_samples(model.config, records, [], ids, random.Random(0), 0, concise_per_image=2)
    concise: dict[int, list[str]] = {}
    for s in rows:
        if s.prompt.startswith("Describe this "):
            concise.setdefault(s.image_id, []).append(s.target)
    assert len(concise) == 50
    for record in records:  # two rows per image: two different references of it (drawn without replacement)
        targets = Counter(concise[record.image_id])
        assert sum(targets.values()) == 2 and not targets - Counter(record.captions)
    for bad in (0, 6):
        with pytest.raises(UserInputError, match="concise_per_image"):
            TrainConfig.from_dict({"stage2": {"concise_per_image": bad}})


def test_wrong_scene_rows_name_the_confusable_scene_with_the_true_targets(tiny_init: Path) -> None:
    """``wrong_scene_fraction``: that share of the caption rows names the image's confusable scene (the
    scene head's best wrong class), keeping the image's own targets; router and VQA rows keep the truth."""
    from training.data import derive_ucm_vqa
    from training.data.subtasks import infer_scene
    from training.features import FeatureStore
    from training.train import confusable_scenes

    model = RSMoEModel.from_pretrained(tiny_init)
    records = load_ucm_captions(SHARED / "ucm_captions", split="train")
    records = records[:30] + records[-30:]  # two classes: the split is class-ordered
    truth = {r.image_id: infer_scene(r.captions, r.class_name) for r in records}
    assert len(set(truth.values())) == 2
    head = torch.nn.Linear(model.vision.num_features, 3)
    with torch.no_grad():  # the same ranking for every image: the first class, then the second, then the third
        head.weight.zero_()
        head.bias.copy_(torch.tensor([3.0, 2.0, 1.0]))
    first = truth[records[0].image_id]
    model.set_scene_head([first, "beach", truth[records[-1].image_id]], head)
    store = FeatureStore(torch.randn(len(records), 1, 4, model.vision.num_features), [r.image_id for r in records])
    confusable = confusable_scenes(model, records, store)
    assert confusable == {r.image_id: (first if truth[r.image_id] != first else "beach") for r in records}

    ids = {str(r.image_path): r.image_id for r in records}
    vqa = [q for q in derive_ucm_vqa(records) if q.split == "train"]
    by_image = {r.image_id: r for r in records}
    questions = {q.question for q in vqa}
    for fraction in (0.0, 0.5):
        rows = stage2_samples(model.config, records, vqa, ids, random.Random(0), 200, concise_per_image=2,
                              confusable_scenes=confusable, wrong_scene_fraction=fraction)
        asked = [s for s in rows if s.adapter != "router" and any(q in s.prompt for q in questions)]
        captions = [s for s in rows if s.adapter != "router" and s not in asked]
        assert len(asked) == min(200, len(vqa)) and len(captions) >= 120  # 2 concise + sub-tasks per image
        assert all(truth[s.image_id] in s.prompt for s in asked)
        assert all(truth[s.image_id] in s.target for s in rows if s.adapter == "router")
        wrong = [s for s in captions if truth[s.image_id] not in s.prompt]
        assert all(confusable[s.image_id] in s.prompt for s in wrong)
        if fraction == 0.0:
            assert not wrong
        else:  # about half of them (binomial), with the image's own targets
            assert 0.35 * len(captions) <= len(wrong) <= 0.65 * len(captions)
            concise = [s for s in wrong if s.target in by_image[s.image_id].captions]
            assert concise and len(concise) < len(wrong)  # concise captions and sub-task targets alike
    for bad in (-0.1, 1.0):
        for key in ("wrong_scene_fraction", "neutral_scene_fraction"):
            with pytest.raises(UserInputError, match=key):
                TrainConfig.from_dict({"stage2": {key: bad}})


def test_neutral_scene_rows_name_no_scene_with_the_true_targets() -> None:
    """``neutral_scene_fraction``: that share of the caption rows gets the neutral phrase instead of the
    scene (what the experts see when the scene head is unsure), ``neutral_scene_sets`` another share for a
    set's rows; questions keep the true scene."""
    from engine.model import RSMoEConfig
    from training.data import derive_ucm_vqa
    from training.data.subtasks import infer_scene

    config = RSMoEConfig.variant("lite")
    neutral = config.router.unknown_scene
    records = load_ucm_captions(SHARED / "ucm_captions", split="train")[:40]
    truth = {r.image_id: infer_scene(r.captions, r.class_name) for r in records}
    ids = {str(r.image_path): r.image_id for r in records}
    vqa = [q for q in derive_ucm_vqa(records) if q.split == "train"]
    questions = {q.question for q in vqa}
    for fraction in (0.0, 0.5):
        rows = stage2_samples(config, records, vqa, ids, random.Random(0), 100, neutral_scene_fraction=fraction)
        asked = [s for s in rows if s.adapter != "router" and any(q in s.prompt for q in questions)]
        captions = [s for s in rows if s.adapter != "router" and s not in asked]
        assert all(truth[s.image_id] in s.prompt for s in asked)
        unnamed = [s for s in captions if truth[s.image_id] not in s.prompt]
        assert all(neutral in s.prompt for s in unnamed)
        if fraction == 0.0:
            assert not unnamed
        else:
            assert 0.35 * len(captions) <= len(unnamed) <= 0.65 * len(captions)
            assert {s.adapter for s in unnamed} == {"theme", "objects", "relations"}
    # neutral_scene_sets: another share for one set's rows (here UCM's: all but a few named none)
    rows = stage2_samples(config, records, vqa, ids, random.Random(0), 0, neutral_scene_fraction=0.0,
                          neutral_scene_sets={"ucm": 0.9, "aid": 0.0})
    captions = [s for s in rows if s.adapter != "router"]
    unnamed = [s for s in captions if truth[s.image_id] not in s.prompt]
    assert 0.8 * len(captions) <= len(unnamed) < len(captions)
    with pytest.raises(UserInputError, match="neutral_scene_sets.ucm"):
        TrainConfig.from_dict({"stage2": {"neutral_scene_sets": {"ucm": 1.5}}})
    with pytest.raises(UserInputError, match="continued_bridge"):  # a kept answer head would read new scene odds
        TrainConfig.from_dict({"stage2": {"continued_bridge": False}, "scene_head_refit": {"enabled": True}})


def test_evaluate_writes_coco_captions_metrics_and_vqa_answers(tiny_init: Path, tmp_path: Path) -> None:
    """`rsmoe evaluate` on any model dir: COCO-format captions keyed by the dataset's imgid, scored metrics."""
    from engine.cli import main

    out = tmp_path / "eval"
    code = main(["-q", "evaluate", "--model", str(tiny_init), "--data", str(SHARED / "ucm_captions"),
                 "--split", "test", "--out", str(out), "--limit", "3", "--vqa", "--no-meteor"])
    assert code == 0
    captions = json.loads((out / "captions.json").read_text())
    dataset = json.loads((SHARED / "ucm_captions" / "dataset.json").read_text())
    test_ids = [i["imgid"] for i in dataset["images"] if i["split"] == "test"]
    assert [c["image_id"] for c in captions] == [test_ids[0], test_ids[70], test_ids[140]]  # spread over classes
    assert all(isinstance(c["caption"], str) for c in captions)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 3 and metrics["split"] == "test"
    assert {"BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr"} <= set(metrics["captions"])
    assert metrics["plan_scene"] == {"source": "none (template router)", "images": 3, "accuracy": None}
    # UCM's images have a class: no scene head, so no class predictions (the error says so), captions written
    assert metrics["scene"]["accuracy"] is None and "no scene head" in metrics["scene"]["error"]
    assert not (out / "predictions.json").exists()
    answers = json.loads((out / "answers.json").read_text())
    assert len(answers) == metrics["vqa"]["count"] > 0
    assert {"question", "answer", "prediction", "question_type"} <= set(answers[0])

    code = main(["-q", "evaluate", "--model", str(tiny_init), "--data", str(tmp_path / "nowhere"),
                 "--split", "test", "--out", str(out)])
    assert code == 2  # a clear user error, not a traceback


@pytest.fixture(scope="module")
def tiny_efficientnet_init(tmp_path_factory: pytest.TempPathFactory, tiny_init: Path) -> Path:
    """The tiny model with the real EfficientNet-Lite0 encoder (stage 0 fine-tunes its top blocks)."""
    from tests.engine_helpers import lite_ready

    if not lite_ready():
        pytest.skip("the EfficientNet-Lite0 base weights are not provisioned")
    model_dir = tmp_path_factory.mktemp("tiny-effnet") / "model"
    model_dir.mkdir()
    config = json.loads((tiny_init / "config.json").read_text())
    config["vision"] = {"type": "efficientnet_lite0", "path": "base:efficientnet-lite0"}
    config["image"] = {"image_size": 224, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    for part in ("qformer", "llm"):  # the tiny checkpoints beside the tiny model dir
        config[part]["path"] = str((tiny_init / config[part]["path"]).resolve())
    (model_dir / "config.json").write_text(json.dumps(config))
    return model_dir


def test_stage0_tunes_the_top_vision_blocks_and_the_model_dir_keeps_them(tiny_efficientnet_init: Path,
                                                                         tmp_path: Path) -> None:
    from engine.errors import CorruptWeightsError
    from training.train import train

    config = _config(tiny_efficientnet_init, tmp_path / "run",
                     vision_tuning={"blocks": 2, "epochs": 2, "batch_size": 4, "variants": 2, "max_val_images": 4,
                                    "scene_views": 4},
                     scene_head_refit={"enabled": True, "epochs": 3, "max_train_per_set": {"ucm": 12},
                                       "max_val_per_set": {"ucm": 8}})
    final = train(config)
    assert train(config) == final  # a re-run reuses the finished stage 0 (and stages 1 and 2, and the refit)
    # the scene head was refitted after stage 2 on the train images (and kept only if val improved)
    refit = json.loads((final / "scene_head_refit.json").read_text())
    assert refit["train_images"] == {"ucm": 12} and refit["val_images"] == {"ucm": 8}
    before, after = refit["val_single_view_before"]["ucm"], refit["val_single_view_after"]["ucm"]
    assert refit["kept"] == (after > before)
    assert json.loads((final / "training_state.json").read_text())["done"]  # the stage's record survives
    state = json.loads((tmp_path / "run" / "vision" / "vision_state.json").read_text())
    assert state["done"] and [h["epoch"] for h in state["history"]] == [1, 2]
    assert all(0.0 <= h["val_accuracy"] <= 1.0 for h in state["history"])

    base = RSMoEModel.from_pretrained(tiny_efficientnet_init)  # config only: the base encoder
    tuned = RSMoEModel.from_pretrained(final)
    assert tuned.config.vision.tuned_blocks == 2
    assert tuned.config.vision.scene_views == 4 and len(tuned.config.vision.scene_classes) == 21
    with pytest.raises(UserInputError, match="scene_views"):
        _config(tiny_efficientnet_init, tmp_path / "bad", vision_tuning={"blocks": 2, "scene_views": 9})
    weights = load_file(str(final / "model.safetensors"))
    vision_keys = {k for k in weights if k.startswith("vision.")}
    assert vision_keys and all(k.startswith(("vision.net._blocks.14.", "vision.net._blocks.15.",
                                             "vision.net._conv_head.", "vision.net._bn1.")) for k in vision_keys)
    # the top blocks changed, the lower ones are the base's
    top, low = "net._blocks.15._project_conv.weight", "net._blocks.13._project_conv.weight"
    assert not torch.equal(base.vision.state_dict()[top], tuned.vision.state_dict()[top])
    assert torch.equal(base.vision.state_dict()[low], tuned.vision.state_dict()[low])
    pixels = tuned.preprocess([SHARED / "ucm_captions" / "images" / "694.png"])
    assert not torch.allclose(base.encode_images(pixels), tuned.encode_images(pixels))
    # a new run starting from the trained dir starts from the base encoder, and says so in its config
    fresh = RSMoEModel.from_config(tuned.config, model_dir=final)
    assert fresh.config.vision.tuned_blocks == 0
    assert torch.equal(fresh.vision.state_dict()[top], base.vision.state_dict()[top])

    # a model.safetensors whose tuned vision weights do not match its config is refused clearly
    config_json = json.loads((final / "config.json").read_text())
    config_json["vision"]["tuned_blocks"] = 3
    (final / "config.json").write_text(json.dumps(config_json))
    with pytest.raises(CorruptWeightsError, match="tuned_blocks=3"):
        RSMoEModel.from_pretrained(final)


def test_one_stage2_step_trains_every_adapter_it_has_rows_for(tiny_init: Path, tmp_path: Path) -> None:
    """peft's set_adapter flips requires_grad; a step over rows of four adapters must still update all four
    (before the fix only the adapter active after the forward passes learnt, so the router never did)."""
    from training.features import build_feature_store
    from training.samples import Sample
    from training.checkpoints import StagePosition
    from training.train import lora_parameters, prepare_optimisation, stage_parameters, train_step

    model = RSMoEModel.from_config(RSMoEModel.from_pretrained(tiny_init).config, model_dir=tiny_init)
    records = load_ucm_captions(SHARED / "ucm_captions", split="train")[:2]
    store = build_feature_store(model, records, tmp_path / "cache", "train", variants=1)
    adapters = ["theme", "objects", "relations", "router"]
    params = stage_parameters(model, "stage2")
    with torch.no_grad():  # peft starts lora_B at zero; a non-zero start makes every A and B receive gradient
        for name, p in params.items():
            if "lora_B" in name:
                p.normal_(std=0.02)
    before = {a: {k: v.detach().clone() for k, v in lora_parameters(model, a).items()} for a in adapters}
    stage = TrainConfig.from_dict({"stage2": {"lr": 1e-2, "warmup_steps": 0}}).stage2
    accelerator, module, optimizer = prepare_optimisation(model, params, stage, "fp32")
    batch = [Sample(r.image_id, "Describe this image.", "a field of green crops .", a) for a in adapters for r in records]
    train_step(module, model, optimizer, accelerator, batch, store, StagePosition())
    for adapter in adapters:
        after = lora_parameters(model, adapter)
        changed = [k for k in after if not torch.equal(after[k], before[adapter][k])]
        assert len(changed) == len(after), f"{adapter}: {len(after) - len(changed)} of {len(after)} LoRA tensors unchanged"


def test_evaluate_scores_the_scene_that_the_scene_head_names(tiny_init: Path, tmp_path: Path) -> None:
    """With a trained router and a scene head, metrics.json scores the plans' scenes (``plan_scene``) and the
    head's classes (``scene``, argmax among the set's classes, written to predictions.json) against the classes."""
    from engine.cli import main
    from tests.tiny_models import randomize_adapters

    model = RSMoEModel.from_pretrained(tiny_init)
    randomize_adapters(model)  # the router counts as trained
    head = torch.nn.Linear(model.vision.num_features, 2)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([1.0, 0.0]))  # always "agricultural area"
    model.set_scene_head(["agricultural area", "beach"], head)
    model.save_pretrained(tmp_path / "m")
    out = tmp_path / "eval"
    assert main(["-q", "evaluate", "--model", str(tmp_path / "m"), "--data", str(SHARED / "ucm_captions"),
                 "--split", "test", "--out", str(out), "--limit", "3", "--no-meteor"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    dataset = json.loads((SHARED / "ucm_captions" / "dataset.json").read_text())
    test = [i for i in dataset["images"] if i["split"] == "test"]
    records = {r.image_id: r for r in load_ucm_captions(SHARED / "ucm_captions", split="test")}
    expected = sum(records[test[k]["imgid"]].class_name == "agricultural" for k in (0, 70, 140)) / 3
    assert metrics["plan_scene"] == {"source": "scene head", "images": 3, "accuracy": round(expected, 4), "named": 3}
    assert metrics["scene"]["accuracy"] == round(expected, 4) and metrics["scene"]["images"] == 3
    assert expected > 0  # the split is class-ordered: its first image is agricultural
    predictions = json.loads((out / "predictions.json").read_text())
    assert predictions == [{"filename": test[k]["filename"], "class": "agricultural"} for k in (0, 70, 140)]
    head_probability = math.exp(1.0) / (1.0 + math.exp(1.0))
    scenes = json.loads((out / "scenes.json").read_text())
    assert [s["scene"] for s in scenes.values()] == ["agricultural area"] * 3
    assert [s["confidence"] for s in scenes.values()] == pytest.approx([head_probability] * 3, abs=1e-6)

    gated = tmp_path / "gated"  # above the head's probability no caption plan names a scene
    assert main(["-q", "evaluate", "--model", str(tmp_path / "m"), "--data", str(SHARED / "ucm_captions"),
                 "--split", "test", "--out", str(gated), "--limit", "3", "--no-meteor",
                 "--scene-min-confidence", "0.8"]) == 0
    assert [s["scene"] for s in json.loads((gated / "scenes.json").read_text()).values()] == [None] * 3
    metrics = json.loads((gated / "metrics.json").read_text())
    assert metrics["scene_min_confidence"] == 0.8
    assert metrics["plan_scene"]["accuracy"] == metrics["plan_scene"]["named"] == 0
    assert metrics["scene"]["accuracy"] == round(expected, 4)  # the head's classes are not gated
    assert main(["-q", "evaluate", "--model", str(tmp_path / "m"), "--data", str(SHARED / "ucm_captions"),
                 "--split", "test", "--out", str(tmp_path / "bad"), "--limit", "3", "--no-meteor",
                 "--scene-min-confidence", "2"]) == 2
    assert not (tmp_path / "bad").exists()


def test_scene_split_scores_right_and_wrong_scene_images_apart(tmp_path: Path) -> None:
    """``python -m training.scene_split``: per-image CIDEr averaged over the images whose routed scene was
    right and the others; over all images it is the corpus CIDEr of ``rsmoe evaluate``."""
    from training.data.vocab import class_phrase
    from training.metrics import caption_metrics
    from training.scene_split import main

    records = load_ucm_captions(SHARED / "ucm_captions", split="test")
    records = records[:3] + records[-3:]  # two classes (the split is class-ordered)
    wrong = {r.image_id for r in records[1:4]}
    scene = {r.image_id: "beach" if r.image_id in wrong else class_phrase(r.class_name) for r in records}
    scenes = {str(i): {"scene": s, "confidence": 0.9} for i, s in scene.items()}
    captions = [{"image_id": r.image_id, "caption": "a red bus" if r.image_id in wrong else r.captions[0]}
                for r in records]
    (tmp_path / "scenes.json").write_text(json.dumps(scenes))
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    out = tmp_path / "split.json"
    assert main(["--data", str(SHARED / "ucm_captions"), "--scenes", str(tmp_path / "scenes.json"),
                 str(tmp_path / "captions.json"), "--out", str(out)]) == 0
    report = json.loads(out.read_text())["models"][str(tmp_path / "captions.json")]
    assert report["right_scene"]["images"] == 3 and report["wrong_scene"]["images"] == 3
    assert report["wrong_scene"]["CIDEr"] == 0 and report["right_scene"]["CIDEr"] > 1
    corpus = caption_metrics({c["image_id"]: c["caption"] for c in captions},
                             {r.image_id: r.captions for r in records}, meteor=False)["CIDEr"]
    assert report["all"]["CIDEr"] == pytest.approx(corpus, abs=1e-4)
    assert main(["--data", str(SHARED / "ucm_captions"), "--scenes", str(tmp_path / "missing.json"),
                 str(tmp_path / "captions.json")]) == 2
    (tmp_path / "segments.json").write_text(json.dumps({str(r.image_id): [] for r in records}))
    assert main(["--data", str(SHARED / "ucm_captions"), "--scenes", str(tmp_path / "segments.json"),
                 str(tmp_path / "captions.json")]) == 2  # not a scenes.json: a clear error


def test_scene_gate_picks_the_threshold_with_the_best_val_cider(tmp_path: Path) -> None:
    """``python -m training.scene_gate``: per threshold, the neutral caption below it and the named one above;
    the CIDEr at 0 is the named run's, at 1 the neutral run's, and the best threshold keeps each run's good
    captions."""
    from training.metrics import caption_metrics
    from training.scene_gate import gate_scores, main

    assert gate_scores({1: 2.0, 2: 1.0}, {1: 0.0, 2: 3.0}, {1: 0.9, 2: 0.3}, (0.0, 0.5, 1.0)) == [
        {"threshold": 0.0, "neutral_images": 0, "CIDEr": 1.5},
        {"threshold": 0.5, "neutral_images": 1, "CIDEr": 2.5},
        {"threshold": 1.0, "neutral_images": 2, "CIDEr": 1.5}]
    records = load_ucm_captions(SHARED / "ucm_captions", split="val")
    records = records[:3] + records[-3:]
    unsure = {r.image_id for r in records[:3]}  # the named run is wrong on these, the neutral run right
    confidence = {r.image_id: 0.4 if r.image_id in unsure else 0.9 for r in records}
    for name, good in (("named", lambda i: i not in unsure), ("neutral", lambda i: i in unsure)):
        run = tmp_path / name
        run.mkdir()
        (run / "captions.json").write_text(json.dumps(
            [{"image_id": r.image_id, "caption": r.captions[0] if good(r.image_id) else "a red bus"} for r in records]))
        (run / "scenes.json").write_text(json.dumps(
            {str(r.image_id): {"scene": "beach", "confidence": confidence[r.image_id]} for r in records}))
    out = tmp_path / "gate.json"
    args = ["--data", str(SHARED / "ucm_captions"), "--split", "val", "--named", str(tmp_path / "named"),
            "--neutral", str(tmp_path / "neutral"), "--out", str(out)]
    assert main(args) == 0
    report = json.loads(out.read_text())
    assert report["best"]["threshold"] == 0.45 and report["best"]["neutral_images"] == 3
    corpus = caption_metrics({r.image_id: r.captions[0] for r in records},
                             {r.image_id: r.captions for r in records}, meteor=False)["CIDEr"]
    assert report["best"]["CIDEr"] == pytest.approx(corpus, abs=1e-3)
    first, last = report["thresholds"][0], report["thresholds"][-1]
    assert first["neutral_images"] == 0 and last["neutral_images"] == 6
    assert first["CIDEr"] < report["best"]["CIDEr"] and last["CIDEr"] < report["best"]["CIDEr"]
    (tmp_path / "named" / "scenes.json").unlink()
    assert main(args) == 2  # a clear error, not a traceback


def test_scene_views_choice_keeps_the_views_gain_at_the_lowest_cost(tmp_path: Path) -> None:
    """``python -m training.scene_views``: an image sure of its single view keeps it, an unsure one takes the
    scene averaged over its first n views; the choice is the cheapest view count and threshold (extra encoder
    passes per image) that keeps the asked share of the gain of every view on every image."""
    from training.scene_views import choose_views, main, scores_by_views, views_scores

    # 4 images, 3 head classes, the set's classes are columns 0 and 2; truth: positions in those columns
    single = np.array([[0.9, 0.05, 0.05], [0.2, 0.3, 0.5], [0.4, 0.2, 0.4], [0.1, 0.1, 0.8]])
    averaged = np.array([[0.8, 0.1, 0.1], [0.6, 0.2, 0.2], [0.3, 0.1, 0.6], [0.1, 0.1, 0.8]])
    rows = views_scores(single, averaged, [0, 2], [0, 0, 1, 1], grid=(0.0, 0.6, 0.85, 1.0))
    assert [r["views_share"] for r in rows] == [0.0, 0.5, 0.75, 1.0]
    assert [r["accuracy"] for r in rows] == [0.5, 1.0, 1.0, 1.0]  # images 1 and 2 need their views

    # per-view logits (N=2 images, 4 views, 2 classes): image 0 is sure and right; image 1 is unsure and wrong
    # alone, still wrong with 2 views, right with 4
    logits = np.array([[[4.0, 0.0]] * 4,
                       [[0.0, 0.2], [0.0, 0.5], [2.0, 0.0], [2.0, 0.0]]])
    by_views = scores_by_views(logits, [0, 1], [0, 0], counts=(2, 4), grid=(0.0, 0.9, 1.0))
    assert [r["accuracy"] for r in by_views[2]] == [0.5, 0.5, 0.5]
    assert [r["accuracy"] for r in by_views[4]] == [0.5, 1.0, 1.0]
    chosen = choose_views({2: {"a": by_views[2]}, 4: {"a": by_views[4]}}, keep_gain=1.0)
    assert (chosen["views"], chosen["threshold"]) == (4, 0.9)  # only the unsure image pays for 3 more views
    assert chosen["extra_passes"] == 1.5 and chosen["mean_views_share"] == 0.5
    assert chosen["single_view_accuracy"] == 0.5 and chosen["always_views_accuracy"] == 1.0
    assert choose_views({2: {"a": by_views[2]}, 4: {"a": by_views[4]}}, keep_gain=0.0)["extra_passes"] == 0.0
    assert main(["--out", str(tmp_path / "x.json")]) == 2  # no set given: a clear error
    assert main(["--ucm", str(tmp_path), "--keep-gain", "2"]) == 2


def test_scene_head_refit_fits_every_view_with_the_sets_weighted_equally() -> None:
    """:func:`training.scene_head.fit_scene_head` learns a linear head from mean tokens (every view a sample)
    starting from the given weights, a class seen only in a 6-image set included; seeded."""
    from training.config import SceneHeadRefit
    from training.scene_head import fit_scene_head

    rng = np.random.default_rng(0)
    centres = np.eye(3, 8, dtype=np.float32) * 4  # three classes, 8-d tokens
    labels = np.array([0] * 300 + [1] * 300 + [2] * 6)  # class 2 only in the small set
    features = (centres[labels][:, None, :] + rng.normal(0, 0.5, (len(labels), 2, 8))).astype(np.float32)
    sets = ["big"] * 600 + ["small"] * 6
    options = SceneHeadRefit(epochs=30, batch_size=64, lr=0.05, weight_decay=0.0)
    targets = np.eye(3, dtype=np.float32)[labels]
    weight, bias = fit_scene_head(features, targets, sets, torch.zeros(3, 8), torch.zeros(3), options, seed=0)
    assert weight.shape == (3, 8) and bias.shape == (3,)
    predicted = (features[:, 0] @ weight.numpy().T + bias.numpy()).argmax(axis=1)
    assert (predicted == labels).mean() == 1.0  # the 6 small-set images too
    again, _ = fit_scene_head(features, targets, sets, torch.zeros(3, 8), torch.zeros(3), options, seed=0)
    assert torch.equal(weight, again)  # seeded


def test_scene_head_refit_anchors_keep_the_heads_answers_where_the_sets_show_nothing() -> None:
    """Images unlike the labelled ones (here: far along a direction only one class leans to) are named that class
    with confidence by a refit on the labelled sets alone; with them as anchors (targets: the head's unsure
    answers) the refit still learns the labelled images and stays unsure on them."""
    from training.config import SceneHeadRefit
    from training.scene_head import ANCHORS, fit_scene_head

    rng = np.random.default_rng(1)
    labels = np.array([0] * 200 + [1] * 200)
    centres = np.array([[4, 0, 1, 0], [0, 4, 0, 0]], dtype=np.float32)  # class 0 leans along the third axis
    labelled = centres[labels] + rng.normal(0, 0.5, (400, 4)).astype(np.float32)
    anchors = np.array([0, 0, 6, 0], dtype=np.float32) + rng.normal(0, 0.5, (100, 4)).astype(np.float32)
    features = np.concatenate([labelled, anchors])[:, None, :]
    targets = np.concatenate([np.eye(2, dtype=np.float32)[labels], np.full((100, 2), 0.5, np.float32)])
    groups = ["set"] * 400 + [ANCHORS] * 100

    def refit(anchor_weight: float) -> tuple[float, float]:
        options = SceneHeadRefit(epochs=40, batch_size=50, lr=0.05, weight_decay=0.0, anchor_weight=anchor_weight)
        weight, bias = fit_scene_head(features, targets, groups, torch.zeros(2, 4), torch.zeros(2), options, seed=0)
        probabilities = torch.softmax(torch.from_numpy(features[:, 0]) @ weight.T + bias, dim=-1).numpy()
        named = (probabilities[:400].argmax(axis=1) == labels).mean()
        return float(named), float(probabilities[400:].max(axis=1).mean())

    named, confidence = refit(0.0)
    assert named == 1.0 and confidence > 0.9  # the anchors carry no weight: confidently class 0
    named, confidence = refit(1.0)
    assert named == 1.0 and confidence < 0.7


def test_feature_cache_key_ignores_how_the_scene_head_is_used(tiny_init: Path, tmp_path: Path) -> None:
    """Cached vision features stay valid when only the scene head's settings change (views, threshold),
    and not when the images do: other ids, or an image file written again (a regenerated mosaic)."""
    import os

    from training.data.records import CaptionRecord
    from training.features import _cache_key

    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(np.full((8, 8, 3), 10 * i, np.uint8)).save(paths[-1])

    def records(ids: list[int]) -> list[CaptionRecord]:
        return [CaptionRecord(image_id=i, image_path=p, split="train", class_name=None, captions=[])
                for i, p in zip(ids, paths)]

    model = RSMoEModel.from_pretrained(tiny_init)
    key = _cache_key(model, records([1, 2, 3]), variants=2)
    model.config.vision.scene_views = 8
    model.config.vision.scene_min_confidence = 0.8
    assert _cache_key(model, records([1, 2, 3]), variants=2) == key
    assert _cache_key(model, records([1, 2, 4]), variants=2) != key
    assert _cache_key(model, records([1, 2, 3]), variants=1) != key
    stat = paths[2].stat()
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(paths[2])
    os.utime(paths[2], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert _cache_key(model, records([1, 2, 3]), variants=2) != key


def test_shipped_recipes_parse_and_chain() -> None:
    """Every recipe in training/configs loads, and a continuing recipe starts from another recipe's output or from
    a model the repository holds."""
    root = Path(__file__).parents[1]
    recipes = {p.name: TrainConfig.load(p) for p in sorted((root / "training" / "configs").glob("*.yaml"))}
    assert {"lite.yaml", "lite-continue.yaml", "lite-sentinel2.yaml", "lite-covers.yaml"} <= set(recipes)
    outputs = {str(Path(c.out) / "stage2") for c in recipes.values()}
    for name, config in recipes.items():
        if config.continue_from:
            held = (root / config.continue_from / "model.safetensors").is_file()
            assert config.continue_from in outputs or held, name
    assert recipes["lite-sentinel2.yaml"].set_roots()["eurosat_mosaic"]


def test_answer_head_of_a_trained_model_is_learnt_again_with_region_inputs(tiny_init: Path, tmp_path: Path) -> None:
    """``rsmoe train --answer-head-of DIR`` learns only the answer head of a trained model again (here seeing
    the images' regions too); the model's other weights stay as they were; a folder without a model is refused."""
    import yaml

    from engine.cli import main
    from engine.model.answer_head import AnswerHead
    from training.train import train

    first = train(_config(tiny_init, tmp_path / "first", answer_head={"enabled": True, "epochs": 2, "hidden": 8}))
    model = RSMoEModel.from_pretrained(first)
    model.set_scene_head(["forest", "residential area"], torch.nn.Linear(model.vision.num_features, 2))
    model.save_pretrained(first)  # region inputs are the scene head's probabilities
    weights = load_file(str(first / "model.safetensors"))
    before = AnswerHead.load(first / ANSWER_HEAD_FILE)
    assert not before.region_inputs
    config = _config(tiny_init, tmp_path / "unused", answer_head={"enabled": True, "epochs": 2, "hidden": 8,
                                                                  "region_inputs": True})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(config.to_dict()))
    assert main(["-q", "train", "--config", str(recipe), "--answer-head-of", str(first)]) == 0
    after = AnswerHead.load(first / ANSWER_HEAD_FILE)
    assert after.region_inputs and after.region_tile_m == 640.0
    assert after.vocabulary == before.vocabulary  # the same questions
    assert after.tensors["w1"].shape[1] == before.tensors["w1"].shape[1] + 4  # the scene head's 2 probabilities, the region's 2
    assert all(torch.equal(weights[k], v) for k, v in load_file(str(first / "model.safetensors")).items())
    assert RSMoEConfig.load(first).answer_head.enabled and not (tmp_path / "unused").exists()
    assert main(["-q", "train", "--config", str(recipe), "--answer-head-of", str(tmp_path / "nowhere")]) == 2


def test_record_resolutions_of_writes_the_recipes_ranges_into_a_trained_models_config(tiny_init: Path,
                                                                                      tmp_path: Path) -> None:
    """``rsmoe train --record-resolutions-of DIR`` writes the seen resolution range of each set and scene class
    of the recipe's data into DIR's config and changes no other file."""
    import shutil

    import yaml

    from engine.cli import main

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_init, model_dir)
    before = {p.relative_to(model_dir): p.read_bytes() for p in model_dir.rglob("*") if p.is_file()}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(_config(tiny_init, tmp_path / "unused").to_dict()))
    assert main(["-q", "train", "--config", str(recipe), "--record-resolutions-of", str(model_dir)]) == 0
    config = RSMoEConfig.load(model_dir)
    resolution = config.resolution
    low, high = resolution.trained_m["ucm"]
    assert low <= high == pytest.approx(0.3048 * 256 / config.image.image_size, rel=0.01)  # UCM's 256 px at 0.3 m
    assert resolution.scene_m and resolution.min_m == low
    assert all(low <= r[0] <= r[1] <= high for r in resolution.scene_m.values())
    assert not resolution.scene_plausible(next(iter(resolution.scene_m)), high * 10)
    after = {p.relative_to(model_dir): p.read_bytes() for p in model_dir.rglob("*") if p.is_file()}
    assert {k for k in after if after[k] != before.get(k)} == {Path("config.json")}
    assert not (tmp_path / "unused").exists()
    assert main(["-q", "train", "--config", str(recipe), "--record-resolutions-of", str(tmp_path / "nowhere")]) == 3
