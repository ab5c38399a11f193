"""Every LLaVA layout (`LlavaForConditionalGeneration`) through the engine: CLIP (`default` and
`full`), SigLIP (no [CLS]), multi-layer features, Llama / Mistral / Qwen2 / Phi-3 LLMs, and the
Pixtral tower (dynamic resolution, ragged batches), on the tiny checkpoints of
`gripbench.testing.families.llava`.

- `none` is the stock model: logits within 1e-4, greedy tokens equal, single and batched
  (Pixtral: images of different sizes in one batch, so rows carry different token counts);
- every registered method at rho = 1 is `none`, and runs at rho = 0.25;
- the LLM attention rows given to methods (fused qkv included) and the vision-tower signal
  equal the stock eager attention weights;
- analytic vision and prefill FLOPs equal a `torch.utils.flop_counter` count within 2 %;
- a pruned ragged Pixtral batch equals each row alone.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from gripbench.engine import Engine
from gripbench.flops import flop_counter, prefill_macs
from gripbench.methods import PrunePoint, PruningMethod, Selection, create_method, keep_count, registry
from gripbench.testing.families import build
from gripbench.testing.families.llava import images, questions

VARIANTS = ["llava-clip", "llava-siglip", "llava-multilayer", "llava-mistral", "llava-phi3", "llava-pixtral"]
SCORER_METHODS = {"grip", "grip-warmup", "dynamicvit"}
METHODS = registry().names()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine each small
    op then waits on the other thread (30 ms per 64 x 64 matmul under load instead of 0.3 ms)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=VARIANTS)
def fam(request):
    model, proc = build(request.param)
    return SimpleNamespace(name=request.param, model=model, engine=Engine(model, proc), cache={})


@pytest.fixture(scope="module")
def random_scorer(tmp_path_factory):
    """An untrained scorer for the tiny models' hidden size (the shipped ones are for 192)."""
    from gripbench.grip.method import save_scorer
    from gripbench.grip.scorer import BudgetAwareScorer

    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("scorer") / "scorer64.safetensors")
    save_scorer(BudgetAwareScorer(64), path)
    return path


def _batch(fam, n: int, start: int = 0) -> dict:
    return fam.engine.prepare(images()[start:start + n], questions()[start:start + n])


def _method(name: str, budget: float, scorer: str):
    return create_method(name, budget=budget, **({"scorer": scorer} if name in SCORER_METHODS else {}))


def _visual(fam, batch) -> list[int]:
    return (batch["input_ids"] == fam.model.config.image_token_id).sum(1).tolist()


# ---- layouts -------------------------------------------------------------------------------------
def test_layout_and_arch(fam):
    """Token counts come from the tower itself: SigLIP has no [CLS] (16 tokens, not 17), the
    projector takes every concatenated feature layer, Pixtral gives each image its own grid."""
    from gripbench.adapters.pixtral import PixtralAdapter

    adapter, cfg = fam.engine.adapter, fam.model.config
    arch = adapter.llm_arch()
    batch = _batch(fam, 3)
    counts = _visual(fam, batch)
    vision = fam.engine.vision(batch)
    assert [vo.layout.size for vo in vision] == [vo.features.shape[1] for vo in vision] == counts
    assert arch.projector_width == fam.model.model.multi_modal_projector.linear_1.in_features
    if fam.name == "llava-pixtral":
        assert isinstance(adapter, PixtralAdapter)
        assert [vo.layout.grids for vo in vision] == [((8, 8),), ((4, 8),), ((7, 5),)]
        assert counts == [64, 32, 35] and not arch.vision_cls
        return
    assert type(adapter).__name__ == "LlavaAdapter"
    cls = cfg.vision_config.model_type == "clip_vision_model"
    assert arch.vision_cls == adapter.has_cls == cls
    expected = 16 + int(cls) - int(cfg.vision_feature_select_strategy == "default")
    assert counts == [expected] * 3 and adapter.info().num_visual_tokens == arch.tokens_per_image == expected


