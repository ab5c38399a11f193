"""LLaVA-NeXT and LLaVA-OneVision (images): `none` is the stock model token for token, the
anyres layout (base tile, unpadded map, newline tokens, OneVision's shrunk map) is the stock
packing's, every method runs at rho = 1 as `none`, FLOPs match a measured count, and a
pruned ragged batch equals its rows run alone.

Tiny random checkpoints from `gripbench.testing.families.llava_next`: 3 x 3 tokens per
tile; the four test images take 2 x 2, 1 x 2, 2 x 1 and unpadded 1 x 2 tile grids; on
OneVision the 2 x 2 map (6 x 6) is shrunk to 4 x 4 (`anyres_max_2`)."""

from __future__ import annotations

import pytest
import torch

from gripbench.engine import Engine
from gripbench.flops import flop_counter, prefill_macs
from gripbench.methods import create_method, keep_count, registry
from gripbench.testing.families import build, family_images

VARIANTS = ["llava-next", "llava-onevision"]
QUESTIONS = ["what color is the sign ?", "how many objects are there ?", "what shape is the object ?",
             "what color is the object ?"]
SQUARE, WIDE, TALL, UNPADDED = range(4)


@pytest.fixture(scope="module", params=VARIANTS)
def fam(request):
    model, proc = build(request.param)
    return request.param, model, Engine(model, proc), family_images(request.param)


def _batch(engine, images, which):
    return engine.prepare([images[i] for i in which], [QUESTIONS[i] for i in which])


