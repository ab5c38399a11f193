"""Task suite: determinism, split disjointness, evidence correctness, balance."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from gripbench.tasks.suite import (
    SPLIT_SIZES,
    TASKS,
    is_held_out,
    load_split,
    majority_baseline,
    make_sample,
    prior_baseline,
    question_template,
)


@pytest.mark.parametrize("task", list(TASKS))
def test_generator_is_deterministic(task):
    a, b = make_sample(task, "test", 7), make_sample(task, "test", 7)
    assert (a.question, a.answer, a.evidence) == (b.question, b.answer, b.evidence)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    c = make_sample(task, "test", 8)
    assert (c.question, c.evidence) != (a.question, a.evidence) or not np.array_equal(np.asarray(a.image), np.asarray(c.image))


def test_images_give_at_least_144_visual_tokens():
    s = make_sample("attribute", "test", 0)
    assert s.image.size == (96, 96)
    assert s.scene.config.num_patches >= 144


def test_splits_are_disjoint():
    held = {make_sample(t, sp, i).scene.fingerprint() for t in TASKS for sp in ("test", "val") for i in range(SPLIT_SIZES[sp])}
    assert len(held) > 0.99 * sum(SPLIT_SIZES.values()) * len(TASKS)  # scenes are (nearly) all distinct
    train = [make_sample(t, "train", i) for t in TASKS for i in range(300)]
    assert not any(s.scene.fingerprint() in held for s in train)
    assert all(is_held_out(make_sample("text", "test", i).scene.fingerprint()) for i in range(5))


@pytest.mark.parametrize("task", list(TASKS))
def test_evidence_covers_the_referenced_items(task):
    """Pixel check: every evidence patch holds item pixels, and the items' pixels lie in evidence patches."""
    for i in range(40):
        s = make_sample(task, "test", i)
        cfg = s.scene.config
        g, p = cfg.grid, cfg.patch_size
        assert s.evidence, "every question has evidence"
        covered = np.zeros((cfg.image_size, cfg.image_size), bool)
        for idx in s.evidence:
            r, c = divmod(idx, g)
            covered[r * p:(r + 1) * p, c * p:(c + 1) * p] = True
        referenced = [it for it in s.scene.items if set(s.scene.patches_of(it)) <= set(s.evidence)]
        assert referenced and set(s.evidence) == set(s.scene.evidence(referenced))
        union = np.zeros_like(covered)
        for it in referenced:
            union |= s.scene.mask(it)
        per_patch = union.reshape(g, p, g, p).sum(axis=(1, 3)).reshape(-1)
        assert all(per_patch[idx] >= cfg.min_patch_pixels for idx in s.evidence)
        assert (union & covered).sum() >= 0.9 * union.sum()


def test_evidence_pixels_show_the_answer_colour():
    """The attribute task's colour answers are really drawn at the evidence patches."""
    from gripbench.tasks.scenes import COLORS

    for i in range(30):
        s = make_sample("attribute", "test", i)
        if s.meta["asks"] != "color":
            continue
        img = np.asarray(s.image).astype(int)
        target = [it for it in s.scene.shapes if it.color == s.answer][0]
        m = s.scene.mask(target)
        assert np.abs(img[m] - np.array(COLORS[s.answer])).sum(-1).mean() < 5


def test_test_split_sizes_and_balance():
    for task in TASKS:
        assert SPLIT_SIZES["test"] >= 500
        split = load_split(task, "test", 500)
        counts = collections.Counter(s.answer for s in split)
        assert majority_baseline(split) <= 0.55, (task, counts.most_common(3))
        assert majority_baseline(split) <= prior_baseline(split) <= 0.56  # the question alone never gives the answer away
    ex = load_split("existence", "test", 500)
    assert 0.4 < sum(s.answer == "yes" for s in ex) / len(ex) < 0.6
    kinds = collections.Counter(s.meta["negative"] for s in ex if s.answer == "no")
    assert set(kinds) == {"random", "popular", "adversarial"}
    counts = collections.Counter(s.answer for s in load_split("counting", "test", 500))
    assert set(counts) == {"1", "2", "3", "4"} and min(counts.values()) > 80


def test_prior_baseline_reads_the_question_not_the_image():
    assert question_template("where is the red circle horizontally?") == "where is the _ _ horizontally?"
    sp = load_split("spatial", "test", 500)
    # the question names the axis, so a blind model picks between two of the four balanced answers
    assert 0.2 < majority_baseline(sp) < 0.32 and 0.45 < prior_baseline(sp) < 0.56
