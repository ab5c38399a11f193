"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL through the engine: exactly the stock model when nothing is
dropped (forward logits, greedy `generate`, single rows and left-padded batches of images of
different sizes and aspect ratios), every method at rho = 1, attention rows = stock eager
attention, DeepStack applied to the tokens still present, analytic FLOPs = measured ones,
and a pruned ragged batch = each row alone. Tiny random checkpoints from
`gripbench.testing.families.qwen`."""

from __future__ import annotations

import sys

import pytest
import torch

from gripbench.engine import Engine
from gripbench.errors import GripbenchError
from gripbench.flops import flop_counter, prefill_macs
from gripbench.methods import PrunePoint, PruningMethod, Selection, create_method, keep_count, registry
from gripbench.testing.families import build, family_images

VARIANTS = ["qwen2-vl", "qwen2.5-vl", "qwen3-vl"]
QUESTIONS = ["what is the color of the circle ?", "how many objects are there in the image ?", "describe this picture .",
             "is the star left or right ?", "which side does it contain ?"]
SCORER_METHODS = {"grip", "grip-warmup", "dynamicvit"}  # shipped scorers trained for the embedded model's width


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These models are tiny: one intra-op thread is fastest, and on a shared 2-core machine a
    second OpenMP thread makes every small op wait for it (about 40x slower under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Family:
    def __init__(self, name: str):
        self.name = name
        self.model, self.processor = build(name)
        self.engine = Engine(self.model, self.processor)
        self.adapter = self.engine.adapter
        self.images = family_images(name)
        self.single = self.engine.prepare(self.images[:1], QUESTIONS[:1])
        self.mixed = self.engine.prepare(self.images, QUESTIONS)
        self._cache = {}

    def batch(self, n: int) -> dict:
        return self.single if n == 1 else self.mixed

    def cached(self, key, fn):
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    def vision(self, n: int):
        return self.cached(("vision", n), lambda: self.engine.vision(self.batch(n)))

    def none_logits(self, n: int):
        return self.cached(("none", n), lambda: self.engine.logits(self.batch(n), None, vision=self.vision(n)))

    def none_tokens(self, n: int, new: int = 6):
        return self.cached(("none-gen", n, new), lambda: self.engine.generate(self.batch(n), None, max_new_tokens=new,
                                                                              vision=self.vision(n)).tokens)


@pytest.fixture(scope="module", params=VARIANTS)
def fam(request) -> Family:
    return Family(request.param)


def _visual_counts(fam: Family, batch: dict) -> list[int]:
    return (batch["input_ids"] == fam.adapter.image_token_id).sum(1).tolist()


def test_mixed_batch_is_ragged(fam):
    """The batch really mixes token counts, and two rows share a count with different grids."""
    counts = _visual_counts(fam, fam.mixed)
    assert len(set(counts)) >= 3, counts
    grids = [v.layout.grids for v in fam.vision(5)]
    assert grids[0] != grids[2] and counts[0] == counts[2]


@pytest.mark.parametrize("n", [1, 5])
def test_logits_match_stock_forward(fam, n):
    batch = fam.batch(n)
    logits, key_mask = fam.none_logits(n)
    with torch.no_grad():
        ref = fam.model(**batch).logits
    am = batch["attention_mask"].bool()
    assert logits.shape == ref.shape and torch.equal(key_mask, am)
    assert (logits - ref)[am].abs().max().item() <= 1e-4


@pytest.mark.parametrize("n", [1, 5])
def test_greedy_matches_stock_generate(fam, n):
    batch = fam.batch(n)
    tokens = fam.none_tokens(n)
    with torch.no_grad():
        stock = fam.model.generate(**batch, do_sample=False, max_new_tokens=6)[:, batch["input_ids"].shape[1]:]
    assert tokens.tolist() == stock.tolist()


def test_two_images_in_one_row(fam):
    """A row with two images (one grid each, in order) next to a row with one: stock forward and
    generate, and a pre-LLM method pools each image's grid on its own."""
    chat = fam.processor.apply_chat_template
    texts = [chat([{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": QUESTIONS[0]}]}],
                  add_generation_prompt=True),
             chat([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTIONS[1]}]}],
                  add_generation_prompt=True)]
    batch = dict(fam.processor(text=texts, images=fam.images[:3], padding=True, return_tensors="pt", padding_side="left"))
    vision = fam.engine.vision(batch)
    assert [v.layout.grids for v in vision] == [((3, 4), (5, 3)), ((2, 6),)]
    logits, mask = fam.engine.logits(batch, None, vision=vision)
    with torch.no_grad():
        ref = fam.model(**batch).logits
        stock = fam.model.generate(**batch, do_sample=False, max_new_tokens=4)[:, batch["input_ids"].shape[1]:]
    assert (logits - ref)[mask].abs().max() <= 1e-4
    assert fam.engine.generate(batch, None, max_new_tokens=4, vision=vision).tokens.tolist() == stock.tolist()
    gen = fam.engine.generate(batch, create_method("pool", budget=0.25), max_new_tokens=1, vision=vision)
    assert gen.tokens_llm_input == [2 * 2 + 3 * 2, 1 * 3]  # grid_side(0.25, .) per side of the 3x4, 5x3 and 2x6 grids


