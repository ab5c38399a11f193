"""The embedded model: stock classes, save/load round trip, shipped checkpoint, training smoke test."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from gripbench.tasks.suite import TASKS, make_sample
from gripbench.zoo import embedded_path
from gripbench.zoo.model import build_model, build_processor, prompt_text


def test_tokenizer_processor_model_round_trip(tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    proc = build_processor()
    model = build_model(proc.tokenizer, seed=0).eval()
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    proc2 = AutoProcessor.from_pretrained(tmp_path)
    model2 = LlavaForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32).eval()
    s = make_sample("spatial", "val", 3)
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s.question}]}],
                                    add_generation_prompt=True)
    assert text == prompt_text(s.question)
    assert proc2.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s.question}]}],
                                     add_generation_prompt=True) == text
    a = proc(text=[text], images=[s.image], return_tensors="pt")
    b = proc2(text=[text], images=[s.image], return_tensors="pt")
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.allclose(a["pixel_values"], b["pixel_values"])
    assert (a["input_ids"] == model.config.image_token_id).sum() == 144
    assert proc2.tokenizer.padding_side == "left"
    assert proc2.tokenizer.unk_token_id not in a["input_ids"][0].tolist()
    with torch.no_grad():
        assert torch.allclose(model(**a).logits, model2(**b).logits, atol=1e-5)


def test_shipped_checkpoint_loads_without_gripbench():
    """Stock from_pretrained on the package folder, in a process that never imports gripbench."""
    folder = embedded_path()
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    assert size <= 15 * 2**20
    code = f"""
import json, torch
from transformers import AutoProcessor, LlavaForConditionalGeneration
m = LlavaForConditionalGeneration.from_pretrained({str(folder)!r}, dtype=torch.float32)
p = AutoProcessor.from_pretrained({str(folder)!r})
from PIL import Image
msgs = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "what color is the circle?"}}]}}]
x = p(text=[p.apply_chat_template(msgs, add_generation_prompt=True)], images=[Image.new("RGB", (96, 96))], return_tensors="pt")
out = m.generate(**x, max_new_tokens=2, do_sample=False)
import sys
print(json.dumps({{"dtype": str(next(m.parameters()).dtype), "gripbench": "gripbench" in sys.modules, "n": out.shape[1]}}))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": ""},
                         cwd="/")
    assert res.returncode == 0, res.stderr[-2000:]
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info == {"dtype": "torch.float32", "gripbench": False, "n": info["n"]} and info["n"] > 144


def test_shipped_weights_are_fp16():
    from safetensors import safe_open

    with safe_open(str(embedded_path() / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}


def test_training_smoke_loss_decreases(tmp_path):
    from gripbench.zoo.train import TrainConfig, train

    cfg = TrainConfig(steps=12, batch_size=10, warmup=1, eval_every=10_000, eval_per_task=2, lr=2e-3,
                      vision_steps=2, vision_batch_size=4)
    result = train(tmp_path, cfg, log=lambda *_: None)
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 12
    first = sum(r["answer_loss"] for r in log[:3]) / 3
    last = sum(r["answer_loss"] for r in log[-3:]) / 3
    assert last < first - 0.5, (first, last)
    assert set(result["val"]) == set(TASKS)
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "processor_config.json").exists()


def test_training_is_deterministic(tmp_path):
    from gripbench.zoo.train import TrainConfig, train

    cfg = TrainConfig(steps=3, batch_size=4, warmup=1, eval_every=10_000, eval_per_task=1, vision_steps=2, vision_batch_size=4)
    for run in ("a", "b"):
        train(tmp_path / run, cfg, log=lambda *_: None)
    logs = [(tmp_path / r / "train_log.jsonl").read_text().splitlines() for r in ("a", "b")]
    strip = lambda lines: [{k: v for k, v in json.loads(x).items() if k != "elapsed_s"} for x in lines]  # noqa: E731
    assert strip(logs[0]) == strip(logs[1])


def test_training_attention_rows_equal_eager():
    """The attention losses read rows recomputed from q/k under SDPA; they must be eager
    attention's probabilities (with hidden background tokens masked), and give the same
    gradients as a loss on `output_attentions`."""
    from gripbench.tasks.suite import extra_questions
    from gripbench.zoo.train import answer_attention, answer_positions, encode, evidence_attention_loss, hide_background, layer_inputs

    processor = build_processor()
    model = build_model(processor.tokenizer, seed=3)
    samples = [make_sample(t, "train", i) for i, t in enumerate(list(TASKS)[:3])]
    extra = [extra_questions(s, 2, 0) for s in samples]
    batch = encode(processor, samples, with_answers=True, extra=extra)
    evidence = [[s.evidence] + [e for _, _, e in ex] for s, ex in zip(samples, extra)]
    batch["attention_mask"] = hide_background(batch["attention_mask"], batch["input_ids"], model.config.image_token_id,
                                              evidence, 1.0, torch.Generator().manual_seed(0))
    assert (batch["attention_mask"] == 0).any()
    positions = answer_positions(batch["labels"])
    inputs = {k: batch[k] for k in ("input_ids", "pixel_values", "attention_mask")}
    grads = {}
    for impl in ("eager", "sdpa"):
        model.set_attn_implementation({"vision_config": "sdpa", "text_config": impl})
        model.zero_grad()
        with layer_inputs(model, [2]) as hidden:
            out = model(**inputs, output_attentions=impl == "eager")
        if impl == "eager":
            width = max(len(p) for p in positions)
            ref = torch.stack([out.attentions[2][b, :, p + [0] * (width - len(p))] for b, p in enumerate(positions)])
        rows = answer_attention(model, 2, hidden[2], positions, batch["attention_mask"])
        assert (rows - ref).abs().max() < 1e-5
        attn = ref if impl == "eager" else rows
        evidence_attention_loss(attn, batch["input_ids"], model.config.image_token_id, positions, evidence).backward()
        grads[impl] = model.model.language_model.layers[2].self_attn.q_proj.weight.grad.clone()
    assert grads["sdpa"].abs().max() > 0
    assert torch.allclose(grads["sdpa"], grads["eager"], rtol=1e-3, atol=1e-6)