# ---- none = stock -------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 3])
def test_none_logits_match_stock_forward(fam, n):
    batch = _batch(fam, n)
    with torch.no_grad():
        ref = fam.model(**batch).logits
    out, mask = fam.engine.logits(batch, None)
    assert out.shape == ref.shape and torch.equal(mask, batch["attention_mask"].bool())
    diff = (ref - out)[batch["attention_mask"].bool()].abs().max().item()
    assert diff <= 1e-4, diff


@pytest.mark.parametrize("n", [1, 3])
def test_greedy_matches_stock_generate(fam, n):
    batch = _batch(fam, n)
    with torch.no_grad():
        ref = fam.model.generate(**batch, max_new_tokens=6, do_sample=False)[:, batch["input_ids"].shape[1]:]
    got = fam.engine.generate(batch, None, max_new_tokens=6).tokens
    assert got.shape == ref.shape and torch.equal(got, ref)


def test_rows_with_two_images(fam):
    """A row may hold several images (the placeholders filled in order, as the stock model fills
    them): a two-image row next to a one-image row equals the stock forward, and `row_batch`
    gives each row its own images."""
    proc = fam.engine.processor
    ims = images()
    convs = [[{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": questions()[0]}]}],
             [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": questions()[1]}]}]]
    texts = [proc.apply_chat_template(c, add_generation_prompt=True) for c in convs]
    batch = dict(proc(text=texts, images=[[ims[0], ims[1]], [ims[2]]], padding=True, return_tensors="pt",
                      padding_side="left"))
    with torch.no_grad():
        ref = fam.model(**batch).logits
    out, _ = fam.engine.logits(batch, None)
    assert (ref - out)[batch["attention_mask"].bool()].abs().max() <= 1e-4
    vision = fam.engine.vision(batch)
    assert [int(vo.layout.image.max()) + 1 for vo in vision] == [2, 1]
    assert [vo.layout.size for vo in vision] == _visual(fam, batch)
    assert fam.engine.adapter.row_batch(batch, 0)["pixel_values"].shape[0] == 2
    one = fam.engine.adapter.row_batch(batch, 1)
    with torch.no_grad():
        alone = fam.model(**one).logits
    assert (alone[0] - ref[1, batch["attention_mask"][1].bool()]).abs().max() <= 1e-4
    gen = fam.engine.generate(batch, create_method("attention-score", budget=0.25), max_new_tokens=2)
    assert [len(k) for k in gen.kept_indices] == [keep_count(0.25, n) for n in _visual(fam, batch)]


@pytest.mark.parametrize("kind", ["mistral", "qwen2"])
def test_sliding_window_matches_stock(kind):
    """A sliding window shorter than the prompt (Mistral: every layer; Qwen2: its
    `sliding_attention` layers only) is applied as the stock mask applies it, prefill and decode."""
    from transformers import CLIPVisionConfig

    from gripbench.testing.families import llava as fams

    extra = {"sliding_window": 12} if kind == "mistral" else {"sliding_window": 12, "use_sliding_window": True,
                                                               "max_window_layers": 2}
    model, proc = fams._llava(CLIPVisionConfig(**fams.CLIP), kind, -2, "default", seed=107, **extra)
    engine = Engine(model, proc)
    batch = engine.prepare(images()[:2], questions()[1:3])
    assert batch["input_ids"].shape[1] > 24
    with torch.no_grad():
        ref = model(**batch).logits
        tokens = model.generate(**batch, max_new_tokens=6, do_sample=False)[:, batch["input_ids"].shape[1]:]
    out, _ = engine.logits(batch, None)
    assert (ref - out)[batch["attention_mask"].bool()].abs().max() <= 1e-4
    assert torch.equal(engine.generate(batch, None, max_new_tokens=6).tokens, tokens)


# ---- every method ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", METHODS)
def test_method_at_full_budget_is_none(fam, name, random_scorer):
    batch = _batch(fam, 2, start=1)
    if "none" not in fam.cache:
        fam.cache["none"] = fam.engine.logits(batch, None)
    ref, ref_mask = fam.cache["none"]
    out, mask = fam.engine.logits(batch, _method(name, 1.0, random_scorer))
    assert out.shape == ref.shape and torch.equal(mask, ref_mask)
    assert (out - ref)[mask].abs().max() <= 1e-4


@pytest.mark.parametrize("name", METHODS)
def test_method_runs_at_quarter_budget(fam, name, random_scorer):
    batch = _batch(fam, 2, start=1)
    full = _visual(fam, batch)
    gen = fam.engine.generate(batch, _method(name, 0.25, random_scorer), max_new_tokens=2)
    assert gen.tokens.shape[0] == 2
    for r in range(2):
        assert gen.visual_per_layer[r][0] <= full[r] and gen.visual_per_layer[r][-1] <= full[r]
        assert len(set(gen.kept_indices[r])) == len(gen.kept_indices[r]) <= full[r]
        if name != "none":  # every method drops something somewhere at rho = 0.25
            assert min(gen.visual_per_layer[r]) < full[r]


# ---- attention signals = eager ----------------------------------------------------------------------
def _eager(model):
    """Context: the model's attention implementation set to eager, restored after."""
    class _Eager:
        def __enter__(self):
            self.before = {"vision_config": model.config.vision_config._attn_implementation,
                           "text_config": model.config.text_config._attn_implementation}
            model.set_attn_implementation({"vision_config": "eager", "text_config": "eager"})

        def __exit__(self, *exc):
            model.set_attn_implementation(self.before)
    return _Eager()


def test_llm_attention_equals_eager(fam):
    """The rows `ctx.attention` gives (from the layer's q/k after RoPE; Phi-3: split from the fused
    qkv_proj) equal the stock layer's eager attention weights."""
    model, engine = fam.model, fam.engine
    batch = _batch(fam, 2)
    with _eager(model), torch.no_grad():
        out = model(**batch, output_attentions=True)
    captured = {}

    class Probe(PruningMethod):
        def plan(self, info):
            return [PrunePoint(2, info.num_visual_tokens)]

        def select(self, ctx, point):
            t = ctx.key_mask.shape[1]
            queries = torch.tensor([[t - 1, t - 3, t - 9]] * ctx.batch_size)
            captured.setdefault("now", []).append(ctx.attention(queries))
            captured.setdefault("prev", []).append(ctx.attention(queries, layer=1))
            return Selection(ctx.visual_ids)

    engine.generate(batch, Probe(), max_new_tokens=1)
    t = batch["input_ids"].shape[1]
    for layer, key in ((2, "now"), (1, "prev")):
        ref = out.attentions[layer][:, :, [t - 1, t - 3, t - 9]]
        got = torch.cat(captured[key])  # Pixtral: rows of different sizes are separate groups, in row order
        assert got.shape == ref.shape
        assert (got - ref).abs().max() <= 1e-5


def test_vision_attention_equals_eager(fam):
    """The vision signal at the feature layer equals the tower's eager attention weights: the [CLS]
    row (CLIP), else the mean attention each token receives (SigLIP; Pixtral within its image,
    from the stock batched tower with its block-diagonal mask)."""
    model, adapter = fam.model, fam.engine.adapter
    batch = _batch(fam, 3)
    tower = model.model.vision_tower
    with _eager(model), torch.no_grad():
        kw = {"image_sizes": batch["image_sizes"]} if "image_sizes" in batch else {}
        att = tower(batch["pixel_values"], output_attentions=True, **kw).attentions[adapter.attn_layer - 1]
    vision = fam.engine.vision(batch)
    start = 0
    for r, vo in enumerate(vision):
        row, keys = adapter.vision_attention(vo)
        n = vo.layout.size
        assert row.shape[-1] == keys.shape[1] == n
        if fam.name == "llava-pixtral":  # one flattened sequence: row r's image is a diagonal block
            ref = att[0, :, start:start + n, start:start + n].mean(dim=1)
            start += n
        elif adapter.has_cls:
            ref = att[r, :, 0]
        else:
            ref = att[r].mean(dim=1)
        if adapter.strategy == "default":
            ref = ref[:, 1:]
        assert (row[0] - ref).abs().max() <= 1e-5


# ---- FLOPs -----------------------------------------------------------------------------------------
def test_vision_flops_match_counted(fam):
    """adapter.vision_flops of a row = the counted vision call for that row alone, and the rows of a
    batch add up to the counted batch call (towers, projector; Pixtral per image)."""
    adapter = fam.engine.adapter
    for i in range(3):
        batch = _batch(fam, 1, start=i)
        with flop_counter() as fc:
            vo = fam.engine.vision(batch)[0]
        measured = fc.get_total_flops()
        assert abs(adapter.vision_flops(vo) - measured) / measured < 0.02, (adapter.vision_flops(vo), measured)
    batch = _batch(fam, 3)
    with flop_counter() as fc:
        rows = fam.engine.vision(batch)
    total = sum(adapter.vision_flops(vo) for vo in rows)
    assert abs(total - fc.get_total_flops()) / fc.get_total_flops() < 0.02


class KeepEven(PruningMethod):
    """test method: keep the even visual tokens before the LLM"""

    def plan(self, info):
        return [PrunePoint(0, (info.num_visual_tokens + 1) // 2)]

    def select(self, ctx, point):
        return Selection(ctx.visual_ids[:, ::2])


@pytest.mark.parametrize("method", [None, "even", "fastv"])
def test_prefill_flops_match_counted(fam, method):
    engine = fam.engine
    batch = _batch(fam, 1, start=2)
    vision = engine.vision(batch)
    m = {None: None, "even": KeepEven(budget=0.5), "fastv": create_method("fastv", budget=0.25)}[method]
    with flop_counter() as fc, torch.no_grad():
        _, _, st, per_layer = engine.prefill(batch, m, vision)
        engine.adapter.logits(st.hidden[:, -1:])
    text = batch["input_ids"].shape[1] - _visual(fam, batch)[0]
    arch = engine.adapter.llm_arch()
    analytic = 2 * prefill_macs(arch, [text + v for v in per_layer[0]])
    if m is not None:  # the method's own work (FastV's attention rows), as the sweep charges it
        analytic += m.selection_flops(engine.adapter.group_info(vision[0].layout), text, arch)
    measured = fc.get_total_flops()
    assert abs(analytic - measured) / measured < 0.02, (analytic, measured)


# ---- Pixtral: ragged batches -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["random", "fastv"])
def test_pixtral_ragged_pruned_batch_equals_rows_alone(name):
    model, proc = build("llava-pixtral")
    engine = Engine(model, proc)
    batch = engine.prepare(images()[:3], questions()[:3])
    assert len(set(_visual(SimpleNamespace(model=model), batch))) == 3  # three different token counts
    gen = engine.generate(batch, create_method(name, budget=0.25), max_new_tokens=6)
    for r in range(3):
        one = engine.prepare(images()[r:r + 1], questions()[r:r + 1])
        row = engine.adapter.row_batch(batch, r)  # what the processor gives for the row alone
        assert row.keys() == one.keys() and all(torch.equal(row[k], one[k]) for k in one)
        alone = engine.generate(one, create_method(name, budget=0.25), max_new_tokens=6)
        assert gen.kept_indices[r] == alone.kept_indices[0]
        assert gen.visual_per_layer[r] == alone.visual_per_layer[0]
        length = alone.tokens.shape[1]
        assert torch.equal(gen.tokens[r, :length], alone.tokens[0])
        assert (gen.tokens[r, length:] == engine.pad_id).all()
