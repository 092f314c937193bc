"""Synthetic scenes for the toy LLaVA: images, questions with short answers, and captions.

A scene is 3 or 4 objects on a 4 x 4 grid of places. The 96 x 96 image is cut by the vision tower into
12 x 12 patches of 8 px (144 image tokens), so each place is 3 x 3 patches:

    place (row r, column c), 24 x 24 px       one object: its shape, drawn 3x (21 x 21 px) at a
    +------+------+------+                    seeded offset of 0-3 px inside the place, covers most
    |   ###|######|##    |                    of the place's 9 patches; its digit (if it has one),
    |  ####|##  ##|###   |                    a 3 x 5 font drawn 3x (9 x 15 px), sits in the middle
    +------+------+------+                    of the shape and shows in 2-5 patches (digit_patches).
    | #####|# 5 ##|####  |
    ...

So every fact is visible in several image tokens, as in a real photograph, where an object covers
many patches: losing some of them leaves the others to read it from. That redundancy is what the
toy of an earlier commit lacked (each fact in one patch: every eviction policy broke its captions;
tutorial/04 reports both). Shapes and digits are drawn from bitmaps (not PIL's rasteriser), so an
image is the same on every Pillow version; colours carry a little seeded jitter.

A fine scene (`random_scene(rng, fine=True)`, the FlexAttention toy's: tutorial/07) is the same scene
drawn FINE_SCALE x larger (384 x 384 px: a place is 96 px, one crop of the tower's size), its digit drawn
relatively small: 3 px a font cell, 9 x 15 px, the size a plain scene draws it at 96 px. Brought down to
the 96 px the sequence sees, the digit is 2.25 x 3.75 px, three quarters of a pixel a stroke: a blur in
one or two patches. Only a high-resolution view of the image (4 x 4 crops of 96 px, tinyavl/hires.py)
reads it.

Each scene answers five question types (`QUESTION_TYPES`) and a caption that lists every object with
its colour, place and digit, 26-43 tokens long (of the toy's tokenizer, before `</s>`). Rows and columns
are numbered 1-4 from the top left.
Everything is deterministic for a seed (`SceneStream`).
"""
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image

IMAGE_SIZE = 96   # px
PATCH = 8         # px: the vision tower's patch size
GRID = 4          # places per side
PLACE = IMAGE_SIZE // GRID  # 24 px = 3 x 3 patches
CELL_PX = 3       # every bitmap cell is drawn as CELL_PX x CELL_PX pixels

COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 235), "yellow": (235, 215, 40)}
DIGIT_COLOUR = (235, 235, 235)
COLOUR_JITTER = 20  # each channel moves by up to +-20, so no two reds are exactly alike

