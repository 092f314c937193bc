"""Synthetic scenes for the toy LLaVA: images, questions with short answers, and captions.

A scene is 3 or 4 objects on a 4 x 4 grid of places. The 64 x 64 image is cut by the vision tower into
8 x 8 patches of 8 px, so each place is 2 x 2 patches:

    place (row r, column c), 16 x 16 px        one object: its shape fills the top-left patch,
    +--------+--------+                        and its digit (if it has one) sits in the patch to
    | shape  | digit  |                        its right, drawn from a 3 x 5 pixel font. The two
    +--------+--------+                        bottom patches stay black.
    |        |        |
    +--------+--------+

So every fact an answer needs sits in one or two of the 64 image tokens: visual attention has a reason
to be sparse, as it is in real LVLMs. Shapes and digits are drawn from bitmaps (not PIL's rasteriser),
so an image is the same on every Pillow version; colours carry a little seeded jitter.

Each scene answers five question types (`QUESTION_TYPES`) and a caption that lists every object with
its colour, place and digit, 20-40 tokens long. Rows and columns are numbered 1-4 from the top left.
Everything is deterministic for a seed (`scene_stream`).
"""
import random
from dataclasses import dataclass

from PIL import Image

IMAGE_SIZE = 64   # px
PATCH = 8         # px: the vision tower's patch size
GRID = 4          # places per side
PLACE = IMAGE_SIZE // GRID  # 16 px = 2 x 2 patches

COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 235), "yellow": (235, 215, 40)}
DIGIT_COLOUR = (235, 235, 235)
COLOUR_JITTER = 20  # each channel moves by up to +-20, so no two reds are exactly alike

# 7 x 7 bitmaps, drawn at offset (1, 1) inside the shape's 8 x 8 patch.
SHAPES = {
    "circle": ("..###..", ".#####.", "#######", "#######", "#######", ".#####.", "..###.."),
    "square": ("#######", "#######", "#######", "#######", "#######", "#######", "#######"),
    "triangle": ("...#...", "..###..", "..###..", ".#####.", ".#####.", "#######", "#######"),
    "cross": ("..###..", "..###..", "#######", "#######", "#######", "..###..", "..###.."),
    "diamond": ("...#...", "..###..", ".#####.", "#######", ".#####.", "..###..", "...#..."),
}
# A 3 x 5 pixel font, drawn at offset (2, 1) inside the digit's patch: the finest detail in a scene.
DIGITS = {
    0: ("###", "#.#", "#.#", "#.#", "###"), 1: (".#.", "##.", ".#.", ".#.", "###"),
    2: ("###", "..#", "###", "#..", "###"), 3: ("###", "..#", ".##", "..#", "###"),
    4: ("#.#", "#.#", "###", "..#", "..#"), 5: ("###", "#..", "###", "..#", "###"),
    6: ("###", "#..", "###", "#.#", "###"), 7: ("###", "..#", ".#.", ".#.", ".#."),
    8: ("###", "#.#", "###", "#.#", "###"), 9: ("###", "#.#", "###", "..#", "###"),
}
SHAPE_OFFSET = (1, 1)  # (x, y) of a shape bitmap inside its patch
DIGIT_OFFSET = (2, 1)

QUESTION_TYPES = ("colour", "shape", "count", "digit", "where")
CAPTION_QUESTION = "Describe the image."
PROMPT_KINDS = QUESTION_TYPES + ("caption",)  # everything a scene can be asked (`Scene.ask`)


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    row: int             # 1..GRID, from the top
    column: int          # 1..GRID, from the left
    digit: int | None    # the digit drawn beside the shape, if any
    rgb: tuple[int, int, int]  # the jittered colour actually drawn

    @property
    def place(self) -> str:
        return f"row {self.row} column {self.column}"

    @property
    def shape_patch(self) -> int:
        """The index of the image token that shows the shape: the top-left patch of its place (patches
        in reading order, 8 per row)."""
        per_side, per_place = IMAGE_SIZE // PATCH, PLACE // PATCH
        patch_row, patch_column = (self.row - 1) * per_place, (self.column - 1) * per_place
        return patch_row * per_side + patch_column

    def describe(self) -> str:
        text = f"{self.colour} {self.shape} at {self.place}"
        return text if self.digit is None else f"{text} with digit {self.digit}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]  # in reading order (row, then column)

    def image(self) -> Image.Image:
        img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE))
        for obj in self.objects:
            x, y = (obj.column - 1) * PLACE, (obj.row - 1) * PLACE  # top-left pixel of the place
            _draw_bitmap(img, SHAPES[obj.shape], x + SHAPE_OFFSET[0], y + SHAPE_OFFSET[1], obj.rgb)
            if obj.digit is not None:
                _draw_bitmap(img, DIGITS[obj.digit], x + PATCH + DIGIT_OFFSET[0], y + DIGIT_OFFSET[1], DIGIT_COLOUR)
        return img

    def caption(self) -> str:
        return " and ".join(obj.describe() for obj in self.objects)

    def ask(self, kind: str, rng: random.Random) -> tuple[str, str]:
        """A (prompt, answer) pair of any of PROMPT_KINDS: a question, or the caption request and the caption."""
        return (CAPTION_QUESTION, self.caption()) if kind == "caption" else self.question(kind, rng)

    def question(self, kind: str, rng: random.Random) -> tuple[str, str]:
        """A (question, answer) pair of one of QUESTION_TYPES about a randomly chosen object or colour."""
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


def random_scene(rng: random.Random) -> Scene:
    """3 or 4 objects of different shapes on different places; at least one carries a digit."""
    n = rng.choice((3, 4))
    shapes = rng.sample(list(SHAPES), n)  # distinct, so "the circle" names one object
    places = sorted(rng.sample(range(GRID * GRID), n))
    with_digit = [rng.random() < 0.5 for _ in range(n)]
    with_digit[rng.randrange(n)] = True
    objects = []
    for shape, place, has_digit in zip(shapes, places, with_digit):
        colour = rng.choice(list(COLOURS))
        rgb = tuple(min(255, max(0, v + rng.randint(-COLOUR_JITTER, COLOUR_JITTER))) for v in COLOURS[colour])
        objects.append(SceneObject(shape, colour, place // GRID + 1, place % GRID + 1,
                                   rng.randrange(10) if has_digit else None, rgb))
    return Scene(tuple(objects))


def scene_stream(split: str, seed: int):
    """An endless, deterministic stream of (scene, rng) for a split ("train" or "eval") and a seed.

    The split is part of the seed, so no evaluation seed ever replays a training stream.
    """
    rng = random.Random(f"{split}-{seed}")
    while True:
        yield random_scene(rng), rng


def parse_caption(text: str) -> set[str]:
    """A caption -> the set of object descriptions it names (for scoring against Scene.objects)."""
    return {part.strip() for part in text.split(" and ") if part.strip()}


def _draw_bitmap(img: Image.Image, rows: tuple[str, ...], x: int, y: int, rgb) -> None:
    for dy, line in enumerate(rows):
        for dx, mark in enumerate(line):
            if mark == "#":
                img.putpixel((x + dx, y + dy), rgb)
