"""The synthetic scene generator: deterministic, and its answers agree with the pixels it drew.

The checks read each scene back from the rendered image alone (which bitmap is in which place, at which
offset, in which colour, with which digit) and compare every answer and caption with what they find
there; they count pixels patch by patch to check which image tokens show an object or its digit.
"""
import itertools
import random

import numpy as np
import pytest

from tinyavl.toy.scenes import (CAPTION_QUESTION, COLOUR_JITTER, COLOURS, DIGIT_COLOUR, DIGIT_OFFSET, DIGITS, GRID,
                                IMAGE_SIZE, MAX_OFFSET, MIN_PATCH_PIXELS, PATCH, PROMPT_KINDS, QUESTION_TYPES, CELL_PX,
                                SHAPES, Scene, SceneObject, SceneStream, parse_caption, random_scene)

PLACE = IMAGE_SIZE // GRID   # 24 px
SHAPE_SIDE = 7 * CELL_PX     # 21 px: a 7 x 7 bitmap drawn CELL_PX x
DIGIT_SIZE = (3 * CELL_PX, 5 * CELL_PX)  # (width, height) px: a 3 x 5 bitmap drawn CELL_PX x
OFFSETS = list(itertools.product(range(MAX_OFFSET + 1), repeat=2))  # every (x, y) a shape can sit at


def scenes(split="eval", seed=7, n=40):
    stream = SceneStream(split, seed)
    return [next(stream)[0] for _ in range(n)]


def bitmap(rows):
    """A tuple of '#'/'.' strings -> (rows, columns) bool."""
    return np.array([[mark == "#" for mark in line] for line in rows])


def cells(block):
    """A (CELL_PX h, CELL_PX w) block of pixels -> (h, w): one value per bitmap cell, whose CELL_PX x CELL_PX
    pixels must agree."""
    h, w = block.shape[0] // CELL_PX, block.shape[1] // CELL_PX
    assert block.shape == (h * CELL_PX, w * CELL_PX)
    grid = block.reshape(h, CELL_PX, w, CELL_PX)
    assert (grid == grid[:, :1, :, :1]).all(), "a bitmap cell is drawn as CELL_PX x CELL_PX equal pixels"
    return grid[:, 0, :, 0]


def nearest_colour(rgb):
    return min(COLOURS, key=lambda name: sum((a - b) ** 2 for a, b in zip(COLOURS[name], rgb)))


def read_places(img):
    """Recover {(row, column): (colour, shape, digit, offset)} from the image alone, place by place.

    A place's non-black pixels are its object's silhouette, digit included: their bounding box gives the
    offset (every shape touches all four sides of its 7 x 7 box), and the 21 x 21 px there, read in 3 x 3
    cells, must match exactly one shape's bitmap wherever no digit pixel hides it. The digit is the
    DIGIT_COLOUR pixels, which must all lie in the 9 x 15 px at DIGIT_OFFSET, read the same way.
    """
    pixels = np.asarray(img)  # (H, W, RGB)
    found = {}
    for row in range(1, GRID + 1):
        for column in range(1, GRID + 1):
            place = pixels[(row - 1) * PLACE:row * PLACE, (column - 1) * PLACE:column * PLACE]  # (PLACE, PLACE, RGB)
            lit = place.any(axis=-1)
            if not lit.any():
                continue
            ys, xs = np.nonzero(lit)
            x, y = int(xs.min()), int(ys.min())
            assert (xs.max() + 1 - x, ys.max() + 1 - y) == (SHAPE_SIDE, SHAPE_SIDE), f"row {row} column {column}"
            box, lit = place[y:y + SHAPE_SIDE, x:x + SHAPE_SIDE], lit[y:y + SHAPE_SIDE, x:x + SHAPE_SIDE]
            in_digit = (box == DIGIT_COLOUR).all(axis=-1)
            rgbs = {tuple(int(v) for v in rgb) for rgb in box[lit & ~in_digit]}
            assert len(rgbs) == 1, "a shape is drawn in one colour"
            rgb = rgbs.pop()
            colour = nearest_colour(rgb)
            assert max(abs(a - b) for a, b in zip(rgb, COLOURS[colour])) <= COLOUR_JITTER

            silhouette = cells(lit)
            hidden = in_digit.reshape(7, CELL_PX, 7, CELL_PX).any(axis=(1, 3))  # cells a digit pixel covers: either
            shapes = [name for name, rows in SHAPES.items() if (bitmap(rows) == silhouette)[~hidden].all()]
            assert len(shapes) == 1, f"row {row} column {column} matches shapes {shapes}"

            (dx, dy), (w, h) = DIGIT_OFFSET, DIGIT_SIZE
            strokes = in_digit[dy:dy + h, dx:dx + w]
            assert strokes.sum() == in_digit.sum(), "every digit pixel lies at DIGIT_OFFSET inside its shape"
            digit = None
            if strokes.any():
                digits = [d for d, rows in DIGITS.items() if (bitmap(rows) == cells(strokes)).all()]
                assert len(digits) == 1, f"row {row} column {column} matches digits {digits}"
                digit = digits[0]
            found[(row, column)] = (colour, shapes[0], digit, (x, y))
    return found


