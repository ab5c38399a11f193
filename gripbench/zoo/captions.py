"""Scene captions: the text side of the embedded models' pretraining.

Real VLMs are built from parts pretrained on image-text pairs (CLIP's captions) and on
text (the LLM), then aligned on captions (LLaVA's stage 1) before instruction tuning.
The embedded models follow the same recipe at toy scale, so they need captions: a
plain-language description of a scene, listing every item with its colour, its shape or
the character on its sign, and the image quarter it lies in, in reading order (top to
bottom, left to right), after a count of the objects.

A caption says nothing about the questions' wording or their evidence patches: it is the
alt-text of the image, not a hint about any task.
"""

from __future__ import annotations

import numpy as np

from gripbench.tasks.scenes import Item, Scene

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CAPTION_WORDS = ("a", "an", "the", "image", "shows", "object", "objects", "sign", "with", "letter", "digit", "in",
                 "at", "top", "bottom", "left", "right", "and", ".", ",", *NUMBER_WORDS)


def where(item: Item, size: int) -> str:
    """The image quarter an item's centre lies in: 'top left', 'bottom right', ..."""
    cx, cy = item.center
    return f"{'top' if cy < size / 2 else 'bottom'} {'left' if cx < size / 2 else 'right'}"


def describe(item: Item) -> str:
    if item.kind == "sign":
        glyph = "digit" if item.char.isdigit() else "letter"
        return f"a {item.color} sign with the {glyph} {item.char.lower()}"
    article = "an" if item.color[0] in "aeiou" else "a"
    return f"{article} {item.color} {item.shape}"


def caption(scene: Scene, rng: np.random.Generator | None = None) -> str:
    """One caption of a scene. With `rng`, the items come in a random order (a different
    caption of the same image each time: the text side of augmentation); without, in
    reading order."""
    size = scene.config.image_size
    items = sorted(scene.items, key=lambda it: (it.center[1] // (size / 2), it.center[0]))
    if rng is not None:
        items = [items[i] for i in rng.permutation(len(items))]
    n = len(scene.items)
    head = f"the image shows {NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else n} object{'s' if n != 1 else ''}"
    parts = [f"{describe(it)} at the {where(it, size)}" for it in items]
    return head + " : " + " , ".join(parts) + " ."
