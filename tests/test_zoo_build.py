"""The real-VLM build recipe (gripbench/zoo/build.py) at a tiny size: every stage runs for
both families, the checkpoint loads with stock classes, the frozen tower is the
contrastively pretrained one, and the labels supervise exactly the answers."""

from __future__ import annotations

import json

import pytest
import torch

from gripbench.tasks.suite import make_sample
from gripbench.zoo.build import RECIPES, BuildConfig, build
from gripbench.zoo.captions import caption

TINY = dict(vision_dim=32, vision_layers=2, vision_heads=2, llm_dim=32, llm_layers=2, llm_heads=2, llm_kv_heads=1,
            llm_ffn=64, clip_steps=2, clip_batch=4, lm_steps=2, lm_batch=2, align_steps=2, align_batch=2, tune_steps=2,
            tune_batch=2, extra_turns=1, eval_every=2, eval_per_task=2, bf16=False)


def test_caption_lists_every_item_in_reading_order():
    scene = make_sample("text", "val", 0).scene
    text = caption(scene)
    assert text.startswith("the image shows ")
    assert text.count(" at the ") == len(scene.items)
    for it in scene.items:
        assert it.color in text and (it.shape in text if it.kind == "shape" else f" {it.char.lower()} at" in text)


@pytest.mark.parametrize("family", sorted(RECIPES))
def test_labels_are_the_answers_and_their_end_token(family):
    recipe = RECIPES[family](BuildConfig(family=family, **TINY))
    samples = [make_sample("attribute", "val", i) for i in range(2)]
    extra = [[("is there a red circle?", "yes", [])] for _ in samples]
    batch = recipe.encode(samples, [s.question for s in samples], [s.answer for s in samples], extra)
    tok = recipe.tok
    for row, s in enumerate(samples):
        labelled = batch["labels"][row][batch["labels"][row] != -100].tolist()
        assert tok.convert_ids_to_tokens(labelled) == [s.answer, tok.eos_token, "yes", tok.eos_token]


