"""The synthetic scene generator: deterministic, and its answers agree with the pixels it drew.

The checks read each scene back from the rendered image alone (which bitmap is in which patch, in
which colour) and compare every answer and caption with what they find there.
"""
import random

import pytest

from tinyavl.scenes import (CAPTION_QUESTION, COLOURS, DIGIT_COLOUR, DIGIT_OFFSET, DIGITS, GRID, IMAGE_SIZE, PATCH,
                            PROMPT_KINDS, QUESTION_TYPES, SHAPE_OFFSET, SHAPES, SceneObject, parse_caption,
                            random_scene, scene_stream)


def scenes(split="eval", seed=7, n=40):
    stream = scene_stream(split, seed)
    return [next(stream)[0] for _ in range(n)]


def read_patch(img, x0, y0):
    """The non-black pixels of the 8 x 8 patch at (x0, y0): {(dx, dy): rgb}."""
    return {(dx, dy): img.getpixel((x0 + dx, y0 + dy)) for dy in range(PATCH) for dx in range(PATCH)
            if img.getpixel((x0 + dx, y0 + dy)) != (0, 0, 0)}


def bitmap_cells(rows, offset):
    return {(offset[0] + dx, offset[1] + dy) for dy, line in enumerate(rows) for dx, mark in enumerate(line)
            if mark == "#"}


def nearest_colour(rgb):
    return min(COLOURS, key=lambda name: sum((a - b) ** 2 for a, b in zip(COLOURS[name], rgb)))


def read_scene(img):
    """Recover {(row, column): (colour, shape, digit)} from the image by matching bitmaps."""
    found = {}
    for row in range(1, GRID + 1):
        for column in range(1, GRID + 1):
            x0, y0 = (column - 1) * IMAGE_SIZE // GRID, (row - 1) * IMAGE_SIZE // GRID
            shape_pixels = read_patch(img, x0, y0)
            digit_pixels = read_patch(img, x0 + PATCH, y0)
            assert not read_patch(img, x0, y0 + PATCH) and not read_patch(img, x0 + PATCH, y0 + PATCH), \
                "the bottom patches of a place must stay black"
            if not shape_pixels:
                assert not digit_pixels, "a digit without a shape"
                continue
            shapes = [name for name, rows in SHAPES.items() if bitmap_cells(rows, SHAPE_OFFSET) == set(shape_pixels)]
            assert len(shapes) == 1, f"patch at row {row} column {column} matches shapes {shapes}"
            colours = {nearest_colour(rgb) for rgb in shape_pixels.values()}
            assert len(colours) == 1, "a shape is drawn in one colour"
            digit = None
            if digit_pixels:
                assert set(digit_pixels.values()) == {DIGIT_COLOUR}
                digits = [d for d, rows in DIGITS.items() if bitmap_cells(rows, DIGIT_OFFSET) == set(digit_pixels)]
                assert len(digits) == 1
                digit = digits[0]
            found[(row, column)] = (colours.pop(), shapes[0], digit)
    return found


def test_same_seed_same_scenes_and_questions():
    a, b = scene_stream("eval", 3), scene_stream("eval", 3)
    for _ in range(20):
        (scene_a, rng_a), (scene_b, rng_b) = next(a), next(b)
        assert scene_a == scene_b
        assert scene_a.image().tobytes() == scene_b.image().tobytes()
        questions_a = [scene_a.question(kind, rng_a) for kind in QUESTION_TYPES]
        assert questions_a == [scene_b.question(kind, rng_b) for kind in QUESTION_TYPES]


def test_seeds_and_splits_differ():
    assert scenes("eval", 1) != scenes("eval", 2)
    assert scenes("train", 1) != scenes("eval", 1)


def test_every_glyph_is_distinct():
    # Two equal bitmaps would make an answer unreadable from the pixels.
    assert len({rows for rows in SHAPES.values()}) == len(SHAPES)
    assert len({rows for rows in DIGITS.values()}) == len(DIGITS)


@pytest.mark.parametrize("scene", scenes(), ids=lambda s: s.caption()[:30])
def test_pixels_agree_with_the_objects(scene):
    drawn = read_scene(scene.image())
    assert drawn == {(o.row, o.column): (o.colour, o.shape, o.digit) for o in scene.objects}


def test_shape_patch_by_hand():
    # 8 patches per row and 2 x 2 per place, so row 2 column 3 starts at patch row 2, column 4.
    assert SceneObject("circle", "red", 2, 3, None, (0, 0, 0)).shape_patch == 2 * 8 + 4
    assert SceneObject("circle", "red", 4, 4, None, (0, 0, 0)).shape_patch == 6 * 8 + 6


@pytest.mark.parametrize("scene", scenes()[:5], ids=lambda s: s.caption()[:30])
def test_shape_patch_is_the_image_token_that_shows_the_shape(scene):
    img, side = scene.image(), IMAGE_SIZE // PATCH
    for obj in scene.objects:
        row, col = divmod(obj.shape_patch, side)
        patch = img.crop((col * PATCH, row * PATCH, (col + 1) * PATCH, (row + 1) * PATCH))
        assert obj.rgb in {rgb for _, rgb in patch.getcolors()}, obj


@pytest.mark.parametrize("seed", range(5))
def test_answers_agree_with_the_pixels(seed):
    rng = random.Random(seed)
    for _ in range(30):
        scene = random_scene(rng)
        drawn = read_scene(scene.image())  # (row, column) -> (colour, shape, digit)
        by_shape = {shape: (place, colour, digit) for place, (colour, shape, digit) in drawn.items()}
        for kind in QUESTION_TYPES:
            question, answer = scene.question(kind, rng)
            words = question.rstrip("?").split()
            if kind == "colour":
                assert answer == by_shape[words[-1]][1]
            elif kind == "where":
                row, column = by_shape[words[-1]][0]
                assert answer == f"{words[-1]} at row {row} column {column}"
            elif kind == "shape":
                assert answer == drawn[(int(words[-3]), int(words[-1]))][1]
            elif kind == "digit":
                assert answer == str(drawn[(int(words[-3]), int(words[-1]))][2])
            elif kind == "count":
                assert answer == str(sum(colour == words[2] for colour, _, _ in drawn.values()))
        expected = {f"{c} {s} at row {r} column {col}" + ("" if d is None else f" with digit {d}")
                    for (r, col), (c, s, d) in drawn.items()}
        assert parse_caption(scene.caption()) == expected


def test_captions_are_long_and_questions_well_posed():
    for scene in scenes(n=200):
        assert len(scene.caption().split()) >= 20, "captions must be long enough for decode-time policies to matter"
        assert 3 <= len(scene.objects) <= 4
        assert len({o.shape for o in scene.objects}) == len(scene.objects), "'the circle' must name one object"
        assert any(o.digit is not None for o in scene.objects), "the digit question needs a digit"
        assert list(scene.objects) == sorted(scene.objects, key=lambda o: (o.row, o.column)), "reading order"
    assert CAPTION_QUESTION.endswith(".")


def test_ask_is_the_question_or_the_caption_request():
    scene, rng = next(scene_stream("eval", 3))
    state = rng.getstate()
    for kind in PROMPT_KINDS:
        asked = scene.ask(kind, rng)
        after_ask = rng.getstate()
        rng.setstate(state)
        # The same draw as the question itself (the caption draws nothing), so every stream stays as it was.
        assert asked == ((CAPTION_QUESTION, scene.caption()) if kind == "caption" else scene.question(kind, rng))
        assert rng.getstate() == after_ask
        state = after_ask
