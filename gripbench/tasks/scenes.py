"""Procedural scenes: coloured shapes and lettered signs on a cluttered background.

Why procedural: no dataset hub is reachable, and a generator lets every question carry
its ground-truth *evidence* (the visual-token patches that hold the objects the answer
depends on), which real benchmarks do not give. Every scene is a pure function of a
seed, so the same seed gives the same pixels on every machine with the same Pillow.

The background is cluttered on purpose (a texture, pixel noise, thin lines in object
colours, specks) so that most patches are busy but irrelevant: which tokens matter
depends on the question, not on "where is something non-grey".
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (235, 205, 30),
    "purple": (150, 60, 190),
    "orange": (245, 135, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
# Characters that stay distinct at ~10 px (no O/0, I/1, S/5, Z/2 pairs).
CHARS: str = "0123456789ACEFHKMPRTUXY"
SIZES: dict[str, int] = {"small": 10, "large": 14}
SIGN_SIZE = 14
CELL_PATCHES = 2  # every item is centred in a 2 x 2-patch cell whose corner lies on the patch grid


@dataclass(frozen=True)
class SceneConfig:
    """Geometry of the rendered image and of the visual-token grid."""

    image_size: int = 96
    patch_size: int = 8
    min_patch_pixels: int = 4  # a patch is evidence for an object if it holds this many of its pixels

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid


@dataclass(frozen=True)
class Item:
    """One thing in a scene: a shape (kind='shape') or a sign with a character (kind='sign')."""

    kind: str
    color: str
    x: int
    y: int
    size: int
    shape: str = ""
    char: str = ""

    @property
    def center(self) -> tuple[float, float]:
        return (self.x + self.size / 2, self.y + self.size / 2)

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}" if self.kind == "shape" else f"{self.color} sign"


@dataclass
class Scene:
    """A rendered scene: its items, background parameters and the seed that made it."""

    items: list[Item]
    seed: int
    config: SceneConfig = field(default_factory=SceneConfig)
    clutter: float = 1.0  # background clutter scale: 1 for every split; < 1 only in the training curriculum

    @property
    def shapes(self) -> list[Item]:
        return [it for it in self.items if it.kind == "shape"]

    @property
    def signs(self) -> list[Item]:
        return [it for it in self.items if it.kind == "sign"]

    def fingerprint(self) -> str:
        """Identity of the scene's content, used to keep test scenes out of training."""
        text = ";".join(f"{i.kind},{i.color},{i.shape},{i.char},{i.x},{i.y},{i.size}" for i in self.items)
        return hashlib.sha1(text.encode()).hexdigest()[:16]

    def render(self) -> Image.Image:
        rng = np.random.default_rng(self.seed ^ 0x5EED)
        img = _background(rng, self.config.image_size, self.clutter)
        draw = ImageDraw.Draw(img)
        for it in self.items:
            _draw_item(draw, it, fill=COLORS[it.color])
        return img

    def mask(self, item: Item) -> np.ndarray:
        """Boolean pixel mask of one item, drawn exactly as in `render`."""
        m = Image.new("L", (self.config.image_size,) * 2, 0)
        _draw_item(ImageDraw.Draw(m), item, fill=255, mask_only=True)
        return np.asarray(m) > 0

    def patches_of(self, item: Item) -> list[int]:
        """Row-major visual-token indices of the patches holding the item."""
        p, g = self.config.patch_size, self.config.grid
        counts = self.mask(item).reshape(g, p, g, p).sum(axis=(1, 3))
        return [int(i) for i in np.flatnonzero(counts.reshape(-1) >= self.config.min_patch_pixels)]

    def evidence(self, items: list[Item]) -> list[int]:
        return sorted({i for it in items for i in self.patches_of(it)})


def _background(rng: np.random.Generator, size: int, clutter: float = 1.0) -> Image.Image:
    """Texture + noise + distractor lines + specks, all scaled by `clutter`; never draws a
    filled shape or a glyph. The random draws do not depend on `clutter`."""
    base = rng.integers(95, 165, size=3)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle, freq = rng.uniform(0, math.pi), rng.uniform(0.15, 0.45)
    stripes = np.sin(freq * (xx * math.cos(angle) + yy * math.sin(angle)) + rng.uniform(0, 6.3))
    blotch = np.sin(xx / rng.uniform(9, 20) + rng.uniform(0, 6.3)) * np.cos(yy / rng.uniform(9, 20))
    tint = rng.uniform(-1, 1, size=3) * 18
    arr = base[None, None, :] + clutter * (stripes[..., None] * 14 + blotch[..., None] * tint[None, None, :])
    arr = arr + clutter * rng.normal(0, 9, size=arr.shape)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    palette = list(COLORS.values()) + [(30, 30, 30), (235, 235, 235)]
    lines = [(tuple(int(v) for v in rng.integers(0, size, 4)), int(rng.integers(len(palette))))
             for _ in range(int(rng.integers(3, 7)))]
    specks = [(tuple(int(v) for v in rng.integers(0, size - 2, 2)), int(rng.integers(len(palette))))
              for _ in range(int(rng.integers(10, 25)))]
    for box, c in lines[: round(clutter * len(lines))]:
        draw.line(box, fill=palette[c], width=1)
    for (x, y), c in specks[: round(clutter * len(specks))]:
        draw.rectangle((x, y, x + 1, y + 1), fill=palette[c])
    return img


@lru_cache(maxsize=4)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _draw_item(draw: ImageDraw.ImageDraw, it: Item, fill, mask_only: bool = False) -> None:
    x, y, s = it.x, it.y, it.size
    box = (x, y, x + s - 1, y + s - 1)
    if it.kind == "sign":
        draw.rectangle(box, fill=fill)
        if mask_only:
            return
        draw.rectangle((x + 2, y + 2, x + s - 3, y + s - 3), fill=(250, 250, 250))
        draw.text((x + s / 2, y + s / 2 + 0.5), it.char, fill=(10, 10, 10), font=_font(10), anchor="mm")
    elif it.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif it.shape == "square":
        draw.rectangle(box, fill=fill)
    elif it.shape == "triangle":
        draw.polygon([(x + (s - 1) / 2, y), (x, y + s - 1), (x + s - 1, y + s - 1)], fill=fill)
    elif it.shape == "diamond":
        h = (s - 1) / 2
        draw.polygon([(x + h, y), (x + s - 1, y + h), (x + h, y + s - 1), (x, y + h)], fill=fill)
    else:
        raise ValueError(f"unknown shape {it.shape!r}")


def place(rng: np.random.Generator, cfg: SceneConfig, taken: list[Item], size: int, tries: int = 200):
    """Top-left corner for a size x size item centred in a free cell of CELL_PATCHES x
    CELL_PATCHES patches whose corner lies on the patch grid, or None.

    Why on the grid: every item then covers the same 2 x 2 patches in the same way, as a
    detector-like tokeniser would see it, so a tower trained from scratch in minutes can
    recognise shapes and glyphs from its patches; cells never overlap, so items keep a
    clear gap. Positions still vary over 11 x 11 cell corners."""
    cell = CELL_PATCHES * cfg.patch_size
    slots = (cfg.image_size - cell) // cfg.patch_size + 1
    inset = (cell - size) // 2
    for _ in range(tries):
        cx, cy = (int(v) * cfg.patch_size for v in rng.integers(0, slots, 2))
        if all(abs(cx - (t.x - (cell - t.size) // 2)) >= cell or abs(cy - (t.y - (cell - t.size) // 2)) >= cell
               for t in taken):
            return cx + inset, cy + inset
    return None