def _stock_pack(model, per_tile: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """The stock `pack_image_features` of one image's [tiles, g*g, C] vectors, zeros as newline."""
    inner, newline = model.model, per_tile.new_zeros(per_tile.shape[-1])
    if "Onevision" in type(inner).__name__:
        out, _ = inner.pack_image_features([per_tile], size[None], image_newline=newline,
                                           vision_aspect_ratio=model.config.vision_aspect_ratio)
    else:
        out, _ = inner.pack_image_features([per_tile], size[None], vision_feature_select_strategy="default",
                                           image_newline=newline)
    return out[0]


def _tower_features(model, tiles: torch.Tensor) -> torch.Tensor:
    """[tiles, g*g, Dv] the selected tower features of a row's tiles, computed here independently."""
    out = model.model.vision_tower(tiles, output_hidden_states=True)
    hs = out.hidden_states[model.config.vision_feature_layer]
    return hs[:, 1:] if model.config.vision_feature_select_strategy == "default" else hs


# ---- 1, 2: none is the stock model ------------------------------------------------------------
@pytest.mark.parametrize("which", [[SQUARE], [SQUARE, WIDE]], ids=["single", "batched"])
def test_none_logits_equal_stock_forward(fam, which):
    _, model, engine, images = fam
    batch = _batch(engine, images, which)
    with torch.no_grad():
        ref = model(**batch).logits
    out, _ = engine.logits(batch)
    assert (ref - out)[batch["attention_mask"].bool()].abs().max() <= 1e-4


@pytest.mark.parametrize("which", [[SQUARE], [UNPADDED], [SQUARE, WIDE], [SQUARE, WIDE, TALL, UNPADDED]],
                         ids=["single", "single-unpadded", "batched", "four"])
def test_none_greedy_equals_stock_generate(fam, which):
    _, model, engine, images = fam
    batch = _batch(engine, images, which)
    with torch.no_grad():
        ref = model.generate(**batch, max_new_tokens=6, do_sample=False)[:, batch["input_ids"].shape[1]:]
    got = engine.generate(batch, None, max_new_tokens=6).tokens
    assert got.shape == ref.shape and torch.equal(got, ref)


# ---- 3: every method at rho = 1 is none -------------------------------------------------------
SCORER_METHODS = {"grip", "grip-warmup", "dynamicvit"}  # shipped scorers are for hidden size 192


@pytest.fixture(scope="module")
def scorer_64(tmp_path_factory):
    from gripbench.grip.method import save_scorer
    from gripbench.grip.scorer import BudgetAwareScorer

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("scorer") / "random64.safetensors"
    save_scorer(BudgetAwareScorer(64), path)
    return str(path)


def test_every_method_at_rho_1_is_none(fam, scorer_64):
    _, _, engine, images = fam
    batch = _batch(engine, images, [SQUARE, WIDE, UNPADDED])
    vision = engine.vision(batch)
    ref, mask = engine.logits(batch, None, vision)
    ref_tokens = engine.generate(batch, None, max_new_tokens=3, vision=vision).tokens
    for name in registry().names():
        method = create_method(name, budget=1.0, **({"scorer": scorer_64} if name in SCORER_METHODS else {}))
        out, m = engine.logits(batch, method, vision)
        assert torch.equal(m, mask), name
        assert (out - ref)[mask].abs().max() <= 1e-4, name
        gen = engine.generate(batch, method, max_new_tokens=3, vision=vision)
        assert torch.equal(gen.tokens, ref_tokens), name
        assert gen.tokens_llm_input == [vo.layout.size for vo in vision], name


# ---- 4: layout -----------------------------------------------------------------------------------
def test_layout_is_the_stock_packing(fam):
    """Newline slots, tiles and cells against the stock packing of index-valued tiles; the
    prunable features are the projector outputs of the tower outputs they claim to be."""
    variant, model, engine, images = fam
    batch = _batch(engine, images, [SQUARE, WIDE, TALL, UNPADDED])
    vos = engine.vision(batch)
    g = model.config.vision_config.image_size // model.config.vision_config.patch_size
    interpolated = 0
    for r, vo in enumerate(vos):
        lay, geo = vo.layout, vo.extras["tiles"].geometry
        n_tiles = geo.n_tiles
        size = batch["image_sizes"][r]
        ones = torch.ones(n_tiles, g * g, 1)
        real = _stock_pack(model, ones, size)[:, 0] > 0.5  # newline slots are the zeros
        assert torch.equal(real, lay.prunable)
        assert vo.features.shape[1] == lay.size == real.numel()
        newline = model.model.image_newline
        assert torch.equal(vo.features[0, ~lay.prunable], newline.expand(int((~lay.prunable).sum()), -1))
        assert int((~lay.prunable).sum()) == lay.grids[1][0]  # one newline per map row
        # the prunable tokens are the grids in raster order
        (bh, bw), (mh, mw) = lay.grids
        ys, xs = lay.y[lay.prunable], lay.x[lay.prunable]
        assert torch.equal(ys, torch.cat([torch.arange(bh).repeat_interleave(bw), torch.arange(mh).repeat_interleave(mw)]))
        assert torch.equal(xs, torch.cat([torch.arange(bw).repeat(bh), torch.arange(mw).repeat(mh)]))
        assert torch.equal(lay.tile[:g * g], torch.zeros(g * g, dtype=torch.long))
        tiles = batch["pixel_values"][r, :n_tiles]
        with torch.no_grad():
            feats = _tower_features(model, tiles)  # [tiles, g*g, Dv]
            proj = model.model.multi_modal_projector(feats)
        if geo.interpolated:
            interpolated += 1
            assert vo.pre_projector is None
            assert (engine.adapter._pack(proj, geo)[lay.prunable] - vo.features[0, lay.prunable]).abs().max() < 1e-5
            continue
        index = torch.arange(n_tiles * g * g, dtype=torch.float).view(n_tiles, g * g, 1) + 1
        flat = _stock_pack(model, index, size)[:, 0].long() - 1  # tile * g*g + cell, -1 at newlines
        assert torch.equal(flat[lay.prunable] // (g * g), lay.tile[lay.prunable])
        assert (lay.tile[~lay.prunable] == -1).all()
        # map cells: the cell's place in the padded map, less the unpadded offset, is (y, x)
        cell = flat[g * g:][lay.prunable[g * g:]]
        t, local = cell // (g * g) - 1, cell % (g * g)
        py = (t // geo.tiles[1]) * g + local // g
        px = (t % geo.tiles[1]) * g + local % g
        assert torch.equal(py - geo.top, lay.y[g * g:][lay.prunable[g * g:]])
        assert torch.equal(px - geo.left, lay.x[g * g:][lay.prunable[g * g:]])
        src = flat[lay.prunable]
        claimed = proj.reshape(-1, proj.shape[-1])[src]
        assert (vo.features[0, lay.prunable] - claimed).abs().max() < 1e-5
        assert (vo.pre_projector[0, lay.prunable] - feats.reshape(-1, feats.shape[-1])[src]).abs().max() < 1e-5
        assert (vo.pre_projector[0, ~lay.prunable] == 0).all()
    assert interpolated == (1 if variant == "llava-onevision" else 0)


def test_tokens_llm_input_counts_newlines(fam):
    _, _, engine, images = fam
    batch = _batch(engine, images, [SQUARE, WIDE, TALL, UNPADDED])
    vos = engine.vision(batch)
    newlines = [int((~vo.layout.prunable).sum()) for vo in vos]
    prunable = [int(vo.layout.prunable.sum()) for vo in vos]
    gen = engine.generate(batch, None, max_new_tokens=1, vision=vos)
    assert gen.tokens_llm_input == [n + p for n, p in zip(newlines, prunable)]
    gen = engine.generate(batch, create_method("random", budget=0.25), max_new_tokens=1, vision=vos)
    assert gen.tokens_llm_input == [n + keep_count(0.25, p) for n, p in zip(newlines, prunable)]
    assert [len(k) for k in gen.kept_indices] == [keep_count(0.25, p) for p in prunable]


def test_vision_attention_equals_eager(fam):
    """The per-tile [CLS] row (SigLIP: mean received) of the eager tower attention, packed."""
    variant, model, engine, images = fam
    batch = _batch(engine, images, [SQUARE, UNPADDED])
    vos = engine.vision(batch)
    model.set_attn_implementation({"vision_config": "eager", "text_config": "sdpa"})
    try:
        for r, vo in enumerate(vos):
            geo = vo.extras["tiles"].geometry
            with torch.no_grad():
                out = model.model.vision_tower(batch["pixel_values"][r, :geo.n_tiles], output_attentions=True)
            layer = model.config.vision_feature_layer % (len(out.attentions) + 1) - 1
            probs = out.attentions[layer]
            ref = probs[:, :, 0, 1:] if variant == "llava-next" else probs.mean(dim=2)  # [tiles, H, g*g]
            packed = _stock_pack(model, ref.transpose(1, 2).contiguous(), batch["image_sizes"][r]).T[None]
            row, keys = engine.adapter.vision_attention(vo)
            assert row.shape == packed.shape and keys.shape[:2] == vo.features.shape[:2]
            assert (row - packed).abs().max() < 1e-5
            assert (row[..., ~vo.layout.prunable] == 0).all() and (keys[:, ~vo.layout.prunable] == 0).all()
    finally:
        model.set_attn_implementation({"vision_config": "sdpa", "text_config": "sdpa"})


def test_pixel_rows_are_the_rows_own_tiles(fam):
    _, _, engine, images = fam
    batch = _batch(engine, images, [SQUARE, WIDE])
    alone = _batch(engine, images, [WIDE])
    rows = engine.adapter.pixel_rows(batch)
    assert rows[0].shape[0] == 5 and rows[1].shape[0] == 3
    assert torch.equal(rows[1], engine.adapter.pixel_rows(alone)[0])
    assert engine.row_seeds(batch, 0)[1] == engine.row_seeds(alone, 0)[0]


# ---- 5: FLOPs --------------------------------------------------------------------------------------
def test_vision_flops_match_counted_stock_call(fam):
    _, model, engine, images = fam
    batch = _batch(engine, images, [SQUARE, WIDE, TALL, UNPADDED])
    vos = engine.vision(batch)
    for r, vo in enumerate(vos):
        extra = {"batch_num_images": batch["batch_num_images"][r:r + 1]} if "batch_num_images" in batch else {}
        with flop_counter() as fc, torch.no_grad():
            model.model.get_image_features(batch["pixel_values"][r:r + 1], batch["image_sizes"][r:r + 1], **extra)
        measured = fc.get_total_flops()
        assert abs(engine.adapter.vision_flops(vo) / measured - 1) < 0.02, (r, engine.adapter.vision_flops(vo), measured)


@pytest.mark.parametrize("method", [None, "random"])
def test_prefill_flops_match_counted_engine(fam, method):
    _, _, engine, images = fam
    batch = _batch(engine, images, [UNPADDED])
    vision = engine.vision(batch)
    m = create_method(method, budget=0.25) if method else None
    with flop_counter() as fc, torch.no_grad():
        _, _, st, per_layer = engine.prefill(batch, m, vision)
        engine.adapter.logits(st.hidden[:, -1:])
    text = batch["input_ids"].shape[1] - vision[0].layout.size
    analytic = 2 * prefill_macs(engine.adapter.llm_arch(), [text + v for v in per_layer[0]])
    assert abs(analytic / fc.get_total_flops() - 1) < 0.02, (analytic, fc.get_total_flops())


# ---- 6: a pruned ragged batch is its rows alone ---------------------------------------------------
@pytest.mark.parametrize("name", ["random", "fastv"])
def test_pruned_ragged_batch_equals_rows_alone(fam, name):
    _, _, engine, images = fam
    batch = _batch(engine, images, [SQUARE, WIDE, TALL, UNPADDED])
    method = create_method(name, budget=0.25)
    gen = engine.generate(batch, method, max_new_tokens=3)
    for i in range(4):
        one = engine.generate(engine.adapter.row_batch(batch, i), method, max_new_tokens=3)
        assert gen.kept_indices[i] == one.kept_indices[0], (name, i)
        assert gen.tokens_llm_input[i] == one.tokens_llm_input[0]
        assert gen.visual_per_layer[i] == one.visual_per_layer[0]
        n = one.tokens.shape[1]
        assert torch.equal(gen.tokens[i, :n], one.tokens[0]), (name, i)
        assert (gen.tokens[i, n:] == engine.pad_id).all()