# 7 x 7 bitmaps: 21 x 21 px once drawn, which leaves 3 px of a place's 24 for the seeded offset.
SHAPES = {
    "circle": ("..###..", ".#####.", "#######", "#######", "#######", ".#####.", "..###.."),
    "square": ("#######", "#######", "#######", "#######", "#######", "#######", "#######"),
    "triangle": ("...#...", "..###..", "..###..", ".#####.", ".#####.", "#######", "#######"),
    "cross": ("..###..", "..###..", "#######", "#######", "#######", "..###..", "..###.."),
    "diamond": ("...#...", "..###..", ".#####.", "#######", ".#####.", "..###..", "...#..."),
}
# A 3 x 5 pixel font: 9 x 15 px once drawn, in the middle of the shape: the finest detail in a scene.
DIGITS = {
    0: ("###", "#.#", "#.#", "#.#", "###"), 1: (".#.", "##.", ".#.", ".#.", "###"),
    2: ("###", "..#", "###", "#..", "###"), 3: ("###", "..#", ".##", "..#", "###"),
    4: ("#.#", "#.#", "###", "..#", "..#"), 5: ("###", "#..", "###", "..#", "###"),
    6: ("###", "#..", "###", "#.#", "###"), 7: ("###", "..#", ".#.", ".#.", ".#."),
    8: ("###", "#.#", "###", "#.#", "###"), 9: ("###", "#.#", "###", "..#", "###"),
}
SHAPE_SIDE = 7 * CELL_PX                         # 21 px
MAX_OFFSET = PLACE - SHAPE_SIDE                  # 3 px: how far a shape can sit from its place's corner
DIGIT_OFFSET = ((SHAPE_SIDE - 3 * CELL_PX) // 2, (SHAPE_SIDE - 5 * CELL_PX) // 2)  # (6, 3) px inside the shape
MIN_PATCH_PIXELS = 8  # a patch shows an object (or its digit) when at least this many of its 64 px do
FINE_SCALE = 4        # a fine scene is drawn this many times larger: 384 px, 4 x 4 crops of the tower's 96
FINE_DIGIT_CELL = 3   # px per font cell of a fine scene's digit: 9 x 15 px at 384 px (3/4 px a cell at 96)
FINE_DIGIT_OFFSET = ((SHAPE_SIDE * FINE_SCALE - 3 * FINE_DIGIT_CELL) // 2,
                     (SHAPE_SIDE * FINE_SCALE - 5 * FINE_DIGIT_CELL) // 2)  # (37, 34) px inside the 84 px shape

QUESTION_TYPES = ("colour", "shape", "count", "digit", "where")
CAPTION_QUESTION = "Describe the image."
PROMPT_KINDS = QUESTION_TYPES + ("caption",)  # everything a scene can be asked (`Scene.ask`)


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    row: int             # 1..GRID, from the top
    column: int          # 1..GRID, from the left
    digit: int | None    # the digit drawn on the shape, if any
    rgb: tuple[int, int, int]  # the jittered colour actually drawn
    offset: tuple[int, int] = (0, 0)  # (x, y) px of the shape inside its place, 0..MAX_OFFSET

    @property
    def place(self) -> str:
        return f"row {self.row} column {self.column}"

    def shape_mask(self, scale: int = 1) -> np.ndarray:
        """(scale IMAGE_SIZE, scale IMAGE_SIZE) bool: the pixels the shape covers (the digit's included) in
        the image drawn scale x larger."""
        x = ((self.column - 1) * PLACE + self.offset[0]) * scale
        y = ((self.row - 1) * PLACE + self.offset[1]) * scale
        return _mask(SHAPES[self.shape], x, y, CELL_PX * scale, IMAGE_SIZE * scale)

    def digit_mask(self, fine: bool = False) -> np.ndarray:
        """The digit's pixels (all False without a digit): (IMAGE_SIZE, IMAGE_SIZE) bool, or with fine the
        small digit of a fine scene, (FINE_SCALE IMAGE_SIZE, ...) bool, in the middle of the shape."""
        scale, cell, inside = (FINE_SCALE, FINE_DIGIT_CELL, FINE_DIGIT_OFFSET) if fine else (1, CELL_PX, DIGIT_OFFSET)
        if self.digit is None:
            return np.zeros((IMAGE_SIZE * scale, IMAGE_SIZE * scale), dtype=bool)
        x = ((self.column - 1) * PLACE + self.offset[0]) * scale + inside[0]
        y = ((self.row - 1) * PLACE + self.offset[1]) * scale + inside[1]
        return _mask(DIGITS[self.digit], x, y, cell, IMAGE_SIZE * scale)

    def patches(self, scale: int = 1) -> list[int]:
        """Indices of the image tokens that show the shape (patches in reading order, 12 per row), or with
        scale those of the image drawn scale x larger (12 scale per row: a high-resolution map)."""
        return _patches_showing(self.shape_mask(scale))

    def digit_patches(self, fine: bool = False) -> list[int]:
        """Indices of the image tokens that show the digit (none without one); with fine, the tokens of the
        fine scene's high-resolution map (FINE_SCALE x 12 per row) that show its small digit."""
        return _patches_showing(self.digit_mask(fine))

    def place_patches(self) -> list[int]:
        """Indices of every image token of the object's place (3 x 3 patches): every pixel of the object
        and its digit, and nothing of any other object."""
        side, per_place = IMAGE_SIZE // PATCH, PLACE // PATCH
        top, left = (self.row - 1) * per_place, (self.column - 1) * per_place
        return [(top + r) * side + left + c for r in range(per_place) for c in range(per_place)]

    def describe(self) -> str:
        text = f"{self.colour} {self.shape} at {self.place}"
        return text if self.digit is None else f"{text} with digit {self.digit}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]  # in reading order (row, then column)
    fine: bool = False  # drawn FINE_SCALE x larger, with small digits (the module docstring)

    def image(self) -> Image.Image:
        """The picture: IMAGE_SIZE px a side, or FINE_SCALE x that for a fine scene."""
        scale = FINE_SCALE if self.fine else 1
        pixels = np.zeros((IMAGE_SIZE * scale, IMAGE_SIZE * scale, 3), dtype=np.uint8)  # (H, W, RGB), black
        for obj in self.objects:
            pixels[obj.shape_mask(scale)] = obj.rgb
            pixels[obj.digit_mask(self.fine)] = DIGIT_COLOUR
        return Image.fromarray(pixels, "RGB")

    def caption(self) -> str:
        return " and ".join(obj.describe() for obj in self.objects)

    def ask(self, kind: str, rng: random.Random) -> tuple[str, str]:
        """A (prompt, answer) pair of any of PROMPT_KINDS: a question, or the caption request and the caption."""
        return (CAPTION_QUESTION, self.caption()) if kind == "caption" else self.question(kind, rng)

    def question(self, kind: str, rng: random.Random) -> tuple[str, str]:
        """A (question, answer) pair of one of QUESTION_TYPES about a randomly chosen object or colour."""
        # Drawn for every kind, also those that choose otherwise ("count", "digit"): removing the draw would
        # shift every seeded stream after it, and so every committed toy's data.
        obj = rng.choice(self.objects)
        if kind == "colour":
            return f"What colour is the {obj.shape}?", obj.colour
        if kind == "shape":
            return f"What shape is at {obj.place}?", obj.shape
        if kind == "count":
            colour = rng.choice(list(COLOURS))
            count = sum(o.colour == colour for o in self.objects)
            return f"How many {colour} shapes are there?", str(count)
        if kind == "digit":
            obj = rng.choice([o for o in self.objects if o.digit is not None])
            return f"What digit is at {obj.place}?", str(obj.digit)
        if kind == "where":
            # The answer names the shape before its place, as the caption does ("circle at row 2 column 3"),
            # so the place is read right after the name it belongs to.
            return f"Where is the {obj.shape}?", f"{obj.shape} at {obj.place}"
        raise ValueError(f"unknown question type {kind!r} (known: {QUESTION_TYPES})")


def random_scene(rng: random.Random, fine: bool = False) -> Scene:
    """3 or 4 objects of different shapes on different places; at least one carries a digit. fine: a fine
    scene, drawn larger with small digits (the same objects for the same draws)."""
    n = rng.choice((3, 4))
    shapes = rng.sample(list(SHAPES), n)  # distinct, so "the circle" names one object
    places = sorted(rng.sample(range(GRID * GRID), n))
    with_digit = [rng.random() < 0.5 for _ in range(n)]
    with_digit[rng.randrange(n)] = True
    objects = []
    for shape, place, has_digit in zip(shapes, places, with_digit):
        colour = rng.choice(list(COLOURS))
        rgb = tuple(min(255, max(0, v + rng.randint(-COLOUR_JITTER, COLOUR_JITTER))) for v in COLOURS[colour])
        digit = rng.randrange(10) if has_digit else None
        offset = (rng.randint(0, MAX_OFFSET), rng.randint(0, MAX_OFFSET))
        objects.append(SceneObject(shape, colour, place // GRID + 1, place % GRID + 1, digit, rgb, offset))
    return Scene(tuple(objects), fine)


class SceneStream:
    """An endless, deterministic stream of (scene, rng) for a split and a seed. The splits in use: "vocab"
    (the words the tokenizer holds), "train" and "tune" (the toy's two stages), "vision" (the tower trained
    apart), "hires" (the FlexAttention toy), "example" (the committed example images) and "eval" (held out).

    The split is part of the seed, so streams of different splits never meet: no evaluation seed ever
    replays a training stream. With fine, the stream's scenes are fine scenes: the same objects and
    questions as without, drawn small-digited. `rng` draws every scene, and the questions a training asks
    about it (the rng handed out with it): its state (`rng.getstate()`) is where the stream is, which a
    resumed training sets back (`Checkpoint`)."""

    def __init__(self, split: str, seed: int, fine: bool = False):
        self.rng = random.Random(f"{split}-{seed}")
        self.fine = fine

    def __iter__(self):
        return self

    def __next__(self) -> tuple[Scene, random.Random]:
        return random_scene(self.rng, self.fine), self.rng


def caption_parts(text: str) -> list[str]:
    """A caption -> the object descriptions it names, in its order, a repeated one as often as it is named."""
    return [part.strip() for part in text.split(" and ") if part.strip()]


def parse_caption(text: str) -> set[str]:
    """A caption -> the set of object descriptions it names (for scoring against Scene.objects)."""
    return set(caption_parts(text))


def _mask(rows: tuple[str, ...], x: int, y: int, cell: int, size: int) -> np.ndarray:
    """A bitmap drawn `cell` px a cell at pixel (x, y) of an empty size x size image: (size, size) bool."""
    cells = np.array([[mark == "#" for mark in line] for line in rows])             # (rows, columns)
    big = np.kron(cells, np.ones((cell, cell), dtype=bool))                          # (cell * rows, cell * columns)
    mask = np.zeros((size, size), dtype=bool)
    mask[y:y + big.shape[0], x:x + big.shape[1]] = big
    return mask


def _patches_showing(mask: np.ndarray) -> list[int]:
    """Patches of PATCH px (reading order) holding at least MIN_PATCH_PIXELS of the mask's pixels."""
    side = mask.shape[0] // PATCH
    per_patch = mask.reshape(side, PATCH, side, PATCH).sum(axis=(1, 3)).flatten()   # (side * side,)
    return [int(i) for i in np.flatnonzero(per_patch >= MIN_PATCH_PIXELS)]
