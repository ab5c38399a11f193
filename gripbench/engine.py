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

- ragged batches: rows may carry different numbers of visual tokens (dynamic resolution,
  anyres tiles). A budget applies per row; the method is called once per group of rows
  that share a layout (same prunable-token count and grids), so it always sees a dense
  batch; after a drop, a row left shorter than the longest keeps some of its dropped slots
  as masked padding. Tokens a family marks unprunable (image-newline tokens) are never
  shown to methods, always kept and always counted.

Every generation reports, per row, the three token counts (visual tokens into the LLM,
layer average, KV cache) and the kept indices.
"""

from __future__ import annotations

import collections
import hashlib
import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from gripbench.adapters import VisionOutput, VisionView, adapter_for
from gripbench.context import PruneContext
from gripbench.methods import PruningMethod, Selection, method_label


@dataclass
class Generation:
    """One batch's outputs. Per-row lists are aligned with the batch rows; rows may differ in
    their visual-token counts (dynamic resolution, anyres tiles)."""

    tokens: torch.Tensor                 # [B, new] generated ids (pad after EOS)
    texts: list[str]
    kept_indices: list[list[int]]        # prunable visual indices surviving the last pruning step
    tokens_llm_input: list[int]          # visual tokens entering LLM layer 0 (fixed tokens included)
    tokens_layer_avg: list[float]        # visual tokens averaged over LLM layers
    tokens_kv: list[float]               # visual tokens in the KV cache, averaged over layers
    visual_per_layer: list[list[int]]    # per row: visual tokens at each LLM layer
    timings: dict[str, float] = field(default_factory=dict)  # seconds: scorer, prefill, decode


@dataclass
class _State:
    """The sequence as the current layer sees it. Visual tokens are tracked per row, because
    rows may carry different numbers of them: `slots[r]` is where row r's present prunable
    visual tokens sit, `ids[r]` their prunable indices (0..P_r-1), ascending."""

    hidden: torch.Tensor       # [B, T, D]
    positions: torch.Tensor    # [..., B, T]
    key_mask: torch.Tensor     # [B, T] bool
    input_ids: torch.Tensor    # [B, T]
    slots: list[torch.Tensor]
    ids: list[torch.Tensor]


@dataclass
class _Rows:
    """Per-row facts fixed for a prefill: each row's vision results, the full visual index of
    each prunable token, the fixed (unprunable) token count, and the row groups that select
    together (rows with the same prunable count and grids)."""

    vision: list[VisionOutput]
    prunable_index: list[torch.Tensor]
    fixed: list[int]
    groups: dict[tuple, list[int]]


class Engine:
    """Runs one VLM with any pruning method. Not thread-safe; one instance per model."""

    def __init__(self, model, processor):
        self.model = model.eval()
        self.processor = processor
        self.adapter = adapter_for(model)
        self.info = self.adapter.info()
        # layer calls that ran without a mask (the kernel's causal path) or with an explicit
        # one, since construction: the sweep records which path its timed runs took
        self.attention_calls = collections.Counter()
        tok = getattr(processor, "tokenizer", processor)
        self.eos_id = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None else tok.eos_token_id
        self.pad_id = model.generation_config.pad_token_id if model.generation_config.pad_token_id is not None else tok.pad_token_id
        if isinstance(self.eos_id, list):
            self.eos_id = self.eos_id[0]
        if self.pad_id is None:
            self.pad_id = self.eos_id

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _clock(self) -> float:
        """`time.perf_counter()` once the device's queued work is done: CUDA kernels run
        asynchronously, so an unsynchronised clock charges a region's kernels to whichever
        region next waits for them (the scorer / prefill / decode split was unreliable)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    # ---- inputs ---------------------------------------------------------------------------
    def prepare(self, images: list, questions: list[str]) -> dict[str, torch.Tensor]:
        """Chat-templated, left-padded processor inputs for one image + question per row."""
        batch = self.adapter.prepare(self.processor, images, questions)
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    @torch.no_grad()
    def vision(self, batch: dict | torch.Tensor) -> list[VisionOutput]:
        """One VisionOutput per row (a bare pixel tensor is accepted for fixed-size families)."""
        if isinstance(batch, torch.Tensor):
            batch = {"pixel_values": batch}
        return self.adapter.vision({k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})

    # ---- prefill --------------------------------------------------------------------------
    def _rows(self, vision: list[VisionOutput]) -> _Rows:
        index, fixed, groups = [], [], {}
        for r, vo in enumerate(vision):
            lay = vo.layout
            index.append(lay.prunable.nonzero()[:, 0].to(self.device))
            fixed.append(lay.size - len(index[-1]))
            groups.setdefault(lay.key(), []).append(r)
        return _Rows(vision, index, fixed, groups)

    def _initial_state(self, batch: dict, rows: _Rows) -> _State:
        ids, am = batch["input_ids"], batch["attention_mask"]
        emb = self.adapter.embed(ids)
        image_mask = ids == self.adapter.image_token_id
        counts = image_mask.sum(1).tolist()
        if len(rows.vision) != len(counts):
            raise ValueError(f"{len(rows.vision)} rows of vision results for a batch of {len(counts)}")
        for r, (c, vo) in enumerate(zip(counts, rows.vision)):
            if c != vo.features.shape[1]:
                raise ValueError(f"row {r} has {c} image placeholder tokens but its images give {vo.features.shape[1]} "
                                 "visual tokens")
        feats = torch.cat([vo.features[0] for vo in rows.vision]).to(emb.dtype)
        emb = emb.masked_scatter(image_mask[..., None], feats)
        slots = [image_mask[r].nonzero()[:, 0][rows.prunable_index[r]] for r in range(len(counts))]
        vids = [torch.arange(len(s), device=ids.device) for s in slots]
        return _State(emb, self.adapter.positions(batch), am.bool(), ids, slots, vids)

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

    def _apply(self, st: _State, keeps: list, replaces: list) -> _State:
        """Drop, per row, the visual tokens not in `keeps[r]` (None: row untouched) and put
        merged vectors. Rows may keep different counts: a row left shorter than the longest
        keeps some of its dropped slots as masked padding (never attended to, never counted),
        so the batch stays one rectangular tensor with every token at its original position."""
        b, t = st.key_mask.shape
        d = st.hidden.shape[-1]
        keep_seq = torch.ones(b, t, dtype=torch.bool, device=st.key_mask.device)
        for r, keep in enumerate(keeps):
            if keep is not None:
                keep_seq[r, st.slots[r][~torch.isin(st.ids[r], keep)]] = False
        counts = keep_seq.sum(1)
        new_t = int(counts.max())
        key_mask = st.key_mask.clone()
        for r in (counts < new_t).nonzero()[:, 0].tolist():
            extra = (~keep_seq[r]).nonzero()[: new_t - int(counts[r]), 0]
            keep_seq[r, extra] = True
            key_mask[r, extra] = False
        order = keep_seq.nonzero()[:, 1].view(b, new_t)
        hidden = torch.gather(st.hidden, 1, order[..., None].expand(-1, -1, d))
        pos_index = order.expand(*st.positions.shape[:-2], b, new_t) if st.positions.dim() > 2 else order
        positions = torch.gather(st.positions, -1, pos_index)
        new_index = keep_seq.long().cumsum(1) - 1  # old slot -> new slot
        slots, ids = [], []
        for r, keep in enumerate(keeps):
            if keep is None:
                slots.append(new_index[r, st.slots[r]])
                ids.append(st.ids[r])
                continue
            old = st.slots[r][torch.isin(st.ids[r], keep)]
            slots.append(new_index[r, old])
            ids.append(keep)
            if replaces[r] is not None:
                hidden[r, slots[-1]] = replaces[r].to(hidden.dtype)
        return _State(hidden, positions, torch.gather(key_mask, 1, order), torch.gather(st.input_ids, 1, order),
                      slots, ids)

    def _select(self, st: _State, rows: _Rows, layer: int, plans: dict, method, prev_hidden, seeds) -> tuple[list, list]:
        """Ask the method for its selection, one call per group of rows with equal layouts, so
        a method always sees a dense [b, n] batch with one token count and one grid."""
        b = st.hidden.shape[0]
        keeps, replaces = [None] * b, [None] * b
        for key, members in rows.groups.items():
            info, points = plans[key]
            if layer not in points:
                continue
            ctx = self._context(st, rows, key, info, layer, prev_hidden, seeds)
            keep, replace = self._checked(method.select(ctx, points[layer]), ctx.visual_ids, st.hidden.shape[-1], method)
            for j, r in enumerate(members):
                keeps[r] = keep[j]
                replaces[r] = None if replace is None else replace[j]
        return keeps, replaces

    @staticmethod
    def _mask(key_mask: torch.Tensor, q_len: int, dtype) -> torch.Tensor:
        """Additive [B, 1, Q, K] mask: causal over the last q_len keys, padding everywhere."""
        b, k = key_mask.shape
        qi = torch.arange(k - q_len, k, device=key_mask.device)
        allowed = (torch.arange(k, device=key_mask.device)[None, :] <= qi[:, None])[None] & key_mask[:, None, :]
        return torch.zeros(allowed.shape, dtype=dtype, device=key_mask.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)[:, None]

    def _mask_free(self, keys: int) -> bool:
        """Whether a layer over `keys` keys may run with mask=None when its rows have no
        padding and no bias: SDPA then takes its causal fast path and FlashAttention can run.
        Kept tokens stay contiguous in the sequence (pruned ones are removed, not masked), so
        causal order over slots is the model's order; their position gaps live in RoPE. The
        padding check (`key_mask.all()`, a GPU sync) is the caller's, made once per prefill
        and after each pruning step, and once per generation for the decode layers."""
        return self.causal_kernel and not self.adapter.needs_mask(keys)

    def _layer_mask(self, key_mask: torch.Tensor, q_len: int, dtype, unpadded: bool, bias: torch.Tensor | None = None):
        """The mask one layer call gets: None on the causal path (`unpadded` rows, no bias,
        `_mask_free`), else the additive mask (+ bias); counted in `attention_calls`."""
        if unpadded and bias is None and self._mask_free(key_mask.shape[1]):
            self.attention_calls["causal"] += 1
            return None
        self.attention_calls["masked"] += 1
        mask = self._mask(key_mask, q_len, dtype)
        return mask if bias is None else mask + bias

    @property
    def causal_kernel(self) -> bool:
        """Whether the LLM's attention implementation is causal without a mask (SDPA infers
        `is_causal` from a missing mask; FlashAttention and flex attention are causal by
        configuration); eager attention needs the explicit mask."""
        impl = getattr(self.adapter.config.get_text_config(), "_attn_implementation", None) or "eager"
        return impl != "eager"

    def row_seeds(self, batch: dict, seed: int) -> list[int]:
        """Per-row seeds from the row's own content, so a method's random choices for a sample
        do not depend on which other samples share its batch or on padding."""
        out = []
        for ids, am, px in zip(batch["input_ids"], batch["attention_mask"], self.adapter.pixel_rows(batch)):
            h = hashlib.sha256(str(seed).encode())
            h.update(ids[am.bool()].cpu().numpy().tobytes())
            h.update(px.float().cpu().numpy().tobytes())
            out.append(int.from_bytes(h.digest()[:8], "little") >> 1)
        return out

    def context(self, batch: dict, vision: list[VisionOutput] | None = None) -> PruneContext:
        """The layer-0 context of a batch (what a pre-LLM method sees), e.g. to train a scorer.
        The rows must share one layout (a fixed-size family, or images of one size)."""
        vision = self.vision(batch) if vision is None else vision
        rows = self._rows(vision)
        if len(rows.groups) != 1:
            raise ValueError("Engine.context needs rows with one visual-token layout; split the batch by image size")
        key = next(iter(rows.groups))
        return self._context(self._initial_state(batch, rows), rows, key, self.adapter.group_info(vision[0].layout), 0,
                             None, [])

    def _context(self, st: _State, rows: _Rows, key, info, layer: int, prev_hidden, seeds: list[int]) -> PruneContext:
        members = rows.groups[key]
        whole = len(members) == st.hidden.shape[0]  # one group: the tensors themselves, no copies
        idx = torch.tensor(members, device=st.hidden.device)
        pick = (lambda t: t) if whole else (lambda t: None if t is None else t.index_select(0, idx))  # noqa: E731
        positions = st.positions if whole else st.positions.index_select(st.positions.dim() - 2, idx)
        group = [rows.vision[r] for r in members]
        index = rows.prunable_index[members[0]]
        view = VisionView(self.adapter, group, None if len(index) == group[0].layout.size else index)
        return PruneContext(self.adapter, info, layer, pick(st.hidden), positions, pick(st.key_mask),
                            torch.stack([st.slots[r] for r in members]), torch.stack([st.ids[r] for r in members]),
                            pick(st.input_ids), view, pick(prev_hidden), [seeds[r] for r in members] if seeds else [])

    def prefill(self, batch: dict, method: PruningMethod | None, vision: list[VisionOutput] | None = None,
                timings: dict | None = None, key_bias: torch.Tensor | None = None):
        """Run the LLM over the prompt. Returns (cache, per-layer key masks, final state, visual
        tokens per layer per row). `key_bias` [B, N], added to every layer's attention logits on
        the visual keys, is the differentiable mask of relaxation-trained scorers (DynamicViT):
        log(keep) drops a key smoothly; it must be used without pruning."""
        vision = self.vision(batch) if vision is None else vision
        rows = self._rows(vision)
        st = self._initial_state(batch, rows)
        bias = None
        if key_bias is not None:
            bias = torch.zeros(st.key_mask.shape, dtype=key_bias.dtype, device=key_bias.device)
            for r, s in enumerate(st.slots):
                bias[r, s] = key_bias[r, : len(s)]
            bias = bias[:, None, None, :]
        plans, layers_with_points = {}, set()
        for key, members in rows.groups.items():
            info = self.adapter.group_info(rows.vision[members[0]].layout)
            points = {p.layer: p for p in (method.plan(info) if method else [])}
            plans[key] = (info, points)
            layers_with_points |= set(points)
        seeds = self.row_seeds(batch, method.seed) if layers_with_points else []
        cache = DynamicCache()
        key_masks, per_row = [], [[] for _ in rows.vision]
        prev_hidden = None
        scorer_s = 0.0
        unpadded = bias is None and bool(st.key_mask.all())
        for layer_idx in range(len(self.adapter.layers)):
            if layer_idx in layers_with_points:
                t0 = self._clock()
                keeps, replaces = self._select(st, rows, layer_idx, plans, method, prev_hidden, seeds)
                st = self._apply(st, keeps, replaces)
                scorer_s += self._clock() - t0
                unpadded = bias is None and bool(st.key_mask.all())  # ragged rows may now be padded
            for r, ids in enumerate(st.ids):
                per_row[r].append(rows.fixed[r] + len(ids))
            key_masks.append(st.key_mask)
            cos_sin = self.adapter.rotary(st.hidden, st.positions)
            mask = self._layer_mask(st.key_mask, st.hidden.shape[1], st.hidden.dtype, unpadded, bias)
            prev_hidden = st.hidden
            st.hidden = self.adapter.run_layer(layer_idx, st.hidden, mask, st.positions, cos_sin, cache)
            st.hidden = self.adapter.after_layer(layer_idx, st.hidden, st.slots,
                                                 [rows.prunable_index[r][i] for r, i in enumerate(st.ids)], rows.vision)
        if timings is not None:
            timings["scorer"] = timings.get("scorer", 0.0) + scorer_s
        return cache, key_masks, st, per_row

    # ---- generation -----------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, batch: dict, method: PruningMethod | None = None, max_new_tokens: int = 8,
                 vision: list[VisionOutput] | None = None) -> Generation:
        """Greedy decoding with a KV cache of kept tokens only."""
        timings: dict[str, float] = {}
        t0 = self._clock()
        cache, key_masks, st, per_layer = self.prefill(batch, method, vision, timings)
        logits = self.adapter.logits(st.hidden[:, -1:])[:, -1]
        t1 = self._clock()
        timings["prefill"] = t1 - t0 - timings.get("scorer", 0.0)
        b = logits.shape[0]
        unfinished = torch.ones(b, dtype=torch.bool, device=logits.device)
        positions = st.positions
        unpadded = [bool(m.all()) for m in key_masks]  # one padding check per layer per generation
        out = []
        for step in range(max_new_tokens):
            nxt = logits.argmax(-1)
            nxt = torch.where(unfinished, nxt, torch.full_like(nxt, self.pad_id))
            out.append(nxt)
            unfinished &= nxt != self.eos_id
            if step == max_new_tokens - 1 or not unfinished.any():
                break
            positions = self.adapter.next_positions(positions)
            logits = self._decode_step(nxt, positions, cache, key_masks, unpadded)
        timings["decode"] = self._clock() - t1
        timings["decode_steps"] = len(out) - 1
        tokens = torch.stack(out, dim=1)
        texts = self.processor.batch_decode(tokens, skip_special_tokens=True)
        avg = [sum(counts) / len(counts) for counts in per_layer]
        # Each layer's cache holds exactly the visual tokens that layer attended to (pruned
        # keys are cut out of the cache, not masked), so the KV average equals the layer
        # average here; the fields stay separate for engines that only mask.
        return Generation(tokens, texts, [i.tolist() for i in st.ids], [c[0] for c in per_layer], avg, list(avg),
                          per_layer, timings)

    def _decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, cache, key_masks: list,
                     unpadded: list[bool]) -> torch.Tensor:
        """Feed one token per row through every layer's cache; returns next-token logits [B, V].
        `unpadded[i]`: layer i's keys hold no padding (fixed after prefill: decoding appends
        real tokens only)."""
        h = self.adapter.embed(tokens[:, None])
        cos_sin = self.adapter.rotary(h, positions)
        ones = torch.ones(h.shape[0], 1, dtype=torch.bool, device=h.device)
        for i in range(len(self.adapter.layers)):
            key_masks[i] = torch.cat([key_masks[i], ones], dim=1)
            mask = self._layer_mask(key_masks[i], 1, h.dtype, unpadded[i])
            h = self.adapter.run_layer(i, h, mask, positions, cos_sin, cache)
        return self.adapter.logits(h)[:, -1]

    def score(self, batch: dict, method: PruningMethod | None, targets: torch.Tensor,
              vision: list[VisionOutput] | None = None, key_bias: torch.Tensor | None = None):
        """Teacher-forced answer scoring: targets [B, L] (pad = -100 after the end).
        Returns (sum of target log-probs [B], greedy-correct [B] bool, first-step logits [B, V]):
        greedy-correct means greedy decoding would produce exactly the target tokens."""
        cache, key_masks, st, _ = self.prefill(batch, method, vision, key_bias=key_bias)
        logits = self.adapter.logits(st.hidden[:, -1:])[:, -1]
        first = logits
        positions = st.positions
        unpadded = [bool(m.all()) for m in key_masks]  # one padding check per layer per generation
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
                logits = self._decode_step(safe, positions, cache, key_masks, unpadded)
        return total, correct, first

    @torch.no_grad()
    def logits(self, batch: dict, method: PruningMethod | None = None, vision: list[VisionOutput] | None = None):
        """([B, T', V] logits at every surviving position, [B, T'] key mask) for exactness tests."""
        _, _, st, _ = self.prefill(batch, method, vision)
        return self.adapter.logits(st.hidden), st.key_mask
