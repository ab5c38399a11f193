"""Engine exactness: `none` is the stock model; pruning keeps original positions; the
attention rows given to methods equal eager attention."""

from __future__ import annotations

import pytest
import torch

from gripbench.adapters import VisionOutput
from gripbench.context import PruneContext
from gripbench.engine import Engine
from gripbench.methods import PrunePoint, PruningMethod, Selection


@pytest.fixture(scope="module", params=["embedded", "tiny_hf"])
def pair(request):
    model, proc = request.getfixturevalue(request.param)
    return model, proc, Engine(model, proc)


def _batch(engine, samples, n):
    return engine.prepare([s.image for s in samples[:n]], [s.question for s in samples[:n]])


@pytest.mark.parametrize("n", [1, 4])
def test_logits_match_stock_forward(pair, samples, n):
    model, _, engine = pair
    batch = _batch(engine, samples, n)
    with torch.no_grad():
        ref = model(**batch).logits
    out, mask = engine.logits(batch)
    assert (ref - out)[batch["attention_mask"].bool()].abs().max() < 1e-4


@pytest.mark.parametrize("n", [1, 4])
def test_greedy_matches_stock_generate(pair, samples, n):
    model, _, engine = pair
    batch = _batch(engine, samples, n)
    with torch.no_grad():
        ref = model.generate(**batch, max_new_tokens=6, do_sample=False)[:, batch["input_ids"].shape[1]:]
    got = engine.generate(batch, None, max_new_tokens=6).tokens
    assert got.shape == ref.shape and torch.equal(got, ref)


