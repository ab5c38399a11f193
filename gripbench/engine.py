"""Pruned inference for Hugging Face VLMs, exactly the stock model when nothing is dropped.

Why a layer loop of our own: pruning inside the LLM changes the sequence length between
layers, and the stock forward sizes its mask and positions from layer 0. The engine runs
the model's own modules (embeddings, rotary embedding, decoder layers, norm, head) with:

- original position ids kept for every surviving token (gaps allowed), and an explicit
  additive mask (causal x padding) for every layer. Never `attention_mask=None` after a
  drop: transformers then reads gaps in position ids as packed sequences and builds a
  block-diagonal mask (silently wrong logits);
- a KV cache per layer that holds exactly the tokens that layer processed, so decoding
  attends over the kept tokens only, with a per-layer key mask;
- greedy decoding with left padding, with position ids and masks as `generate` makes
  them, so `none` reproduces `model.generate` token for token.

Every generation reports the three token counts (visual tokens into the LLM, layer average, KV cache) and the kept indices.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from gripbench.adapters import VisionOutput, adapter_for
from gripbench.context import PruneContext
from gripbench.methods import PrunePoint, PruningMethod, Selection, method_label


@dataclass
class Generation:
    """One batch's outputs. Per-row lists are aligned with the batch rows."""

    tokens: torch.Tensor                 # [B, new] generated ids (pad after EOS)
    texts: list[str]
    kept_indices: list[list[int]]        # original visual indices surviving the last pruning step
    tokens_llm_input: list[int]          # visual tokens entering LLM layer 0
    tokens_layer_avg: list[float]        # visual tokens averaged over LLM layers
    tokens_kv: list[float]               # visual tokens in the KV cache, averaged over layers
    visual_per_layer: list[int]          # visual tokens per row at each LLM layer
    timings: dict[str, float] = field(default_factory=dict)  # seconds: scorer, prefill, decode


@dataclass
class _State:
    """The sequence as the current layer sees it."""

    hidden: torch.Tensor       # [B, T, D]
    positions: torch.Tensor    # [..., B, T]
    key_mask: torch.Tensor     # [B, T] bool
    visual_slots: torch.Tensor  # [B, n]
    visual_ids: torch.Tensor    # [B, n]
    input_ids: torch.Tensor    # [B, T]


