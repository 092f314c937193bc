"""LLaVA-1.6's "anyres" geometry: which canvas an image is tiled on, and how many tokens it becomes.

LLaVA-1.5 shows the tower one 336 x 336 crop of every image (the short side resized to 336, the long
one cut to it): 576 tokens, whatever the image's size or shape.
LLaVA-1.6 (LLaVA-NeXT) keeps more of a large image. Its config lists canvases (`image_grid_pinpoints`,
(height, width) in pixels, multiples of the tower's 336), and for each image:

    1. pick the canvas that shows the most of the image's own pixels (`best_resolution`);
    2. resize the image to fit it, keeping its aspect (`fitted_size`), pad it black and centred, and cut
       the canvas into tiles of the tower's size, row by row (`tile_grid`: rows x columns);
    3. every tile, and the whole image squeezed to one tile (the base crop: all of the image, its
       aspect lost), goes through the vision tower: 576 features each;
    4. the tiles' features are put back together into one map of the canvas, the padding is cut away
       again (`unpadded_region`: the middle rows, or columns, as many as the image's side scaled to the
       map), and a learned `image_newline` vector ends every row, so that the flattened sequence still
       says where a row ends.

The image block is then the base crop's 576 features followed by the unpadded map, row by row, each row
closed by its newline (`image_token_count`): 2928 tokens for a 672 x 672 image. The processor
(tinyavl/processing.py) does steps 1-2, the model (tinyavl/model.py) steps 3-4; both read the numbers
here, so the prompt always has exactly as many image slots as the model makes features.

Reference: Liu et al., "LLaVA-NeXT: Improved reasoning, OCR, and world knowledge" (2024), and
transformers' image_processing_llava_next.py / modeling_llava_next.py, whose numbers these equal
(tests/test_next.py checks them against both).
"""
import math


def best_resolution(image_hw: tuple[int, int], pinpoints) -> tuple[int, int]:
    """The (height, width) canvas of `pinpoints` that keeps the most of the image's pixels after a resize
    that fits it (never counting more than the image has); ties go to the canvas that wastes least."""
    h, w = image_hw
    best, best_effective, best_waste = None, 0, math.inf
    for canvas_h, canvas_w in pinpoints:
        scale = min(canvas_w / w, canvas_h / h)
        effective = min(int(w * scale) * int(h * scale), w * h)  # an upscaled image shows no new detail
        waste = canvas_h * canvas_w - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (canvas_h, canvas_w), effective, waste
    return best


def fitted_size(image_hw: tuple[int, int], canvas_hw: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of the image resized to fit the canvas with its aspect kept: the tighter side
    fills the canvas, the other is rounded up (and never past the canvas)."""
    (h, w), (canvas_h, canvas_w) = image_hw, canvas_hw
    # The scale first, then the product (not h * canvas_w / w): the float rounding is transformers'.
    scale_w, scale_h = canvas_w / w, canvas_h / h
    if scale_w < scale_h:
        return min(math.ceil(h * scale_w), canvas_h), canvas_w
    return canvas_h, min(math.ceil(w * scale_h), canvas_w)


def tile_grid(image_hw: tuple[int, int], pinpoints, tile: int) -> tuple[int, int]:
    """(rows, columns) of tower-sized tiles the image's canvas is cut into."""
    canvas_h, canvas_w = best_resolution(image_hw, pinpoints)
    return canvas_h // tile, canvas_w // tile


def unpadded_region(image_hw: tuple[int, int], map_hw: tuple[int, int]) -> tuple[slice, slice]:
    """(rows, columns) of a (height, width) feature map of the padded canvas that show the image.

    The image was fitted to the canvas and centred, so the padding is on two opposite sides: of the
    rows (or columns) the image's side does not fill, scaled to the map and rounded down, each side
    loses half, rounded down. A border row that is part image may go, as in transformers."""
    (h, w), (map_h, map_w) = image_hw, map_hw
    if w / h > map_w / map_h:  # the image is wider than the canvas: padding above and below
        # round(..., 7) before int(): 47.99999999 must count as 48 rows, as transformers counts it
        shown = int(round(h * (map_w / w), 7))
        pad = (map_h - shown) // 2
        return slice(pad, map_h - pad), slice(0, map_w)
    shown = int(round(w * (map_h / h), 7))
    pad = (map_w - shown) // 2
    return slice(0, map_h), slice(pad, map_w - pad)


def map_token(row, column, n_columns: int, side: int):
    """Where the unpadded map's cell (row, column) sits in the image block (ints, or tensors of them):
    after the base crop's side^2 features, each of the map's rows holds its n_columns cells and then
    one newline token. The arithmetic of the layout the model's `tile_map` builds (tests/test_next.py
    holds the two together)."""
    return side * side + row * (n_columns + 1) + column


def image_token_count(image_hw: tuple[int, int], pinpoints, tile: int, patch: int) -> int:
    """Tokens of one image: the base crop's (tile / patch)^2 features, then the unpadded feature map of
    the tiles, each of its rows followed by one newline token."""
    side = tile // patch  # features per tile side: 24 for CLIP ViT-L/14 at 336 px
    rows, columns = tile_grid(image_hw, pinpoints, tile)
    kept_rows, kept_columns = unpadded_region(image_hw, (rows * side, columns * side))
    n_rows = kept_rows.stop - kept_rows.start
    n_columns = kept_columns.stop - kept_columns.start
    return map_token(n_rows, 0, n_columns, side)  # where a row after the last would start: the block's length
