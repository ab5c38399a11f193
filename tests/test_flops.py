"""Analytic FLOPs equal a measured count (torch.utils.flop_counter) on the real model code."""

from __future__ import annotations

import pytest
import torch

from gripbench.engine import Engine
from gripbench.flops import Arch, flop_counter, prefill_macs, projector_macs, vision_macs
from gripbench.methods import PrunePoint, PruningMethod, Selection


class KeepEven(PruningMethod):
    """test method: keep the even visual tokens before the LLM"""

    def plan(self, info):
        return [PrunePoint(0, (info.num_visual_tokens + 1) // 2)]

    def select(self, ctx, point):
        return Selection(ctx.visual_ids[:, ::2])


@pytest.fixture(scope="module", params=["embedded", "tiny_hf"])
def engine(request):
    return Engine(*request.getfixturevalue(request.param))


def test_vision_and_projector(engine, samples):
    batch = engine.prepare([samples[0].image], [samples[0].question])
    arch = Arch.from_config(engine.model.config)
    with flop_counter() as fc:
        engine.vision(batch)
    assert fc.get_total_flops() == 2 * (vision_macs(arch) + projector_macs(arch, arch.num_patches))


@pytest.mark.parametrize("drop", [0, 1])
def test_prefill_with_tokens_present(engine, samples, drop):
    """Unpruned, and with half the visual tokens dropped before the LLM."""
    batch = engine.prepare([samples[1].image], [samples[1].question])
    arch = Arch.from_config(engine.model.config)
    vision = engine.vision(batch)
    method = KeepEven(budget=0.5) if drop else None
    with flop_counter() as fc, torch.no_grad():
        _, _, st, per_layer = engine.prefill(batch, method, vision)
        engine.adapter.logits(st.hidden[:, -1:])
    text = batch["input_ids"].shape[1] - engine.info.num_visual_tokens
    assert fc.get_total_flops() == 2 * prefill_macs(arch, [text + v for v in per_layer[0]])


@pytest.mark.parametrize("name", ["none", "visionzip", "fastv", "sparsevlm"])
def test_whole_generation_within_2_percent(embedded, samples, name):
    """Analytic FLOPs of a whole generation (vision, the method's own selection work, prefill with
    the tokens present at each layer, decode) vs a measured count of everything that ran."""
    from gripbench.flops import cell_flops
    from gripbench.methods import create_method

    engine = Engine(*embedded)
    arch = Arch.from_config(engine.model.config)
    method = create_method(name, budget=0.25)
    batch = engine.prepare([samples[2].image], [samples[2].question])
    with flop_counter() as fc:
        gen = engine.generate(batch, method, max_new_tokens=3)
    text = batch["input_ids"].shape[1] - engine.info.num_visual_tokens
    new = int((gen.tokens[0] != engine.pad_id).sum())
    analytic = cell_flops(arch, text, gen.visual_per_layer[0], new, method.selection_flops(engine.info, text, arch))
    measured = fc.get_total_flops()
    assert abs(analytic["flops_total"] - measured) / measured < 0.02, (analytic["flops_total"], measured)