class Engine:
    """Runs one VLM with any pruning method. Not thread-safe; one instance per model."""

    def __init__(self, model, processor):
        self.model = model.eval()
        self.processor = processor
        self.adapter = adapter_for(model)
        self.info = self.adapter.info()
        tok = processor.tokenizer
        self.eos_id = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None else tok.eos_token_id
        self.pad_id = model.generation_config.pad_token_id if model.generation_config.pad_token_id is not None else tok.pad_token_id
        if isinstance(self.eos_id, list):
            self.eos_id = self.eos_id[0]
        if self.pad_id is None:
            self.pad_id = self.eos_id

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ---- inputs ---------------------------------------------------------------------------
    def prepare(self, images: list, questions: list[str]) -> dict[str, torch.Tensor]:
        """Chat-templated, left-padded processor inputs for one image + question per row."""
        texts = [self.processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}], add_generation_prompt=True)
            for q in questions]
        batch = self.processor(text=texts, images=images, padding=True, return_tensors="pt", padding_side="left")
        return {k: v.to(self.device) for k, v in batch.items()}

    @torch.no_grad()
    def vision(self, pixel_values: torch.Tensor) -> VisionOutput:
        return self.adapter.vision(pixel_values.to(self.device))

    # ---- prefill --------------------------------------------------------------------------
    def _initial_state(self, batch: dict, vision: VisionOutput) -> _State:
        ids, am = batch["input_ids"], batch["attention_mask"]
        b, t = ids.shape
        emb = self.adapter.embed(ids)
        image_mask = ids == self.adapter.image_token_id
        n = self.info.num_visual_tokens
        if not torch.all(image_mask.sum(1) == n):
            raise ValueError(f"every row needs exactly {n} image tokens (one image per prompt)")
        feats = vision.features.to(emb.dtype)
        emb = emb.masked_scatter(image_mask[..., None], feats.reshape(-1, feats.shape[-1]))
        slots = image_mask.nonzero()[:, 1].view(b, n)
        ids_v = torch.arange(n, device=ids.device).expand(b, n)
        return _State(emb, self.adapter.positions(ids, am), am.bool(), slots, ids_v, ids)

    @staticmethod
    def _checked(sel: Selection, present: torch.Tensor, d: int, method=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`sel.keep` sorted ascending per row with `sel.replace` rows permuted alike; a repeated
        index, a token no longer present or a wrong shape is a ValueError naming the method.
        Why: the engine writes `replace` into the kept slots in sequence order, so an unsorted
        `keep` with replacement vectors silently put each vector on another token."""
        who = f"method {method_label(method)!r}" if method is not None else "the selection"
        keep = sel.keep
        present = present.contiguous()
        b, n = present.shape
        if not isinstance(keep, torch.Tensor) or keep.dim() != 2 or keep.shape[0] != b or keep.is_floating_point():
            got = tuple(keep.shape) if isinstance(keep, torch.Tensor) else type(keep).__name__
            raise ValueError(f"{who} returned keep of shape {got}; expected integer indices [{b}, k]")
        keep = keep.to(device=present.device, dtype=torch.long)
        replace = sel.replace
        if replace is not None and (replace.dim() != 3 or replace.shape[:2] != keep.shape or replace.shape[2] != d):
            raise ValueError(f"{who} returned replace of shape {tuple(replace.shape)}; expected [{b}, {keep.shape[1]}, {d}]"
                             " (one vector per kept token, row-aligned with keep)")
        keep, order = keep.sort(dim=1, stable=True)
        repeated = keep[:, 1:] == keep[:, :-1]
        if repeated.any():
            row, col = repeated.nonzero()[0].tolist()
            raise ValueError(f"{who} keeps visual token {int(keep[row, col])} twice (row {row}); each kept index must be unique")
        pos = torch.searchsorted(present, keep).clamp(max=n - 1)  # present is ascending per row
        missing = present.gather(1, pos) != keep
        if missing.any():
            row, col = missing.nonzero()[0].tolist()
            raise ValueError(f"{who} keeps visual token {int(keep[row, col])} (row {row}), which is not present: it was pruned "
                             f"earlier or is outside 0..N-1")
        if replace is not None:
            replace = replace.gather(1, order.to(replace.device)[..., None].expand(-1, -1, d))
        return keep, replace

    def _apply(self, st: _State, sel: Selection, method=None) -> _State:
        """Drop the visual tokens not in `sel.keep` (same count per row) and put merged vectors."""
        d = st.hidden.shape[-1]
        keep, replace = self._checked(sel, st.visual_ids, d, method)
        b, t = st.key_mask.shape
        present = st.visual_ids
        kept_flags = (present[..., None] == keep[:, None, :]).any(-1)  # [B, n]
        keep_seq = torch.ones(b, t, dtype=torch.bool, device=keep.device)
        keep_seq.scatter_(1, st.visual_slots, kept_flags)
        new_t = int(keep_seq[0].sum())
        order = keep_seq.nonzero()[:, 1].view(b, new_t)
        hidden = torch.gather(st.hidden, 1, order[..., None].expand(-1, -1, d))
        pos_index = order.expand(*st.positions.shape[:-2], b, new_t) if st.positions.dim() > 2 else order
        positions = torch.gather(st.positions, -1, pos_index)
        key_mask = torch.gather(st.key_mask, 1, order)
        input_ids = torch.gather(st.input_ids, 1, order)
        is_visual = torch.zeros(b, t, dtype=torch.bool, device=keep.device).scatter_(1, st.visual_slots, True)
        new_visual = torch.gather(is_visual, 1, order)
        slots = new_visual.nonzero()[:, 1].view(b, keep.shape[1])
        if replace is not None:
            hidden = hidden.scatter(1, slots[..., None].expand(-1, -1, d), replace.to(hidden.dtype))
        return _State(hidden, positions, key_mask, slots, keep, input_ids)

    @staticmethod
    def _mask(key_mask: torch.Tensor, q_len: int, dtype) -> torch.Tensor:
        """Additive [B, 1, Q, K] mask: causal over the last q_len keys, padding everywhere."""
        b, k = key_mask.shape
        qi = torch.arange(k - q_len, k, device=key_mask.device)
        allowed = (torch.arange(k, device=key_mask.device)[None, :] <= qi[:, None])[None] & key_mask[:, None, :]
        return torch.zeros(allowed.shape, dtype=dtype, device=key_mask.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)[:, None]

    @staticmethod
    def row_seeds(batch: dict, seed: int) -> list[int]:
        """Per-row seeds from the row's own content, so a method's random choices for a sample
        do not depend on which other samples share its batch or on padding."""
        out = []
        for ids, am, px in zip(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]):
            h = hashlib.sha256(str(seed).encode())
            h.update(ids[am.bool()].cpu().numpy().tobytes())
            h.update(px.float().cpu().numpy().tobytes())
            out.append(int.from_bytes(h.digest()[:8], "little") >> 1)
        return out

    def context(self, batch: dict, vision: VisionOutput | None = None) -> PruneContext:
        """The layer-0 context of a batch (what a pre-LLM method sees), e.g. to train a scorer."""
        vision = self.vision(batch["pixel_values"]) if vision is None else vision
        return self._context(self._initial_state(batch, vision), 0, vision, None, [])

    def _context(self, st: _State, layer: int, vision: VisionOutput, prev_hidden, seeds: list[int]) -> PruneContext:
        return PruneContext(self.adapter, self.info, layer, st.hidden, st.positions, st.key_mask, st.visual_slots,
                            st.visual_ids, st.input_ids, vision, prev_hidden, seeds)

    def prefill(self, batch: dict, method: PruningMethod | None, vision: VisionOutput | None = None,
                timings: dict | None = None, key_bias: torch.Tensor | None = None):
        """Run the LLM over the prompt. Returns (cache, per-layer key masks, final state, visual
        tokens per layer). `key_bias` [B, N], added to every layer's attention logits on the
        visual keys, is the differentiable mask of relaxation-trained scorers (DynamicViT):
        log(keep) drops a key smoothly; it must be used without pruning."""
        vision = self.vision(batch["pixel_values"]) if vision is None else vision
        st = self._initial_state(batch, vision)
        bias = None
        if key_bias is not None:
            bias = torch.zeros(st.key_mask.shape, dtype=key_bias.dtype, device=key_bias.device)
            bias = bias.scatter(1, st.visual_slots, key_bias)[:, None, None, :]
        points: dict[int, PrunePoint] = {p.layer: p for p in (method.plan(self.info) if method else [])}
        seeds = self.row_seeds(batch, method.seed) if points else []
        cache = DynamicCache()
        key_masks, visual_per_layer = [], []
        prev_hidden = None
        scorer_s = 0.0
        for layer_idx, layer in enumerate(self.adapter.layers):
            if layer_idx in points:
                t0 = time.perf_counter()
                ctx = self._context(st, layer_idx, vision, prev_hidden, seeds)
                st = self._apply(st, method.select(ctx, points[layer_idx]), method)
                scorer_s += time.perf_counter() - t0
            visual_per_layer.append(st.visual_ids.shape[1])
            key_masks.append(st.key_mask)
            cos_sin = self.adapter.rotary(st.hidden, st.positions)
            mask = self._mask(st.key_mask, st.hidden.shape[1], st.hidden.dtype)
            if bias is not None:
                mask = mask + bias
            prev_hidden = st.hidden
            st.hidden = layer(st.hidden, attention_mask=mask, position_ids=st.positions, cache=cache,
                              use_cache=True, position_embeddings=cos_sin)
        if timings is not None:
            timings["scorer"] = timings.get("scorer", 0.0) + scorer_s
        return cache, key_masks, st, visual_per_layer

    # ---- generation -----------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, batch: dict, method: PruningMethod | None = None, max_new_tokens: int = 8,
                 vision: VisionOutput | None = None) -> Generation:
        """Greedy decoding with a KV cache of kept tokens only."""
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        cache, key_masks, st, per_layer = self.prefill(batch, method, vision, timings)
        logits = self.adapter.logits(st.hidden[:, -1:])[:, -1]
        timings["prefill"] = time.perf_counter() - t0 - timings.get("scorer", 0.0)
        t1 = time.perf_counter()
        b = logits.shape[0]
        unfinished = torch.ones(b, dtype=torch.bool, device=logits.device)
        positions = st.positions
        out = []
        for step in range(max_new_tokens):
            nxt = logits.argmax(-1)
            nxt = torch.where(unfinished, nxt, torch.full_like(nxt, self.pad_id))
            out.append(nxt)
            unfinished &= nxt != self.eos_id
            if step == max_new_tokens - 1 or not unfinished.any():
                break
            positions = self.adapter.next_positions(positions)
            logits = self._decode_step(nxt, positions, cache, key_masks)
        timings["decode"] = time.perf_counter() - t1
        timings["decode_steps"] = len(out) - 1
        tokens = torch.stack(out, dim=1)
        texts = self.processor.batch_decode(tokens, skip_special_tokens=True)
        n_layers = len(per_layer)
        avg = sum(per_layer) / n_layers
        # Each layer's cache holds exactly the visual tokens that layer attended to (pruned
        # keys are cut out of the cache, not masked), so the KV average equals the layer
        # average here; the fields stay separate for engines that only mask.
        return Generation(tokens, texts, st.visual_ids.tolist(), [per_layer[0]] * b, [avg] * b, [avg] * b,
                          per_layer, timings)

    def _decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, cache, key_masks: list) -> torch.Tensor:
        """Feed one token per row through every layer's cache; returns next-token logits [B, V]."""
        h = self.adapter.embed(tokens[:, None])
        cos_sin = self.adapter.rotary(h, positions)
        ones = torch.ones(h.shape[0], 1, dtype=torch.bool, device=h.device)
        for i, layer in enumerate(self.adapter.layers):
            key_masks[i] = torch.cat([key_masks[i], ones], dim=1)
            mask = self._mask(key_masks[i], 1, h.dtype)
            h = layer(h, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                      position_embeddings=cos_sin)
        return self.adapter.logits(h)[:, -1]

    def score(self, batch: dict, method: PruningMethod | None, targets: torch.Tensor,
              vision: VisionOutput | None = None, key_bias: torch.Tensor | None = None):
        """Teacher-forced answer scoring: targets [B, L] (pad = -100 after the end).
        Returns (sum of target log-probs [B], greedy-correct [B] bool, first-step logits [B, V]):
        greedy-correct means greedy decoding would produce exactly the target tokens."""
        cache, key_masks, st, _ = self.prefill(batch, method, vision, key_bias=key_bias)
        logits = self.adapter.logits(st.hidden[:, -1:])[:, -1]
        first = logits
        positions = st.positions
        total = torch.zeros(targets.shape[0], device=logits.device)
        correct = torch.ones(targets.shape[0], dtype=torch.bool, device=logits.device)
        for j in range(targets.shape[1]):
            tgt = targets[:, j]
            valid = tgt >= 0
            if not valid.any():
                break
            safe = tgt.clamp_min(0)
            logp = torch.log_softmax(logits.float(), dim=-1).gather(1, safe[:, None])[:, 0]
            total = total + torch.where(valid, logp, torch.zeros_like(logp))
            correct &= ~valid | (logits.argmax(-1) == safe)
            if j + 1 < targets.shape[1] and (targets[:, j + 1] >= 0).any():
                positions = self.adapter.next_positions(positions)
                logits = self._decode_step(safe, positions, cache, key_masks)
        return total, correct, first

    @torch.no_grad()
    def logits(self, batch: dict, method: PruningMethod | None = None, vision: VisionOutput | None = None):
        """([B, T', V] logits at every surviving position, [B, T'] key mask) for exactness tests."""
        _, _, st, _ = self.prefill(batch, method, vision)
        return self.adapter.logits(st.hidden), st.key_mask