def test_positions_are_the_stock_rope_index(fam):
    """The engine's positions are what stock `generate` gives its layers (the 3 M-RoPE rows
    of its [4, B, T] ids), and decoding continues at last + 1 as generate's text position +
    rope delta does."""
    batch = fam.mixed
    pos = fam.adapter.positions(batch)
    kwargs = {k: v for k, v in batch.items() if k != "input_ids"}
    stock = fam.model._prepare_position_ids_for_generation(batch["input_ids"], dict(kwargs, input_ids=batch["input_ids"]))
    assert stock.shape[0] == 4 and torch.equal(pos, stock[1:])
    text = stock[0][:, -1:] + 1  # the next text position; + rope_deltas is generate's next M-RoPE id
    assert torch.equal(fam.adapter.next_positions(pos), (text + fam.model.model.rope_deltas).expand(3, -1, -1))


def test_every_method_at_full_budget_is_none(fam):
    """rho = 1 gives the unpruned logits and tokens. The shipped GRIP/DynamicViT scorers are
    trained for the embedded model's width (192) and refuse this 64-wide LLM with one line
    (they run on a 192-wide build: test_scorer_methods_on_a_matching_width)."""
    ref, ref_mask = fam.none_logits(5)
    ref_tokens = fam.none_tokens(5, 3)
    bad = []
    for name in registry().names():
        method = create_method(name, budget=1.0)
        if name in SCORER_METHODS:
            with pytest.raises(GripbenchError, match="trained for hidden size"):
                fam.engine.logits(fam.mixed, method, vision=fam.vision(5))
            continue
        logits, mask = fam.engine.logits(fam.mixed, method, vision=fam.vision(5))
        gen = fam.engine.generate(fam.mixed, method, max_new_tokens=3, vision=fam.vision(5))
        if logits.shape != ref.shape or not torch.equal(mask, ref_mask) or (logits - ref)[ref_mask].abs().max() > 1e-4:
            bad.append(f"{name}: logits differ")
        if gen.tokens.tolist() != ref_tokens.tolist():
            bad.append(f"{name}: tokens differ")
        if gen.tokens_llm_input != _visual_counts(fam, fam.mixed):
            bad.append(f"{name}: {gen.tokens_llm_input} visual tokens entered the LLM")
    assert not bad, bad


@pytest.mark.parametrize("name", VARIANTS)
def test_scorer_methods_on_a_matching_width(name):
    """GRIP, its warm-up and DynamicViT run on Qwen layouts when the LLM width matches their
    shipped scorers: rho = 1 is the unpruned model, rho = 0.25 keeps keep_count tokens per row."""
    from importlib import import_module

    from gripbench.testing.families import FAMILIES

    module, fn = FAMILIES[name].split(":")
    engine = Engine(*getattr(import_module(module), fn)(hidden=192))
    batch = engine.prepare(family_images(name)[:3], QUESTIONS[:3])
    vision = engine.vision(batch)
    ref, mask = engine.logits(batch, None, vision=vision)
    counts = (batch["input_ids"] == engine.adapter.image_token_id).sum(1).tolist()
    for method in sorted(SCORER_METHODS):
        logits, _ = engine.logits(batch, create_method(method, budget=1.0), vision=vision)
        assert (logits - ref)[mask].abs().max() <= 1e-4, method
        gen = engine.generate(batch, create_method(method, budget=0.25), max_new_tokens=1, vision=vision)
        assert gen.tokens_llm_input == [keep_count(0.25, n) for n in counts], method