def read_scene(img):
    """Recover {(row, column): (colour, shape, digit)} from the image alone (see read_places)."""
    return {place: read[:3] for place, read in read_places(img).items()}


def patches_showing(img, colour=None):
    """Patches (reading order) with at least MIN_PATCH_PIXELS non-black pixels (or pixels of `colour`),
    counted patch by patch."""
    pixels, side = np.asarray(img), IMAGE_SIZE // PATCH
    shown = []
    for index in range(side * side):
        top, left = (index // side) * PATCH, (index % side) * PATCH
        patch = pixels[top:top + PATCH, left:left + PATCH]  # (PATCH, PATCH, RGB)
        hits = patch.any(axis=-1) if colour is None else (patch == colour).all(axis=-1)
        if hits.sum() >= MIN_PATCH_PIXELS:
            shown.append(index)
    return shown


def alone(shape, row, column, offset, digit=None, colour="red"):
    """A scene of one object (its exact colour: no jitter)."""
    obj = SceneObject(shape, colour, row, column, digit, COLOURS[colour], offset)
    return obj, Scene((obj,)).image()


def test_same_seed_same_scenes_and_questions():
    a, b = SceneStream("eval", 3), SceneStream("eval", 3)
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
    # A digit hides the cells under it, so two shapes must differ outside the cells it can cover.
    (dx, dy), (w, h) = DIGIT_OFFSET, DIGIT_SIZE
    free = np.ones((7, 7), dtype=bool)
    free[dy // CELL_PX:(dy + h - 1) // CELL_PX + 1, dx // CELL_PX:(dx + w - 1) // CELL_PX + 1] = False
    for a, b in itertools.combinations(SHAPES, 2):
        assert (bitmap(SHAPES[a]) != bitmap(SHAPES[b]))[free].any(), (a, b)
    # Every shape touches all four sides of its box, so its bounding box in the image gives its offset.
    for name, rows in SHAPES.items():
        cells_ = bitmap(rows)
        assert cells_[0].any() and cells_[-1].any() and cells_[:, 0].any() and cells_[:, -1].any(), name


@pytest.mark.parametrize("scene", scenes(), ids=lambda s: s.caption()[:30])
def test_pixels_agree_with_the_objects(scene):
    drawn = read_scene(scene.image())
    assert drawn == {(o.row, o.column): (o.colour, o.shape, o.digit) for o in scene.objects}


def test_shapes_sit_at_their_seeded_offsets():
    # patches() rests on the offset, so the pixels must put each shape exactly there; and the seed uses them all.
    for scene in scenes():
        drawn = read_places(scene.image())
        assert {place: read[3] for place, read in drawn.items()} == {(o.row, o.column): o.offset for o in scene.objects}
    assert {o.offset for scene in scenes(n=200) for o in scene.objects} == set(OFFSETS)


def test_reader_sees_every_shape_digit_and_offset():
    # Each digit on each shape at each offset, read back alone: the digit never breaks the shape's reading.
    for (shape, digit), offset in itertools.product(itertools.product(SHAPES, [None, *DIGITS]), OFFSETS):
        obj, img = alone(shape, 3, 2, offset, digit)
        assert read_places(img) == {(3, 2): ("red", shape, digit, offset)}


def test_the_draws_cover_their_ranges():
    """Over 300 scenes: each colour channel moves by every amount from -COLOUR_JITTER to +COLOUR_JITTER (none
    of the base colours is near 0 or 255 to clip it), and "how many <colour> shapes" is asked of colours that
    are there and colours that are not (answer 0)."""
    stream, moves, counts = SceneStream("eval", 0), set(), set()
    for _ in range(300):
        scene, rng = next(stream)
        moves |= {v - base for o in scene.objects for v, base in zip(o.rgb, COLOURS[o.colour])}
        counts.add(scene.question("count", rng)[1])
    assert moves == set(range(-COLOUR_JITTER, COLOUR_JITTER + 1))
    assert {"0", "1", "2"} <= counts


def test_a_patch_shows_an_object_from_8_of_its_64_pixels():
    """Chapter 3's rule at its boundary: 8 of a patch's pixels show the object there, 7 do not."""
    from tinyavl.toy.scenes import _patches_showing
    mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    mask[0, :8] = True                     # patch 0: 8 px
    mask[0, PATCH:PATCH + 7] = True        # patch 1: 7 px
    mask[PATCH, :4] = mask[PATCH + 1, :4] = True   # the patch below 0 (row 1 of patches): 8 px in two rows
    assert _patches_showing(mask) == [0, IMAGE_SIZE // PATCH]


@pytest.mark.parametrize("shape", SHAPES)
def test_patches_are_the_image_tokens_that_show_the_object(shape):
    # An object alone: patches() and digit_patches() must be the patches its pixels fill, at every offset.
    for i, offset in enumerate(OFFSETS):
        row, column, digit = i % GRID + 1, i // GRID + 1, i % len(DIGITS)
        obj, img = alone(shape, row, column, offset, digit)
        assert obj.patches() == patches_showing(img), (offset, row, column)
        assert obj.digit_patches() == patches_showing(img, DIGIT_COLOUR), (offset, digit)
    assert alone(shape, 1, 1, (0, 0))[0].digit_patches() == []


def test_every_fact_is_visible_in_several_patches():
    """Every object shows in at least 5 image tokens and every digit in at least 2, at every offset.

    That redundancy is what the toy is designed for: as in a photograph, a fact survives losing some of
    the patches that show it, so an eviction policy can drop a few image tokens and the caption still holds.
    """
    for shape, offset in itertools.product(SHAPES, OFFSETS):
        assert len(patches_showing(alone(shape, 2, 2, offset)[1])) >= 5, (shape, offset)
    for digit, offset in itertools.product(DIGITS, OFFSETS):
        assert len(patches_showing(alone("square", 2, 2, offset, digit)[1], DIGIT_COLOUR)) >= 2, (digit, offset)


def test_patches_by_hand():
    side = IMAGE_SIZE // PATCH  # 12 patches per row
    # A square at row 2 column 3, offset (0, 0): its place starts at px (x 48, y 24) = patch column 6, patch
    # row 3; its 21 px cover 8 + 8 + 5 px of patches 6-8 and 3-5, and even the corner has 5 x 5 = 25 >= 8 px.
    square = SceneObject("square", "red", 2, 3, None, COLOURS["red"], (0, 0))
    assert square.patches() == [r * side + c for r in (3, 4, 5) for c in (6, 7, 8)]
    # A diamond at row 1 column 1, offset (0, 0): bitmap cell k spans px 3k..3k+2, so patch 0 holds cells 0-1
    # and 2 px of cell 2, patch 1 holds 1 px of cell 2, cells 3-4 and 1 px of cell 5, patch 2 the rest.
    # Corner patches: top left holds diamond cells (row 1, col 2) 3x2 px, (2, 1) 2x3 and (2, 2) 2x2 = 16 px;
    # top right only (2, 5) 2x2 = 4 px; bottom left only (5, 2) 2x2 = 4 px; bottom right none. The other five
    # each hold a whole cell (9 px): (0, 3), (3, 0), (3, 3), (3, 6), (6, 3). Shown: 0, 1, 12, 13, 14, 25.
    diamond = SceneObject("diamond", "red", 1, 1, 1, COLOURS["red"], (0, 0))
    assert diamond.patches() == [0, 1, 12, 13, 14, 25]
    # Its digit 1 (.#. ##. .#. .#. ###) at DIGIT_OFFSET (6, 3): digit cell (i, j) spans x 6+3j.., y 3+3i..
    # Patch column 0 (x 0-7) gets only x 6-7 of the digit's left column, whose strokes are rows 1 and 4:
    # 2x2, 2x1 + 2x1 and 2x2 = 4 px in patch rows 0, 1 and 2, all < 8. Patch column 1 (x 8-15) gets the rest:
    # row 0 holds stroke (0, 1) whole (9 px), row 1 stroke (2, 1) whole, row 2 the bottom bar's 7 x 2 = 14 px.
    assert diamond.digit_patches() == [1, 13, 25]


def test_place_patches_by_hand_hold_every_pixel_of_the_object_and_no_other():
    side = IMAGE_SIZE // PATCH  # 12 patches per row; a place is 3 x 3 of them
    # Row 2 column 3: patch rows 3-5, patch columns 6-8.
    obj = SceneObject("cross", "blue", 2, 3, 7, COLOURS["blue"], (MAX_OFFSET, MAX_OFFSET))
    assert obj.place_patches() == [r * side + c for r in (3, 4, 5) for c in (6, 7, 8)]
    for scene, _ in itertools.islice(SceneStream("eval", 3), 20):
        for obj in scene.objects:
            in_place = np.zeros((side, side), dtype=bool)
            in_place.flat[obj.place_patches()] = True
            pixels_in_place = np.kron(in_place, np.ones((PATCH, PATCH), dtype=bool))   # (IMAGE_SIZE, IMAGE_SIZE)
            assert (obj.shape_mask() <= pixels_in_place).all()
            for other in scene.objects:
                if other is not obj:
                    assert not (other.shape_mask() & pixels_in_place).any()


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
    scene, rng = next(SceneStream("eval", 3))
    state = rng.getstate()
    for kind in PROMPT_KINDS:
        asked = scene.ask(kind, rng)
        after_ask = rng.getstate()
        rng.setstate(state)
        # The same draw as the question itself (the caption draws nothing), so every stream stays as it was.
        assert asked == ((CAPTION_QUESTION, scene.caption()) if kind == "caption" else scene.question(kind, rng))
        assert rng.getstate() == after_ask
        state = after_ask
