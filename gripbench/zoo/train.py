"""Train the embedded tiny LLaVA from scratch on the procedural task suite (CPU, minutes).

Objective. Cross-entropy on the answer tokens (each answer word and its `</s>`), the loss
of LLaVA's visual instruction tuning, on multi-turn conversations: the sampled question
plus `extra_turns` more questions about the same scene (as in LLaVA's instruction data),
so each image pass supervises several answers. During training only, per-patch heads read
every visual token at the projector output: colour, shape and character of the item
covering the patch (with `grounded_aux`, cosine logits against the LLM's own word
embeddings of "red", "circle", ...), its row and column, and whether it holds an item's
centre, and which half of the image it lies in (against the words "left"/"right",
"top"/"bottom"). The heads are thrown away; the shipped checkpoint is the plain
`LlavaForConditionalGeneration`. A curriculum grows scenes from 2 to 6 shapes and the
background clutter from 25% to full over the first `curriculum` share of the steps.

Why the auxiliary heads: (1) a small CLIP learns shapes and glyphs from an answer-only
signal far too slowly for a 2-core CPU budget; (2) they keep visual tokens *local* (each
describes its own patch), like the patch features of a CLIP trained at scale, so that
which tokens survive pruning decides what the LLM can still see. They say nothing about
which tokens to keep, so they favour no pruning method.

Background dropout (`hide_background`): half of the conversations hide a random share of
the visual tokens that no question of the conversation needs, as a pre-LLM pruning step
would. A large VLM shrugs off losing irrelevant tokens thanks to its redundancy; the tiny
one otherwise learns answers (counting above all) that depend on the *number* of
background tokens, and then every pruning method, even a perfect one, would look bad.
Evidence tokens are never hidden, so missing evidence still costs what it should.

Determinism: model init and batch composition are pure functions of the seed; the
training sample at global position i is `make_sample(task, "train", i, base_seed=seed)`,
never a test or validation scene (`is_held_out`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gripbench.tasks.scenes import CHARS, COLORS, SHAPES
from gripbench.tasks.suite import TASKS, Sample, extra_questions, load_split, make_sample
from gripbench.zoo.model import build_model, build_processor, prompt_text


@dataclass
class TrainConfig:
    steps: int = 2400
    vision_steps: int = 250  # stage 1: the vision tower + projector alone, on the per-patch heads
    vision_batch_size: int = 48
    batch_size: int = 24
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.05
    aux_weight: float = 0.5
    eval_every: int = 300
    eval_per_task: int = 100
    curriculum: float = 0.1  # share of steps over which scenes grow from 1-2 shapes to 3-6
    init_range: float = 0.02
    embed_std: float = 0.25  # word-embedding init scale (see train())
    extra_turns: int = 4  # more questions about the same scene per training conversation
    grounded_aux: bool = True  # aux class vectors = the LLM's word embeddings (see AuxHeads)
    attn_weight: float = 1.0  # weight of the evidence-attention loss (see evidence_attention_loss)
    attn_layer: int = 2  # LLM layer whose answer-position attention is pulled onto the evidence
    question_layer: int = 1  # LLM layer whose answer-position attention is pulled onto the question
    background_dropout: float = 0.5  # share of conversations whose non-evidence visual tokens are partly hidden
    # First-turn task of each conversation, in turn. Counting comes three times and spatial twice:
    # attribute, existence and text reach 96-100% validation accuracy by step 1500, counting and
    # spatial were still rising at the end. Every conversation also asks about the other families
    # (extra_turns).
    task_cycle: tuple[str, ...] = ("attribute", "counting", "existence", "spatial", "counting", "text", "counting",
                                   "spatial")
    # Mixed precision: matmuls in bfloat16 under autocast, weights and optimiser state in fp32
    # (LLaVA's own recipe). Measured ~20% off a training step on this AVX512-BF16 CPU.
    bf16: bool = True
    seed: int = 0

    def clutter(self, step: int) -> float:
        if self.curriculum <= 0:
            return 1.0
        return min(1.0, 0.25 + 0.75 * step / (self.curriculum * self.steps))

    def max_shapes(self, step: int) -> int:
        if self.curriculum <= 0 or step >= self.curriculum * self.steps:
            return 6
        return 2 + int(5 * step / (self.curriculum * self.steps))


def autocast(cfg: TrainConfig):
    """The forward-pass precision context of a training step (see `TrainConfig.bf16`)."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16)


