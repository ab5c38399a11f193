"""Build an embedded VLM the way real VLMs are built, at toy scale (issue 6/7).

Stages, each a plain loss real VLM recipes use, none of them on attention or evidence:

0a. vision tower: CLIP-style contrastive pretraining on (scene, caption) pairs
    (`pretrain.pretrain_vision`), then frozen for good;
0b. LLM: language-model pretraining on captions followed by questions and answers
    (`pretrain.pretrain_llm`);
1.  projector alignment (LLaVA stage 1): only the projector trains, on "describe the
    image" -> caption, the answer tokens' cross-entropy;
2.  visual instruction tuning (LLaVA stage 2): projector and LLM train on multi-turn
    conversations about the task suite's training scenes, the answer tokens' cross-entropy.

The LLaVA model is a stock `LlavaForConditionalGeneration` (CLIP tower, features from the
penultimate layer, [CLS] dropped; a Llama LLM deep enough for in-LLM methods to reach
rho = 1/16 with their published layers). `BuildConfig` is saved beside the checkpoint
(`build_config.json`) with the elapsed time and validation accuracy of every stage.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from gripbench.tasks.suite import TASKS, extra_questions, load_split, make_sample
from gripbench.zoo.captions import CAPTION_WORDS, caption
from gripbench.zoo.pretrain import build_clip, build_clip_text, cosine_lr, pretrain_llm, pretrain_vision

DESCRIBE = "describe the image ."


@dataclass
class BuildConfig:
    """The shipped recipe. Step counts are sized so that a build fits 90 minutes on a
    2-core CPU (measured step times, alone, bf16 autocast: contrastive 2.6 s at batch 128,
    LM 2.3 s at batch 32, instruction tuning 2.3 s at batch 24 on the LLaVA model).
    Contrastive pretraining needs its steps: 250 (warm-up 12) left the LLaVA tower at 27%
    image->caption top-1 in a batch of 128; a 1500-step schedule had passed 94% by step 400."""

    family: str = "llava"
    seed: int = 0
    # vision tower: 96 px scenes. LLaVA: CLIP, patch 8 -> 144 tokens, features from the
    # penultimate layer. Qwen2-VL: patch 4 -> 576 patches merged 2x2 -> 144 tokens; its tower
    # sees 4x the patches per image (and CPU attention backward over 576 keys is slow), so
    # it is narrower and pretrains on smaller batches: None = 192 / 128 for LLaVA, 96 / 64
    # for Qwen2-VL (`vision_dim` / `clip_batch`)
    vision_dim: int | None = None
    vision_layers: int = 4
    vision_heads: int = 4
    # LLM (Llama / Qwen2): thin and deep
    llm_dim: int = 128
    llm_layers: int = 24
    llm_heads: int = 4
    llm_kv_heads: int = 2
    llm_ffn: int = 384
    # stage 0a: contrastive vision pretraining
    clip_steps: int = 500
    clip_batch: int | None = None
    clip_lr: float = 1e-3
    # stage 0b: language-model pretraining
    lm_steps: int = 150
    lm_batch: int = 32
    lm_lr: float = 2e-3
    # stage 1: projector alignment on captions
    align_steps: int = 100
    align_batch: int = 32
    align_lr: float = 2e-3
    # stage 2: instruction tuning
    tune_steps: int = 900
    tune_batch: int = 24
    tune_lr: float = 5e-4
    extra_turns: int = 4
    eval_every: int = 300
    eval_per_task: int = 100
    bf16: bool = True

    def __post_init__(self):
        qwen = self.family == "qwen2-vl"
        if self.vision_dim is None:
            self.vision_dim = 96 if qwen else 192
        if self.clip_batch is None:
            self.clip_batch = 64 if qwen else 128


class LlavaRecipe:
    """The LLaVA-1.5 layout: CLIP tower ([CLS] dropped, penultimate layer), MLP projector, Llama."""

    def __init__(self, cfg: BuildConfig):
        from gripbench.zoo.model import build_processor as llava_processor
        from gripbench.zoo.model import build_tokenizer

        self.cfg = cfg
        self.processor = llava_processor()
        self.processor.tokenizer = build_tokenizer(CAPTION_WORDS + tuple(DESCRIBE.split()))
        self.tok = self.processor.tokenizer

    def text_config(self):
        from transformers import LlamaConfig

        c, tok = self.cfg, self.tok
        return LlamaConfig(vocab_size=len(tok), hidden_size=c.llm_dim, intermediate_size=c.llm_ffn,
                           num_hidden_layers=c.llm_layers, num_attention_heads=c.llm_heads,
                           num_key_value_heads=c.llm_kv_heads, max_position_embeddings=512,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id, tie_word_embeddings=True)

    def model(self):
        from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

        from gripbench.tasks.scenes import SceneConfig

        c, scene = self.cfg, SceneConfig()
        vision = CLIPVisionConfig(hidden_size=c.vision_dim, intermediate_size=c.vision_dim * 8 // 3,
                                  num_hidden_layers=c.vision_layers, num_attention_heads=c.vision_heads,
                                  image_size=scene.image_size, patch_size=scene.patch_size, projection_dim=128)
        config = LlavaConfig(vision_config=vision, text_config=self.text_config(),
                             image_token_index=self.tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                             vision_feature_select_strategy="default", projector_hidden_act="gelu",
                             image_seq_length=scene.num_patches, tie_word_embeddings=True)
        torch.manual_seed(c.seed)
        return _generation_defaults(LlavaForConditionalGeneration(config), self.tok)

    def causal_lm(self):
        from transformers import LlamaForCausalLM

        return LlamaForCausalLM(self.text_config())

    def tower(self, model):
        tower = model.model.vision_tower
        return getattr(tower, "vision_model", tower)

    def projector(self, model):
        return model.model.multi_modal_projector

    def vision_inputs(self, images) -> dict:
        return {"pixel_values": self.processor.image_processor(images, return_tensors="pt")["pixel_values"]}

    def contrastive(self, model):
        """A stock CLIPModel around a fresh tower of the VLM's config, and a way to copy it back."""
        clip = build_clip(self.tok, model.config.vision_config, seed=self.cfg.seed)
        return clip, lambda: self.tower(model).load_state_dict(clip.vision_model.state_dict())

    def chat(self, question: str, answer: str, extra=()) -> str:
        from gripbench.zoo.model import prompt_text

        return prompt_text(question) + f" {answer}</s>" + "".join(f"USER: {q} ASSISTANT: {a}</s>" for q, a in extra)

    def lm_chat(self, question: str, answer: str) -> str:
        return f"USER: {question} ASSISTANT: {answer}</s>"

    def labels(self, input_ids: torch.Tensor) -> torch.Tensor:
        from gripbench.zoo.train import answer_labels

        return answer_labels(input_ids, self.tok)

    def encode(self, samples, questions, answers, extra=None) -> dict:
        """Right-padded processor inputs of image + question -> answer (+ extra turns), labels
        on the answers and their end-of-turn token only."""
        texts = [self.chat(q, a, [(eq, ea) for eq, ea, _ in (extra[i] if extra else [])])
                 for i, (q, a) in enumerate(zip(questions, answers))]
        batch = self.processor(text=texts, images=[s.image for s in samples], padding=True, return_tensors="pt",
                               padding_side="right")
        batch["labels"] = self.labels(batch["input_ids"])
        return batch