def _layer_inputs(model, batch: dict) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(each decoder layer's input hidden states, its eager attention weights) of the stock forward."""
    inputs = []
    hooks = [layer.register_forward_pre_hook(lambda m, a, k: inputs.append(a[0] if a else k["hidden_states"]),
                                             with_kwargs=True)
             for layer in model.model.language_model.layers]
    impl = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(**batch, output_attentions=True)
    finally:
        model.set_attn_implementation(impl)
        for h in hooks:
            h.remove()
    return inputs, list(out.attentions)


def test_attention_rows_equal_stock_eager(fam):
    """adapter.attention (what FastV/SparseVLM read) = the stock layer's eager attention weights,
    every layer, every real query row, of a left-padded mixed batch (M-RoPE, Qwen3's q/k norms)."""
    batch = fam.mixed
    inputs, attentions = _layer_inputs(fam.model, batch)
    am = batch["attention_mask"].bool()
    b, t = am.shape
    queries = torch.arange(t).expand(b, t)
    positions = fam.adapter.positions(batch)
    for layer, (h, ref) in enumerate(zip(inputs, attentions)):
        with torch.no_grad():
            got = fam.adapter.attention(layer, h, queries, positions, am)
        diff = (got - ref.float()).abs().amax(dim=(1, 3))[am]  # real query rows, every head and key
        assert diff.max().item() <= 1e-5, (layer, diff.max().item())


def _check_vision_attention(model, adapter, batch: dict, vision: list, monkeypatch) -> None:
    """vision_attention's rows = the mean attention each merged token's patches receive at the
    last block, from the stock block's eager weights (one chunk per image or window)."""
    module = sys.modules[type(adapter.visual.blocks[-1].attn).__module__]
    eager, weights = module.eager_attention_forward, []

    def recording(mod, *args, **kwargs):
        out, w = eager(mod, *args, **kwargs)
        if mod is adapter.visual.blocks[-1].attn:
            weights.append(w[0])  # [H, s, s] for one attention chunk
        return out, w

    monkeypatch.setattr(module, "eager_attention_forward", recording)
    impl = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
    finally:
        model.set_attn_implementation(impl)
        monkeypatch.undo()
    chunks = iter(weights)
    unit = adapter.unit
    for r, vo in enumerate(vision):
        p = vo.extras["attn_input"].shape[1]
        received, filled = [], 0
        while filled < p:  # the last block's chunks of this image, in the tower's order
            w = next(chunks)
            received.append(w.sum(1) / p)
            filled += w.shape[-1]
        received = torch.cat(received, dim=1)
        order = adapter._unit_order(batch["image_grid_thw"][r])
        ref = received.view(received.shape[0], -1, unit).mean(-1)[:, torch.argsort(order)]
        row, keys = adapter.vision_attention(vo)
        assert row.shape == (1, ref.shape[0], vo.features.shape[1]) and keys.shape[:2] == (1, vo.features.shape[1])
        assert torch.allclose(row[0], ref.float(), atol=1e-6), r
        assert torch.allclose(row.sum(-1), torch.full((1, ref.shape[0]), 1 / unit), atol=1e-5)  # a mean of means
    assert next(chunks, None) is None


def test_projector_and_vision_attention(fam, monkeypatch):
    """pre_projector is each merged token's 2 x 2 patches in raster order (the merger on it gives
    the stock features, Qwen2.5-VL's window permutation undone), and vision_attention's rows are
    the mean attention received at the last block, from the stock block's eager weights."""
    vision = fam.vision(5)
    for vo in vision:
        with torch.no_grad():
            assert torch.allclose(fam.adapter.project(vo.pre_projector), vo.features, atol=1e-5)
    _check_vision_attention(fam.model, fam.adapter, fam.mixed, vision, monkeypatch)


def test_qwen2_5_windowed_last_block(monkeypatch):
    """Qwen2.5-VL with a windowed last block (full attention in block 1 only): vision attention
    is received within windows, FLOPs follow the window structure, and `none` is still exact."""
    model, processor = build("qwen2.5-vl")
    model.config.vision_config.fullatt_block_indexes = [1]
    model.model.visual.fullatt_block_indexes = [1]
    engine = Engine(model, processor)
    batch = engine.prepare(family_images("qwen2.5-vl"), QUESTIONS)
    vision = engine.vision(batch)
    assert len(vision[0].extras["attn_segments"][0]) > 2  # several windows in the last block
    _check_vision_attention(model, engine.adapter, batch, vision, monkeypatch)
    logits, mask = engine.logits(batch, None, vision=vision)
    with torch.no_grad():
        assert (logits - model(**batch).logits)[mask].abs().max() <= 1e-4
    for r, vo in enumerate(vision):
        row = engine.adapter.row_batch(batch, r)
        with flop_counter() as fc, torch.no_grad():
            model.model.get_image_features(row["pixel_values"], row["image_grid_thw"])
        assert abs(engine.adapter.vision_flops(vo) - fc.get_total_flops()) / fc.get_total_flops() < 0.02, r


class KeepEven(PruningMethod):
    """test method: keep the even visual tokens before the LLM"""

    def plan(self, info):
        return [PrunePoint(0, (info.num_visual_tokens + 1) // 2)]

    def select(self, ctx, point):
        return Selection(ctx.visual_ids[:, ::2])


def test_deepstack_is_applied_to_present_tokens():
    """Qwen3-VL: DeepStack changes the output (zeroing it changes the logits), and after a drop
    the kept tokens get their own DeepStack features: pre-LLM pruning = the stock text model run
    on the kept tokens with their original positions, visual mask and DeepStack rows."""
    model, processor = build("qwen3-vl")
    engine = Engine(model, processor)
    batch = engine.prepare(family_images("qwen3-vl")[:1], QUESTIONS[:1])
    vision = engine.vision(batch)
    ref, _ = engine.logits(batch, None, vision=vision)
    zeroed = [v.select_rows([0]) for v in vision]
    for v in zeroed:
        v.extras["deepstack"] = torch.zeros_like(v.extras["deepstack"])
    off, _ = engine.logits(batch, None, vision=zeroed)
    assert (off - ref).abs().max() > 1e-2

    got, _ = engine.logits(batch, KeepEven(budget=0.5), vision=vision)
    ids = batch["input_ids"][0]
    image = ids == engine.adapter.image_token_id
    vis_slots = image.nonzero()[:, 0]
    keep = torch.ones_like(image)
    keep[vis_slots[1::2]] = False
    with torch.no_grad():
        emb = engine.adapter.embed(ids[None]).masked_scatter(image[None, :, None], vision[0].features)
        deep = vision[0].extras["deepstack"][0][:, ::2]  # [L, kept, D]
        out = model.model.language_model(
            inputs_embeds=emb[:, keep], position_ids=engine.adapter.positions(batch)[:, :, keep],
            attention_mask=torch.ones(1, int(keep.sum()), dtype=torch.long), visual_pos_masks=image[None, keep],
            deepstack_visual_embeds=list(deep))
        stock = model.lm_head(out.last_hidden_state)
    assert got.shape == stock.shape and (got - stock).abs().max() <= 1e-4


def test_vision_flops_match_counter(fam):
    """Analytic vision FLOPs of each row = a measured count of the stock vision call on that row
    (Qwen2.5-VL's windowed blocks with partial edge windows; Qwen3-VL's DeepStack mergers)."""
    for r, vo in enumerate(fam.vision(5)):
        row = fam.adapter.row_batch(fam.mixed, r)
        with flop_counter() as fc, torch.no_grad():
            fam.model.model.get_image_features(row["pixel_values"], row["image_grid_thw"])
        measured, analytic = fc.get_total_flops(), fam.adapter.vision_flops(vo)
        assert abs(analytic - measured) / measured < 0.02, (r, analytic, measured)


@pytest.mark.parametrize("method", [None, "random"])
def test_prefill_flops_match_counter(fam, method):
    """2 x prefill_macs(llm_arch, tokens at each layer) = the measured engine prefill (unpruned,
    and with rho = 0.5 of the visual tokens dropped before the LLM)."""
    batch = fam.adapter.row_batch(fam.mixed, 1)
    vision = fam.engine.vision(batch)
    m = None if method is None else create_method(method, budget=0.5)
    with flop_counter() as fc, torch.no_grad():
        _, _, st, per_layer = fam.engine.prefill(batch, m, vision)
        fam.adapter.logits(st.hidden[:, -1:])
    text = batch["input_ids"].shape[1] - vision[0].features.shape[1]
    analytic = 2 * prefill_macs(fam.adapter.llm_arch(), [text + v for v in per_layer[0]])
    measured = fc.get_total_flops()
    assert abs(analytic - measured) / measured < 0.02, (analytic, measured)


def _trim(tokens: list[int], pad: int) -> list[int]:
    while tokens and tokens[-1] == pad:
        tokens = tokens[:-1]
    return tokens


@pytest.mark.parametrize("method", ["random", "fastv"])
def test_pruned_ragged_batch_equals_rows_alone(fam, method):
    """A budget applies per row: the mixed-size batch keeps, per row, the tokens and generates
    the answer that row gets alone (random: keep_count(0.25, N_row) tokens into the LLM)."""
    gen = fam.engine.generate(fam.mixed, create_method(method, budget=0.25), max_new_tokens=4, vision=fam.vision(5))
    counts = _visual_counts(fam, fam.mixed)
    if method == "random":
        assert gen.tokens_llm_input == [keep_count(0.25, n) for n in counts]
    else:
        assert gen.tokens_llm_input == counts and all(len(k) < n for k, n in zip(gen.kept_indices, counts))
    for r in range(len(counts)):
        row = fam.adapter.row_batch(fam.mixed, r)
        alone = fam.engine.generate(row, create_method(method, budget=0.25), max_new_tokens=4)
        assert gen.kept_indices[r] == alone.kept_indices[0], r
        assert _trim(gen.tokens[r].tolist(), fam.engine.pad_id) == _trim(alone.tokens[0].tolist(), fam.engine.pad_id), r
        assert gen.visual_per_layer[r] == alone.visual_per_layer[0]