def patch_labels(sample: Sample) -> torch.Tensor:
    """[4, num_patches] long: colour, shape (sign = last class) and character of the item
    holding the most pixels of each patch (0 = background), and 1 at each item's centre patch."""
    scene = sample.scene
    cfg = scene.config
    g, p = cfg.grid, cfg.patch_size
    best = np.zeros(cfg.num_patches)
    labels = np.zeros((4, cfg.num_patches), dtype=np.int64)
    for it in scene.items:
        counts = scene.mask(it).reshape(g, p, g, p).sum(axis=(1, 3)).reshape(-1)
        win = (counts >= cfg.min_patch_pixels) & (counts > best)
        best = np.where(win, counts, best)
        labels[0, win] = 1 + list(COLORS).index(it.color)
        labels[1, win] = 1 + (SHAPES.index(it.shape) if it.kind == "shape" else len(SHAPES))
        labels[2, win] = 1 + CHARS.index(it.char) if it.kind == "sign" else 0
        cx, cy = it.center
        labels[3, int(cy) // p * g + int(cx) // p] = 1
    return torch.from_numpy(labels)


def encode(processor, samples: list[Sample], with_answers: bool,
           extra: list[list[tuple[str, str, list[int]]]] | None = None) -> dict[str, torch.Tensor]:
    """Processor inputs. With answers: right-padded, the conversation continued with the
    `extra` (question, answer) turns, labels on every answer and its `</s>` only."""
    texts = []
    for i, s in enumerate(samples):
        text = prompt_text(s.question)
        if with_answers:
            text += f" {s.answer}</s>" + "".join(f"USER: {q} ASSISTANT: {a}</s>" for q, a, _ in (extra[i] if extra else []))
        texts.append(text)
    batch = processor(text=texts, images=[s.image for s in samples], padding=True, return_tensors="pt",
                      padding_side="right" if with_answers else "left")
    if with_answers:
        batch["labels"] = answer_labels(batch["input_ids"], processor.tokenizer)
    return batch


def answer_labels(input_ids: torch.Tensor, tokenizer, opener: tuple[str, str] = ("assistant", ":")) -> torch.Tensor:
    """Labels = the tokens after each `opener` pair ('assistant :' in LLaVA's format,
    '<|im_start|> assistant' in Qwen's) up to and including the end-of-turn token
    (`tokenizer.eos_token`); -100 elsewhere."""
    first, second = tokenizer.convert_tokens_to_ids(list(opener))
    eos = tokenizer.eos_token_id
    labels = torch.full_like(input_ids, -100)
    for row, ids in enumerate(input_ids.tolist()):
        inside = False
        for j in range(1, len(ids)):
            if inside:
                labels[row, j] = ids[j]
                inside = ids[j] != eos
            elif ids[j] == second and ids[j - 1] == first:
                inside = True
    return labels


class AuxHeads(torch.nn.Module):
    """Per-patch colour / shape / character classifiers on the projector outputs.

    With `embeddings` (the LLM's input embedding table) and `tokenizer`, the class vectors
    of the named classes ARE the LLM's word embeddings of "red", "circle", "a", ... (cosine
    logits): a triangle patch is pulled toward the embedding of the word "triangle". This
    is what LLaVA's stage-1 alignment gives a pretrained LLM for free, a visual token in
    the LLM's word space, and it lets a question word find its patches by similarity.
    Position is grounded the same way: each patch is pulled toward "left" or "right" and
    "top" or "bottom" by the half of the image it lies in (`half_logits`).
    Free parameters: a "background" vector and a logit scale per head, and the linear
    row / column / centre heads."""

    def __init__(self, dim: int, embeddings: torch.nn.Embedding | None = None, tokenizer=None, grid: int = 12):
        super().__init__()
        self.sizes = (len(COLORS) + 1, len(SHAPES) + 2, len(CHARS) + 1)
        self.embeddings = embeddings
        self.grid = grid
        # where: row, column and "centre of an item" (lets the LLM count items, not patches)
        self.where = torch.nn.ModuleList([torch.nn.Linear(dim, grid), torch.nn.Linear(dim, grid), torch.nn.Linear(dim, 2)])
        if embeddings is None:
            self.heads = torch.nn.ModuleList(torch.nn.Linear(dim, n) for n in self.sizes)
            return
        words = [list(COLORS), list(SHAPES) + ["sign"], [c.lower() for c in CHARS]]
        self.word_ids = [torch.tensor(tokenizer.convert_tokens_to_ids(w)) for w in words]
        self.half_ids = [torch.tensor(tokenizer.convert_tokens_to_ids(w)) for w in (["left", "right"], ["top", "bottom"])]
        self.background = torch.nn.Parameter(torch.randn(3, dim) * 0.02)
        self.scale = torch.nn.Parameter(torch.full((5,), 10.0))

    def logits(self, feats: torch.Tensor, i: int) -> torch.Tensor:
        if self.embeddings is None:
            return self.heads[i](feats)
        classes = torch.cat([self.background[i:i + 1], self.embeddings.weight[self.word_ids[i]]])
        return self.scale[i] * F.normalize(feats, dim=-1) @ F.normalize(classes, dim=-1).T

    @staticmethod
    def _balanced(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean loss over item patches + mean over background patches: items cover a few
        percent of the patches (a sign's glyph under 2%), so a plain mean would barely
        train the classes the questions ask about."""
        per = F.cross_entropy(logits, labels, reduction="none")
        fg = labels > 0
        return (per[fg].mean() if fg.any() else per.new_zeros(())) + per[~fg].mean()

    def half_logits(self, feats: torch.Tensor, axis: int) -> torch.Tensor:
        """Which half of the image (axis 0: left/right, 1: top/bottom) a patch lies in, as
        cosine logits against the words "left"/"right" and "top"/"bottom": a patch's position
        then reaches the LLM the way its colour does, as a word-like direction it can copy."""
        classes = self.embeddings.weight[self.half_ids[axis]]
        return self.scale[3 + axis] * F.normalize(feats, dim=-1) @ F.normalize(classes, dim=-1).T

    def loss(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        what = sum(self._balanced(self.logits(feats, i).flatten(0, 1), labels[:, i].flatten()) for i in range(3))
        idx = torch.arange(feats.shape[1], device=feats.device)
        targets = (idx // self.grid, idx % self.grid)
        where = sum(F.cross_entropy(self.where[i](feats).flatten(0, 1), targets[i].expand(feats.shape[0], -1).flatten())
                    for i in range(2))
        where = where + F.cross_entropy(self.where[2](feats).flatten(0, 1), labels[:, 3].flatten())
        n = 6
        if self.embeddings is not None:
            for axis, target in enumerate((targets[1], targets[0])):  # left/right from the column, top/bottom from the row
                half = (target >= self.grid // 2).long().expand(feats.shape[0], -1).flatten()
                where = where + F.cross_entropy(self.half_logits(feats, axis).flatten(0, 1), half)
            n = 8
        return (what + where) / n + self.scale_loss(feats)

    def scale_loss(self, feats: torch.Tensor) -> torch.Tensor:
        """Keep visual tokens at the scale of the LLM's word embeddings (squared log-ratio of
        norms to twice the mean embedding norm). Cosine heads alone let projector outputs grow
        without bound (seen: norm 107 against 0.4 for words): the LLM's pre-norm layers then
        hand the visual positions gradients ~300x smaller than the text's and the model
        learns to ignore the image."""
        if self.embeddings is None:
            return feats.new_zeros(())
        target = 2 * self.embeddings.weight.detach().norm(dim=-1).mean()
        return (torch.log(feats.norm(dim=-1) / target) ** 2).mean()


def hide_background(attention_mask: torch.Tensor, input_ids: torch.Tensor, image_token_id: int,
                    evidence: list[list[list[int]]], share: float, generator: torch.Generator) -> torch.Tensor:
    """For a `share` of the rows, mask a random fraction (uniform in [0, 1]) of the visual
    tokens that are evidence for none of the row's questions: the LLM then sees the
    conversation as a pre-LLM pruning method would hand it over (keys removed, original
    position ids kept, since Llama's positions do not follow the mask).

    Why: without it, the LLM learned to count by the share of its attention that the
    matching patches win against *all* patches; dropping background then inflates the
    count (keeping exactly the evidence took counting from 63% to 27%). A large VLM's
    redundancy makes it robust to losing irrelevant tokens; this gives the tiny one the
    same property. Evidence tokens are never hidden, so which tokens a method keeps still
    decides the answer: favouring no method, it only stops the testbed from penalising
    every method for dropping tokens nobody needs."""
    mask = attention_mask.clone()
    for b, evs in enumerate(evidence):
        if torch.rand((), generator=generator) >= share:
            continue
        image = torch.nonzero(input_ids[b] == image_token_id).flatten()
        keep = torch.zeros(len(image), dtype=torch.bool)
        keep[[i for ev in evs for i in ev]] = True
        hide = ~keep & (torch.rand(len(image), generator=generator) < torch.rand((), generator=generator))
        mask[b, image[hide]] = 0
    return mask


def answer_positions(labels: torch.Tensor) -> list[list[int]]:
    """Per row, the positions whose next token is the first word of an answer, in turn order."""
    prev = torch.cat([torch.full_like(labels[:, :1], -100), labels[:, :-1]], dim=1)
    starts = (labels != -100) & (prev == -100)
    return [(torch.nonzero(row).flatten() - 1).tolist() for row in starts]


def evidence_attention_loss(attn: torch.Tensor, input_ids: torch.Tensor, image_token_id: int,
                            positions: list[list[int]], evidence: list[list[list[int]]]) -> torch.Tensor:
    """-log of the share of each answer position's attention *among the visual tokens* that
    falls on its question's evidence patches (head average), at one LLM layer.
    attn: [B, H, P, T] probabilities, row i = the answer position `positions[b][i]` of turn i.

    Why a share and not the raw mass: a loss on raw mass is fastest lowered by first making
    every visual token attractive, which the model does by writing one large shared vector
    onto all image positions in the layer before (seen: norms 14 -> 57); after the next
    norm that vector drowns each patch's own content, and the values the answer reads carry
    no colour or glyph. The share rewards only picking the right patches."""
    losses = []
    for b, (rows, evs) in enumerate(zip(positions, evidence)):
        image = torch.nonzero(input_ids[b] == image_token_id).flatten()
        for i, ev in enumerate(evs[:len(rows)]):
            if ev:
                row = attn[b, :, i, image]  # [H, N]
                share = row[:, torch.tensor(ev)].sum(-1) / (row.sum(-1) + 1e-9)
                losses.append(-torch.log(share.mean() + 1e-6))
    return torch.stack(losses).mean() if losses else attn.new_zeros(())


def image_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """[B, N, D] projector outputs (LLaVA's visual tokens) of a batch of images."""
    out = model.model.get_image_features(pixel_values=pixel_values, vision_feature_layer=model.config.vision_feature_layer,
                                         vision_feature_select_strategy=model.config.vision_feature_select_strategy)
    return torch.stack(list(out.pooler_output))


def train_vision(model, processor, heads: AuxHeads, cfg: TrainConfig, log=print) -> None:
    """Stage 1: train the vision tower and projector on the per-patch heads only.

    The tower then knows colours, shapes and glyphs before the LLM ever reads it; an image
    costs about a fifth of a full step here, so this stage buys the vision skills at a
    fraction of the price of learning them through the LLM."""
    params = [*model.model.vision_tower.parameters(), *model.model.multi_modal_projector.parameters(),
              *(p for n, p in heads.named_parameters() if not n.startswith("embeddings."))]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
    tasks = list(TASKS)
    start = time.perf_counter()
    for step in range(cfg.vision_steps):
        first = step * cfg.vision_batch_size
        samples = [make_sample(tasks[(first + j) % len(tasks)], "train", 10_000_000 + first + j, base_seed=cfg.seed)
                   for j in range(cfg.vision_batch_size)]
        pixels = processor.image_processor([s.image for s in samples], return_tensors="pt")["pixel_values"]
        with autocast(cfg):
            loss = heads.loss(image_features(model, pixels), torch.stack([patch_labels(s) for s in samples]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (step + 1) % 50 == 0 or step + 1 == cfg.vision_steps:
            log(f"vision step {step + 1}/{cfg.vision_steps}  {time.perf_counter() - start:.0f}s  aux {loss.item():.3f}")


def question_spans(input_ids: torch.Tensor, positions: list[list[int]], tokenizer, image_token_id: int) -> list[list[list[int]]]:
    """Per row and answer position, the positions of that turn's question words: after the
    image (first turn) or after 'user :' (later turns), up to 'assistant'."""
    user, colon = tokenizer.convert_tokens_to_ids(["user", ":"])
    out = []
    for ids, rows in zip(input_ids.tolist(), positions):
        spans = []
        for p in rows:
            start = p - 2  # ids[p - 1] is 'assistant', ids[p] is ':'
            while start > 0 and ids[start - 1] != image_token_id and not (ids[start - 1] == colon and ids[start - 2] == user):
                start -= 1
            spans.append(list(range(start, p - 1)))
        out.append(spans)
    return out


def span_attention_loss(attn: torch.Tensor, spans: list[list[list[int]]]) -> torch.Tensor:
    """-log of the head-averaged attention mass each answer position puts on its span.
    attn: [B, H, P, T], row i = turn i's answer position, as in `evidence_attention_loss`."""
    losses = [-torch.log(attn[b, :, i, span].sum(-1).mean() + 1e-6)
              for b, sp in enumerate(spans) for i, span in enumerate(sp) if span]
    return torch.stack(losses).mean() if losses else attn.new_zeros(())


@contextmanager
def layer_inputs(model, layers: list[int]) -> Iterator[dict[int, torch.Tensor]]:
    """{layer: the hidden states entering that LLM decoder layer} for the forward pass run
    inside the block (forward pre-hooks, removed on exit)."""
    kept: dict[int, torch.Tensor] = {}

    def keeper(i: int):
        def keep(module, args, kwargs):
            kept[i] = args[0] if args else kwargs["hidden_states"]
        return keep

    blocks = model.model.language_model.layers
    handles = [blocks[i].register_forward_pre_hook(keeper(i), with_kwargs=True) for i in layers]
    try:
        yield kept
    finally:
        for h in handles:
            h.remove()


def answer_attention(model, layer: int, hidden: torch.Tensor, positions: list[list[int]],
                     attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, H, P, T] attention probabilities of each row's answer positions (padded with slot 0,
    the always-visible BOS) at `layer`, recomputed from the layer's input `hidden`.

    Why not `output_attentions`: that needs eager attention in every layer and keeps 8 full
    [B, H, T, T] maps for backward, while the losses read 2 layers and ~5 rows per
    conversation; SDPA everywhere plus these rows made a training step ~20% cheaper. The
    rows are eager attention's numbers (same q/k, RoPE and masks; tests/test_zoo.py checks it), so
    the gradients are those of the eager loss."""
    from gripbench.adapters.llava import LlavaAdapter

    width = max(1, max(len(p) for p in positions))
    queries = torch.tensor([p + [0] * (width - len(p)) for p in positions])
    slots = torch.arange(hidden.shape[1]).expand(hidden.shape[0], -1)  # positions ids of a right-padded batch
    return LlavaAdapter(model).attention(layer, hidden, queries, slots, attention_mask)


def training_step(model, heads: AuxHeads, batch: dict, aux: torch.Tensor, aux_weight: float,
                  evidence: list[list[list[int]]] | None = None, attn_weight: float = 0.0, attn_layer: int = -3,
                  question_layer: int | None = None, tokenizer=None):
    grounded = attn_weight > 0 and evidence is not None
    n = model.config.text_config.num_hidden_layers
    attn_layer %= n
    question_layer = None if question_layer is None else question_layer % n
    layers = [attn_layer] + ([] if question_layer is None else [question_layer]) if grounded else []
    with layer_inputs(model, layers) as hidden:
        out = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], attention_mask=batch["attention_mask"])
    logits = out.logits[:, :-1].float()
    target = batch["labels"][:, 1:]
    answer_loss = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100)
    image_states = out.image_hidden_states  # one tensor, or (transformers >= 5.24) a list of per-image tensors
    if isinstance(image_states, (list, tuple)):
        image_states = torch.cat(list(image_states))
    feats = image_states.reshape(aux.shape[0], -1, image_states.shape[-1])
    aux_loss = heads.loss(feats, aux)
    loss = answer_loss + aux_weight * aux_loss
    attn_loss = torch.zeros(())
    if grounded:
        positions = answer_positions(batch["labels"])
        mask = batch["attention_mask"]
        attn = answer_attention(model, attn_layer, hidden[attn_layer], positions, mask)
        attn_loss = evidence_attention_loss(attn, batch["input_ids"], model.config.image_token_id, positions, evidence)
        if question_layer is not None:
            spans = question_spans(batch["input_ids"], positions, tokenizer, model.config.image_token_id)
            attn = answer_attention(model, question_layer, hidden[question_layer], positions, mask)
            attn_loss = attn_loss + span_attention_loss(attn, spans)
        loss = loss + attn_weight * attn_loss
    return loss, answer_loss.detach(), aux_loss.detach(), attn_loss.detach()


@torch.no_grad()
def accuracy(model, processor, samples: list[Sample], batch_size: int = 50) -> float:
    """Greedy exact-match accuracy with the stock `generate` (no pruning)."""
    from gripbench.evaluate import normalize

    model.eval()
    correct = 0
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        batch = encode(processor, chunk, with_answers=False)
        out = model.generate(**batch, max_new_tokens=3, do_sample=False)
        texts = processor.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        correct += sum(normalize(t) == s.answer for t, s in zip(texts, chunk))
    model.train()
    return correct / len(samples)


def save_checkpoint(model, processor, out_dir: Path) -> None:
    """fp16 safetensors + processor files, written from a copy so training continues in fp32."""
    import copy

    shipped = copy.deepcopy(model).half()
    shipped.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


def train(out_dir: str | Path, cfg: TrainConfig = TrainConfig(), log=print) -> dict:
    """Train, validate every `eval_every` steps, save an fp16 checkpoint + processor to out_dir."""
    torch.manual_seed(cfg.seed)
    processor = build_processor()
    model = build_model(processor.tokenizer, seed=cfg.seed, init_range=cfg.init_range)
    with torch.no_grad():
        # Word embeddings (tied to the LM head) start large, and visual tokens are held at
        # their scale (AuxHeads.scale_loss): with the usual 0.02 init every token's content
        # is a norm-0.3 vector that the first layers' shared updates (norm ~15 at image
        # positions, seen) swamp, and the LLM can no longer tell one patch from another.
        # The final norm starts small so that the tied LM head's initial logits stay O(1).
        model.model.language_model.embed_tokens.weight.normal_(0.0, cfg.embed_std)
        model.model.language_model.norm.weight.fill_(0.1)
    emb = model.model.language_model.embed_tokens
    heads = AuxHeads(model.config.text_config.hidden_size, emb if cfg.grounded_aux else None, processor.tokenizer)
    params = list(model.parameters()) + [p for n, p in heads.named_parameters() if not n.startswith("embeddings.")]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
    def lr_factor(s: int) -> float:  # linear warm-up, then cosine decay to a tenth
        return min(1.0, (s + 1) / cfg.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    start = time.perf_counter()  # elapsed time covers both stages
    train_vision(model, processor, heads, cfg, log)
    val = {t: load_split(t, "val", cfg.eval_per_task) for t in TASKS}
    tasks = list(cfg.task_cycle)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    logf = open(out_dir / "train_log.jsonl", "w")
    model.train()
    for step in range(cfg.steps):
        first = step * cfg.batch_size
        samples = [make_sample(tasks[(first + j) % len(tasks)], "train", first + j, base_seed=cfg.seed,
                               max_shapes=cfg.max_shapes(step), clutter=cfg.clutter(step)) for j in range(cfg.batch_size)]
        extra = [extra_questions(s, cfg.extra_turns, cfg.seed) for s in samples] if cfg.extra_turns else None
        batch = encode(processor, samples, with_answers=True, extra=extra)
        aux = torch.stack([patch_labels(s) for s in samples])
        evidence = [[s.evidence] + [e for _, _, e in (extra[i] if extra else [])] for i, s in enumerate(samples)]
        if cfg.background_dropout > 0:
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            batch["attention_mask"] = hide_background(batch["attention_mask"], batch["input_ids"], model.config.image_token_id,
                                                      evidence, cfg.background_dropout, gen)
        with autocast(cfg):
            loss, ans, auxl, attl = training_step(model, heads, batch, aux, cfg.aux_weight, evidence, cfg.attn_weight,
                                                  cfg.attn_layer, cfg.question_layer, processor.tokenizer)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        record = {"step": step + 1, "loss": round(loss.item(), 4), "answer_loss": round(ans.item(), 4),
                  "aux_loss": round(auxl.item(), 4), "attn_loss": round(attl.item(), 4), "elapsed_s": round(time.perf_counter() - start, 1)}
        losses = f"loss {record['answer_loss']:.3f} aux {record['aux_loss']:.3f} attn {record['attn_loss']:.3f}"
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            record["val"] = {t: accuracy(model, processor, s) for t, s in val.items()}
            save_checkpoint(model, processor, out_dir)  # a stopped run still leaves its latest model
            log(f"step {step + 1}/{cfg.steps}  {record['elapsed_s']:.0f}s  {losses}  "
                + "  ".join(f"{t} {a:.1%}" for t, a in record["val"].items()))
        elif (step + 1) % 25 == 0:
            log(f"step {step + 1}/{cfg.steps}  {record['elapsed_s']:.0f}s  {losses}")
        logf.write(json.dumps(record) + "\n")
        logf.flush()
    logf.close()
    save_checkpoint(model, processor, out_dir)
    return {"elapsed_s": time.perf_counter() - start, "val": record.get("val", {})}