class KeepEven(PruningMethod):
    """test method: keep even visual tokens before the LLM"""

    def plan(self, info):
        return [PrunePoint(0, (info.num_visual_tokens + 1) // 2)]

    def select(self, ctx: PruneContext, point):
        return Selection(ctx.visual_ids[:, ::2])


def test_pre_llm_pruning_equals_stock_forward_on_kept_tokens(pair, samples):
    """Dropping tokens before the LLM = the stock forward on the shortened sequence with the
    original position ids AND an explicit 2D mask (the block-diagonal trap is avoided)."""
    model, _, engine = pair
    batch = _batch(engine, samples, 1)
    ids = batch["input_ids"][0]
    image = (ids == model.config.image_token_id).nonzero()[:, 0]
    drop = image[1::2]
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[drop] = False
    with torch.no_grad():
        emb = model.model.get_input_embeddings()(batch["input_ids"])
        feats = torch.cat(model.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output)
        emb = emb.masked_scatter((batch["input_ids"] == model.config.image_token_id)[..., None], feats)
        pos = torch.arange(ids.shape[0])[keep][None]
        ref = model(inputs_embeds=emb[:, keep], position_ids=pos, attention_mask=torch.ones_like(pos)).logits
    out, _ = engine.logits(batch, KeepEven(budget=0.5))
    assert out.shape == ref.shape
    assert (ref - out).abs().max() < 1e-4


def test_context_attention_equals_eager(pair, samples):
    """The attention row block computed from q/k after RoPE matches eager attention weights."""
    model, _, engine = pair
    batch = _batch(engine, samples, 2)
    model.set_attn_implementation({"vision_config": "eager", "text_config": "eager"})
    try:
        with torch.no_grad():
            out = model(**batch, output_attentions=True)
    finally:
        model.set_attn_implementation({"vision_config": "sdpa", "text_config": "sdpa"})
    captured = {}

    class Probe(PruningMethod):
        def plan(self, info):
            return [PrunePoint(2, info.num_visual_tokens)]

        def select(self, ctx, point):
            t = ctx.key_mask.shape[1]
            queries = torch.tensor([[t - 1, t - 3]] * ctx.batch_size)
            captured["now"] = ctx.attention(queries)
            captured["prev"] = ctx.attention(queries, layer=1)
            captured["cls"] = ctx.vision_attention()
            return Selection(ctx.visual_ids)

    engine.generate(batch, Probe(), max_new_tokens=1)
    t = batch["input_ids"].shape[1]
    for layer, key in ((2, "now"), (1, "prev")):
        ref = out.attentions[layer][:, :, [t - 1, t - 3]]
        assert (captured[key] - ref).abs().max() < 1e-5


def test_vision_cls_attention_equals_eager(pair, samples):
    model, _, engine = pair
    batch = _batch(engine, samples, 2)
    tower = model.model.vision_tower
    model.set_attn_implementation({"vision_config": "eager", "text_config": "sdpa"})
    try:
        with torch.no_grad():
            out = tower(batch["pixel_values"], output_attentions=True)
    finally:
        model.set_attn_implementation({"vision_config": "sdpa", "text_config": "sdpa"})
    layer = model.config.vision_feature_layer % (len(out.attentions) + 1) - 1
    ref = out.attentions[layer][:, :, 0, 1:]
    row, _ = engine.adapter.vision_attention(VisionOutput.cat(engine.vision(batch)))
    assert (row - ref).abs().max() < 1e-5


def test_token_counts_and_kept_indices(pair, samples):
    _, _, engine = pair
    from gripbench.methods import create_method

    batch = _batch(engine, samples, 2)
    n, layers = engine.info.num_visual_tokens, engine.info.num_layers
    gen = engine.generate(batch, create_method("fastv", budget=0.5, K=1, R=0.5), max_new_tokens=2)
    assert gen.tokens_llm_input == [n, n]
    assert gen.visual_per_layer == [[n] + [round(n * 0.5)] * (layers - 1)] * 2
    assert gen.tokens_layer_avg[0] == pytest.approx((n + (layers - 1) * round(n * 0.5)) / layers)
    assert all(len(k) == round(n * 0.5) for k in gen.kept_indices)


class Reversible(PruningMethod):
    """test method: keep the even visual tokens with replacement vectors (scaled own features),
    at `layer`, in ascending or descending order."""

    name = "reversible"
    layer: int = 0
    descending: bool = False

    def plan(self, info):
        return [PrunePoint(self.layer, (info.num_visual_tokens + 1) // 2)]

    def select(self, ctx, point):
        keep = ctx.visual_ids[:, ::2]
        feats = ctx.visual_features()[:, ::2]
        replace = feats * (0.5 + torch.linspace(0, 1, feats.shape[1], dtype=feats.dtype))[None, :, None]
        if self.descending:
            return Selection(keep.flip(1), replace=replace.flip(1))
        return Selection(keep, replace=replace)


@pytest.mark.parametrize("layer", [0, 2])
def test_unsorted_keep_is_sorted_with_its_replace_rows(pair, samples, layer):
    """A descending keep with replacement vectors gives exactly the sorted selection's logits
    (before the engine sorted, each vector landed on another token: logits off by up to 9.6)."""
    _, _, engine = pair
    batch = _batch(engine, samples, 2)
    asc, mask = engine.logits(batch, Reversible(budget=0.5, layer=layer))
    desc, mask2 = engine.logits(batch, Reversible(budget=0.5, layer=layer, descending=True))
    assert torch.equal(mask, mask2) and torch.equal(asc, desc)
    if layer == 0:  # the replacement vectors really change the result
        plain, _ = engine.logits(batch, KeepEven(budget=0.5))
        assert not torch.equal(plain, asc)


class BadKeep(PruningMethod):
    """test method: a repeated index (`kind='repeat'`) or, at a second point, a token pruned
    at the first (`kind='gone'`)."""

    name = "bad-keep"
    kind: str = "repeat"

    def plan(self, info):
        n = info.num_visual_tokens
        return [PrunePoint(0, 4)] if self.kind == "repeat" else [PrunePoint(0, n // 2), PrunePoint(2, 2)]

    def select(self, ctx, point):
        ids = ctx.visual_ids
        if self.kind == "repeat":
            return Selection(torch.cat([ids[:, :3], ids[:, :1]], dim=1))
        if ctx.layer == 0:
            return Selection(ids[:, ::2][:, : point.keep])
        return Selection(torch.stack([ids[:, 0], ids[:, 0] + 1], dim=1))  # an odd index: pruned at layer 0


def test_repeated_or_absent_kept_index_is_refused(pair, samples):
    _, _, engine = pair
    batch = _batch(engine, samples, 2)
    with pytest.raises(ValueError, match=r"method 'bad-keep' keeps visual token \d+ twice"):
        engine.generate(batch, BadKeep(budget=0.5), max_new_tokens=1)
    with pytest.raises(ValueError, match=r"method 'bad-keep' keeps visual token 1 \(row 0\), which is not present"):
        engine.generate(batch, BadKeep(budget=0.5, kind="gone"), max_new_tokens=1)


def test_timers_synchronise_the_gpu(pair, samples, monkeypatch):
    """Every timed region of a generation reads the engine's clock, which synchronises CUDA
    first when the model is on a GPU (exercised on CPU with the device and the sync faked):
    generate's start, the selection's start and end, prefill's end, decode's end."""
    from gripbench import testing

    engine = pair[2]
    reads = []
    real = Engine._clock
    monkeypatch.setattr(Engine, "_clock", lambda self: reads.append(1) or real(self))
    out = engine.generate(testing.contract_batch(engine, samples, n=2), testing.method_factory("fastv")(budget=0.5),
                          max_new_tokens=2)
    assert len(reads) == 5 and set(out.timings) >= {"scorer", "prefill", "decode"}

    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(str(device)))
    monkeypatch.setattr(Engine, "device", property(lambda self: torch.device("cuda", 0)))
    real(engine)
    assert synced == ["cuda:0"]


@pytest.mark.parametrize("name", ["none", "random", "fastv"])
def test_causal_fast_path_without_padding(pair, samples, name, monkeypatch):
    """A batch with no padding runs every layer with mask=None (SDPA's causal path), and gives
    the explicit-mask logits within the exactness tolerance; a padded batch keeps the mask."""
    from gripbench import testing

    engine = pair[2]
    method = testing.method_factory(name)(budget=0.5)
    seen = []
    run = engine.adapter.run_layer

    def spy(index, h, mask, *args):
        seen.append(mask is None)
        return run(index, h, mask, *args)

    monkeypatch.setattr(engine.adapter, "run_layer", spy)
    one = _batch(engine, samples, 1)  # a single row: no padding
    fast = engine.logits(one, method)[0]
    assert seen and all(seen)
    monkeypatch.setattr(Engine, "causal_kernel", property(lambda self: False))
    seen.clear()
    slow = engine.logits(one, method)[0]
    assert not any(seen)
    assert (fast - slow).abs().max() < 1e-4
    monkeypatch.undo()
    monkeypatch.setattr(engine.adapter, "run_layer", spy)
    seen.clear()
    padded = _batch(engine, samples, 4)
    assert not padded["attention_mask"].all()  # questions of different lengths
    engine.logits(padded, method)
    assert not any(seen)