@pytest.mark.parametrize("family", sorted(RECIPES))
def test_tiny_build_runs_every_stage_and_loads_with_stock_classes(family, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from gripbench.engine import Engine
    from gripbench.zoo import load

    result = build(tmp_path, BuildConfig(family=family, **TINY), log=lambda *_: None)
    saved = json.loads((tmp_path / "build_config.json").read_text())
    assert saved["config"]["family"] == family and set(saved["stage_min"]) == {
        "vision_pretraining", "llm_pretraining", "alignment", "instruction_tuning"}
    assert set(result["val"]) == {"attribute", "existence", "counting", "spatial", "text"}
    stages = [json.loads(line)["stage"] for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert stages == ["vision"] * 2 + ["llm"] * 2 + ["align"] * 2 + ["tune"] * 2
    model = AutoModelForImageTextToText.from_pretrained(tmp_path)
    AutoProcessor.from_pretrained(tmp_path)
    assert model.config.text_config.num_hidden_layers == 2
    engine = Engine(*load(str(tmp_path), device="cpu"))
    s = make_sample("text", "val", 0)
    out = engine.generate(engine.prepare([s.image], [s.question]), None, max_new_tokens=2)
    assert len(out.texts) == 1 and out.tokens_llm_input == [144]  # 12 x 12 tokens per 96 px scene, both families


def test_the_tower_is_frozen_after_pretraining(tmp_path, monkeypatch):
    """The LLaVA stages never change the contrastively pretrained tower (LLaVA freezes it)."""
    import gripbench.zoo.build as b

    seen = {}
    original = b.LlavaRecipe.contrastive

    def spy(self, model):
        clip, copy_back = original(self, model)

        def copy_and_remember():
            copy_back()
            seen["tower"] = {k: v.clone() for k, v in self.tower(model).state_dict().items()}
            seen["model"] = model
        return clip, copy_and_remember

    monkeypatch.setattr(b.LlavaRecipe, "contrastive", spy)
    build(tmp_path, BuildConfig(family="llava", **TINY), log=lambda *_: None)
    final = b.LlavaRecipe(BuildConfig(**TINY)).tower(seen["model"]).state_dict()
    assert all(torch.equal(final[k], v) for k, v in seen["tower"].items())


@pytest.mark.parametrize("align_llm", [True, False])
def test_alignment_trains_the_projector_and_with_align_llm_the_llm(tmp_path, monkeypatch, align_llm):
    """Stage 1 trains the projector, and the LLM only with `align_llm`; never the tower."""
    import gripbench.zoo.build as b

    trained = {}
    original = b._train_stage

    def spy(name, model, params, *args, **kwargs):
        ids = {id(p) for p in params}
        trained[name] = {n.split(".")[1] for n, p in model.named_parameters() if id(p) in ids}
        return original(name, model, params, *args, **kwargs)

    monkeypatch.setattr(b, "_train_stage", spy)
    build(tmp_path, BuildConfig(family="llava", align_llm=align_llm, **TINY), log=lambda *_: None)
    assert trained["align"] == ({"multi_modal_projector", "language_model"} if align_llm else {"multi_modal_projector"})
    assert trained["tune"] == {"multi_modal_projector", "language_model"}


def test_a_rebuild_reuses_the_pretraining_stages_it_shares(tmp_path, monkeypatch):
    """A second build into the same folder reuses the pretraining stages whose settings are
    unchanged (same weights, their minutes counted as measured) and reruns a stage whose
    settings changed, and every stage when their code changed."""
    from safetensors.torch import load_file

    import gripbench.zoo.build as b

    logs = []
    first = build(tmp_path, BuildConfig(family="llava", **TINY), log=lambda *_: None)
    weights = load_file(tmp_path / "model.safetensors")
    again = build(tmp_path, BuildConfig(family="llava", **{**TINY, "tune_steps": 3}), log=logs.append)
    assert sum("reusing" in m for m in logs) == 2
    assert again["stage_min"]["vision_pretraining"] == first["stage_min"]["vision_pretraining"]
    tower = [k for k in weights if "vision_tower" in k]
    assert tower and all(torch.equal(weights[k], load_file(tmp_path / "model.safetensors")[k]) for k in tower)
    logs.clear()
    build(tmp_path, BuildConfig(family="llava", **{**TINY, "clip_steps": 3}), log=logs.append)
    assert [m.split(":")[0] for m in logs if "reusing" in m] == ["llm_pretraining"]
    logs.clear()
    monkeypatch.setattr(b, "STAGE_CODE", b.STAGE_CODE[:-1])  # as if the stages' code had changed
    build(tmp_path, BuildConfig(family="llava", **TINY), log=logs.append)
    assert not any("reusing" in m for m in logs)


def test_kendall_against_a_published_table():
    from gripbench.published import LLAVA15_7B_64, Table, kendall

    table = Table("t", "m", {"a": 3.0, "b": 2.0, "c": 1.0, "d": 0.0})
    assert kendall({"a": 30, "b": 20, "c": 10, "x": 5}, table)[::2] == (1.0, 3)
    assert kendall({"a": 1, "b": 2, "c": 3}, table)[0] == -1.0
    assert kendall({"a": 1, "b": 2}, table)[2] == 2  # fewer than three shared methods: NaN
    from gripbench.methods import registry

    assert all(set(t.scores) <= set(registry().names()) for t in LLAVA15_7B_64)  # names are gripbench's


def test_evidence_recall_of_kept_tokens():
    from types import SimpleNamespace

    from gripbench.testbed import evidence_recall

    results = [SimpleNamespace(kept_indices=[1, 2, 3]), SimpleNamespace(kept_indices=[9])]
    samples = [SimpleNamespace(evidence=[2, 3, 4, 5]), SimpleNamespace(evidence=[])]
    assert evidence_recall(results, samples) == 0.5  # 2 of 4; a question without evidence is left out


def test_clip_vit_carried_into_the_qwen2_vl_tower():
    """Every CLIP block weight lands in the Qwen tower (q, k, v fused), the patch kernel is
    split over the two temporal slices with the pre-LayerNorm gain, and the tower then reads
    a 96 px scene at 192 px as 144 merged tokens that differ between scenes."""
    recipe = RECIPES["qwen2-vl"](BuildConfig(family="qwen2-vl", **TINY))
    model = recipe.model()
    clip, copy_back = recipe.contrastive(model)
    copy_back()
    tower, vit = recipe.tower(model), clip.vision_model
    for block, layer in zip(tower.blocks, vit.encoder.layers, strict=True):
        a = layer.self_attn
        assert torch.equal(block.attn.qkv.weight, torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
        assert torch.equal(block.mlp.fc2.weight, layer.mlp.fc2.weight) and torch.equal(block.norm1.weight, layer.layer_norm1.weight)
    kernel = tower.patch_embed.proj.weight
    assert torch.allclose(kernel[:, :, 0], kernel[:, :, 1])
    gain = (kernel.sum(2) / vit.embeddings.patch_embedding.weight).flatten()
    assert torch.allclose(gain, gain[0].expand_as(gain), rtol=1e-4) and gain[0] > 0
    images = [make_sample("counting", "val", i).image for i in range(2)]
    inputs = recipe.vision_inputs(images)
    assert inputs["image_grid_thw"].tolist() == [[1, 24, 24]] * 2
    with torch.no_grad():
        out = tower(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output
    assert out.shape[0] == 2 * 144 and not torch.allclose(out[:144], out[144:])