def _generation_defaults(model, tok):
    for key, value in (("pad_token_id", tok.pad_token_id), ("eos_token_id", tok.eos_token_id),
                       ("bos_token_id", tok.bos_token_id), ("do_sample", False)):
        setattr(model.generation_config, key, value)
    return model


def _train_stage(name: str, model, params, steps: int, lr: float, make_batch, cfg: BuildConfig, log, on_eval=None) -> list[dict]:
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, steps, max(1, steps // 20)))
    start, records = time.perf_counter(), []
    model.train()
    for step in range(steps):
        batch = make_batch(step)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            out = model(**inputs)
        logits = out.logits[:, :-1].float()
        loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        rec = {"stage": name, "step": step + 1, "loss": round(loss.item(), 4), "elapsed_s": round(time.perf_counter() - start, 1)}
        if on_eval is not None and ((step + 1) % cfg.eval_every == 0 or step + 1 == steps):
            rec["val"] = on_eval()
            log(f"{name} step {step + 1}/{steps}  {rec['elapsed_s']:.0f}s  loss {rec['loss']:.3f}  "
                + "  ".join(f"{t} {a:.1%}" for t, a in rec["val"].items()))
        elif (step + 1) % 25 == 0:
            log(f"{name} step {step + 1}/{steps}  {rec['elapsed_s']:.0f}s  loss {rec['loss']:.3f}")
        records.append(rec)
    return records


# <|im_end|> (end of text for the CLIP text encoder too) must not get id 2: CLIPTextTransformer
# then falls back to its legacy pooling at the largest token id
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<unk>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                "<|video_pad|>"]
QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class QwenRecipe(LlavaRecipe):
    """The Qwen2-VL layout: a tower without [CLS] (2-D RoPE, patch 4 so that a 96 px scene
    gives 24 x 24 patches, merged 2 x 2 into 12 x 12 = 144 LLM tokens, as many as the LLaVA
    model's), the patch merger as projector, a Qwen2 LLM with M-RoPE."""

    def __init__(self, cfg: BuildConfig):
        from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
        from transformers import PreTrainedTokenizerFast, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

        from gripbench.zoo.model import _words

        self.cfg = cfg
        words = _words(CAPTION_WORDS + tuple(DESCRIBE.split()) + ("user", "assistant"))
        vocab = {w: i for i, w in enumerate(QWEN_SPECIAL + [w for w in words if w not in QWEN_SPECIAL])}
        tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
        tok.normalizer = normalizers.Lowercase()
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        self.tok = PreTrainedTokenizerFast(
            tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<unk>",
            padding_side="left", model_max_length=1024,
            extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                                  "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>",
                                  "im_start_token": "<|im_start|>"})
        pixels = 96 * 96
        image = Qwen2VLImageProcessor(min_pixels=pixels, max_pixels=pixels, patch_size=4, temporal_patch_size=2, merge_size=2)
        video = Qwen2VLVideoProcessor(patch_size=4, temporal_patch_size=2, merge_size=2)
        self.processor = Qwen2VLProcessor(image_processor=image, tokenizer=self.tok, video_processor=video,
                                          chat_template=QWEN_TEMPLATE)

    def _ids(self) -> dict:
        c = self.tok.convert_tokens_to_ids
        return dict(image_token_id=c("<|image_pad|>"), video_token_id=c("<|video_pad|>"),
                    vision_start_token_id=c("<|vision_start|>"), vision_end_token_id=c("<|vision_end|>"))

    def text_config(self):
        from transformers import Qwen2Config

        c, tok = self.cfg, self.tok
        half = c.llm_dim // c.llm_heads // 2  # M-RoPE (t, h, w) sections in Qwen2-VL's 16/24/24 proportions
        sections = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
        return Qwen2Config(vocab_size=len(tok), hidden_size=c.llm_dim, intermediate_size=c.llm_ffn,
                           num_hidden_layers=c.llm_layers, num_attention_heads=c.llm_heads,
                           num_key_value_heads=c.llm_kv_heads, max_position_embeddings=512, bos_token_id=None,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True,
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": sections})

    def model(self):
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        c = self.cfg
        vision = dict(depth=c.vision_layers, embed_dim=c.vision_dim, hidden_size=c.llm_dim, num_heads=c.vision_heads,
                      mlp_ratio=2, patch_size=4, spatial_merge_size=2, temporal_patch_size=2)
        config = Qwen2VLConfig(text_config=self.text_config().to_dict(), vision_config=vision, tie_word_embeddings=True,
                               **self._ids())
        torch.manual_seed(c.seed)
        return _generation_defaults(Qwen2VLForConditionalGeneration(config), self.tok)

    def causal_lm(self):
        from transformers import Qwen2ForCausalLM

        return Qwen2ForCausalLM(self.text_config())

    def tower(self, model):
        return model.model.visual

    def projector(self, model):
        return model.model.visual.merger

    def vision_inputs(self, images) -> dict:
        out = self.processor.image_processor(images, return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}

    def contrastive(self, model):
        """A fresh tower of the VLM's config, attention-pooled (it has no [CLS]), against a
        stock CLIP text encoder, with CLIP's loss (`PooledCLIP`)."""
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

        torch.manual_seed(self.cfg.seed)
        tower = Qwen2VisionTransformerPretrainedModel._from_config(model.config.vision_config)
        clip = PooledCLIP(tower, build_clip_text(self.tok), model.config.vision_config.hidden_size)
        return clip, lambda: self.tower(model).load_state_dict(tower.state_dict())

    def chat(self, question: str, answer: str, extra=()) -> str:
        first = f"<|im_start|>user <|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>"
        turns = "".join(f"<|im_start|>user {q}<|im_end|>" + self.lm_chat_answer(a) for q, a in extra)
        return first + self.lm_chat_answer(answer) + turns

    @staticmethod
    def lm_chat_answer(answer: str) -> str:
        return f"<|im_start|>assistant {answer}<|im_end|>"

    def lm_chat(self, question: str, answer: str) -> str:
        return f"<|im_start|>user {question}<|im_end|>" + self.lm_chat_answer(answer)

    def labels(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The tokens after each '<|im_start|> assistant' up to and including '<|im_end|>'."""
        from gripbench.zoo.train import answer_labels

        return answer_labels(input_ids, self.tok, opener=("<|im_start|>", "assistant"))


class PooledCLIP(torch.nn.Module):
    """CLIP's contrastive loss for a tower without [CLS] (Qwen2-VL's): the image embedding
    pools the tower's merged output tokens with SigLIP's attention-pooling head (a learned
    probe attending over them: stock `SiglipMultiheadAttentionPoolingHead`, how SigLIP
    towers, which have no [CLS] either, are trained), then a projection; the text side is a
    stock CLIPTextModelWithProjection; the logit scale is fixed at CLIP's initial 1 / 0.07.
    The head and the text encoder are thrown away after pretraining.

    Not yet working: the contrastive loss stays at exact chance (loss ln N) with mean
    pooling of the merged tokens, a LayerNorm after the mean, this head, a fixed or a
    learned logit scale (initial 1 or 1/0.07) and SigLIP's sigmoid loss, at batch 32 and 64
    (up to 105 steps), fp32 or bf16. What happens (logged per step): within ~10 steps the
    caption embeddings collapse (mean pairwise cosine 0.92 -> 0.999) and then the image
    side; gradients fall to ~1e-3. It is not Qwen-specific: the LLaVA CLIP collapses the
    same way at batch 32 and escaped the collapse at batch 128 only after ~60 steps (its
    full build's log). Next (issue 6/7): initialise this tower from the contrastively
    pretrained CLIP ViT, as Qwen2-VL's own tower was initialised from DFN's CLIP ViT with
    the absolute positions replaced by 2-D RoPE."""

    def __init__(self, tower, text, dim: int, heads: int = 4):
        from transformers import SiglipVisionConfig
        from transformers.models.siglip.modeling_siglip import SiglipMultiheadAttentionPoolingHead

        super().__init__()
        self.tower, self.text = tower, text
        self.head = SiglipMultiheadAttentionPoolingHead(SiglipVisionConfig(hidden_size=dim, num_attention_heads=heads,
                                                                           intermediate_size=4 * dim))
        self.visual_projection = torch.nn.Linear(dim, text.config.projection_dim, bias=False)
        # fixed, not learned: tried because a falling learned scale would flatten the logits to chance;
        # it did not cure the collapse (see the class docstring)
        self.register_buffer("logit_scale", torch.tensor(math.log(1 / 0.07)))

    def forward(self, input_ids, attention_mask, pixel_values, image_grid_thw, return_loss=True):
        merged = self.tower(pixel_values, grid_thw=image_grid_thw).pooler_output
        per_image = torch.split(merged, (image_grid_thw.prod(-1) // 4).tolist())
        tokens = torch.nn.utils.rnn.pad_sequence(per_image, batch_first=True)  # equal sizes here: no padding
        image = F.normalize(self.visual_projection(self.head(tokens)), dim=-1)
        text = F.normalize(self.text(input_ids=input_ids, attention_mask=attention_mask).text_embeds, dim=-1)
        logits_per_text = self.logit_scale.exp() * text @ image.T
        target = torch.arange(len(text), device=text.device)  # CLIP's symmetric in-batch cross-entropy
        loss = (F.cross_entropy(logits_per_text, target) + F.cross_entropy(logits_per_text.T, target)) / 2
        return SimpleNamespace(loss=loss, logits_per_image=logits_per_text.T)


RECIPES = {"llava": LlavaRecipe, "qwen2-vl": QwenRecipe}


# the config fields each pretraining stage's result depends on (its cache key)
VISION_FIELDS = ("family", "seed", "vision_dim", "vision_layers", "vision_heads", "llm_dim", "clip_steps", "clip_batch",
                 "clip_lr", "bf16")
LLM_FIELDS = ("family", "seed", "llm_dim", "llm_layers", "llm_heads", "llm_kv_heads", "llm_ffn", "lm_steps", "lm_batch",
              "lm_lr", "extra_turns", "bf16")


def _stage(out_dir: Path, name: str, fields, cfg: BuildConfig, run, records: list, minutes: dict, log):
    """Run a pretraining stage, or reuse its result from an earlier build into the same
    folder with the same values of `fields` (`out_dir/stages/`): the two pretraining stages
    take a third of a build and do not depend on the LLaVA stages' settings, so a build
    that changes only those resumes after them. The reused stage's log and minutes are the
    ones measured when it ran (the build's total counts them)."""
    key = {f: getattr(cfg, f) for f in fields}
    path = out_dir / "stages" / f"{name}.pt"
    if path.exists():
        saved = torch.load(path, weights_only=True)
        if saved["key"] == json.dumps(key, sort_keys=True):
            log(f"{name}: reusing {path} ({saved['minutes']:.1f} min when it ran)")
            records += [json.loads(r) for r in saved["records"]]
            minutes[name] = saved["minutes"]
            return saved["state"]
    t = time.perf_counter()
    state, recs = run()
    minutes[name] = (time.perf_counter() - t) / 60
    records += recs
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"key": json.dumps(key, sort_keys=True), "state": state, "minutes": minutes[name],
                "records": [json.dumps(r) for r in recs]}, path)
    return state


def val_accuracy(model, processor, val: dict[str, list]) -> dict[str, float]:
    """Greedy exact-match accuracy per task through gripbench's engine (unpruned: the stock
    model's answers, for any family)."""
    from gripbench.engine import Engine
    from gripbench.evaluate import accuracy, run_samples

    model.eval()
    with torch.no_grad():
        engine = Engine(model, processor)
        out = {t: accuracy(run_samples(engine, s, None, batch_size=50)) for t, s in val.items()}
    model.train()
    return out


def build(out_dir: str | Path, cfg: BuildConfig = BuildConfig(), log=print) -> dict:
    """Run every stage, validate, and save the fp16 checkpoint, processor and build config."""
    from gripbench.zoo.train import save_checkpoint

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    recipe = RECIPES[cfg.family](cfg)
    processor, tok = recipe.processor, recipe.tok
    model = recipe.model()
    records: list[dict] = []
    minutes: dict[str, float] = {}

    # 0a. contrastive vision pretraining; the tower is then frozen
    def vision_stage():
        clip, copy_back = recipe.contrastive(model)
        recs = pretrain_vision(clip, recipe, cfg.clip_steps, cfg.clip_batch, cfg.clip_lr, cfg.seed, log, cfg.bf16)
        copy_back()
        return recipe.tower(model).state_dict(), recs

    state = _stage(out_dir, "vision_pretraining", VISION_FIELDS, cfg, vision_stage, records, minutes, log)
    recipe.tower(model).load_state_dict(state)
    recipe.tower(model).requires_grad_(False)

    # 0b. language-model pretraining of a stock causal LM of the VLM's text config
    def llm_stage():
        torch.manual_seed(cfg.seed + 1)
        llm = recipe.causal_lm()
        recs = pretrain_llm(llm, tok, recipe.lm_chat, cfg.lm_steps, cfg.lm_batch, cfg.lm_lr, cfg.seed, cfg.extra_turns,
                            log, cfg.bf16)
        return llm.state_dict(), recs

    state = _stage(out_dir, "llm_pretraining", LLM_FIELDS, cfg, llm_stage, records, minutes, log)
    model.model.language_model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    model.lm_head.load_state_dict({"weight": state["lm_head.weight"]})

    val = {t: load_split(t, "val", cfg.eval_per_task) for t in TASKS}
    tasks = list(TASKS)

    def samples(step: int, batch: int, offset: int) -> list:
        first = offset + step * batch
        return [make_sample(tasks[(first + j) % len(tasks)], "train", first + j, base_seed=cfg.seed) for j in range(batch)]

    # 1. projector alignment on captions
    t = time.perf_counter()
    model.requires_grad_(False)
    projector = list(recipe.projector(model).parameters())
    for p in projector:
        p.requires_grad_(True)

    def align_batch(step: int) -> dict:
        ss = samples(step, cfg.align_batch, 30_000_000)
        return recipe.encode(ss, [DESCRIBE] * len(ss), [caption(s.scene) for s in ss])

    records += _train_stage("align", model, projector, cfg.align_steps, cfg.align_lr, align_batch, cfg, log)
    minutes["alignment"] = (time.perf_counter() - t) / 60

    # 2. instruction tuning: projector and LLM, the tower stays frozen
    t = time.perf_counter()
    model.model.language_model.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]

    def tune_batch(step: int) -> dict:
        ss = samples(step, cfg.tune_batch, 0)
        extra = [extra_questions(s, cfg.extra_turns, cfg.seed) for s in ss] if cfg.extra_turns else None
        return recipe.encode(ss, [s.question for s in ss], [s.answer for s in ss], extra)

    records += _train_stage("tune", model, params, cfg.tune_steps, cfg.tune_lr, tune_batch, cfg, log,
                            lambda: val_accuracy(model, processor, val))
    minutes["instruction_tuning"] = (time.perf_counter() - t) / 60

    save_checkpoint(model, processor, out_dir)
    result = {"elapsed_min": sum(minutes.values()), "wall_min": (time.perf_counter() - t0) / 60, "stage_min": minutes, "val": records[-1].get("val", {})}
    (out_dir / "build_config.json").write_text(json.dumps({"config": asdict(cfg), **result}, indent=1))
    with open(out_dir / "train_log.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    log(f"built in {result['elapsed_min']:.1f} min; validation: " + ", ".join(f"{t} {a:.1%}" for t, a in result["val"].items()))
    return result
