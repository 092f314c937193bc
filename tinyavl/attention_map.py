"""Attention pictures: what a KV policy kept of the image, and where the model looks.

    python main.py --image weights/toy/examples/scene-0.png --policy avl --attention-map out.png

Two panels over the image the vision tower saw, one cell per image token of a chosen decoder layer
(LLaVA-1.6: two such rows, the base crop's tokens over the base crop, and the tile map's over the image
at high resolution, as the tiles show it once the padding is cut away; its newline tokens have no cell):
- left, the policy's decision for that layer at the end of generation: computed (green frame; for
  A-VL the core), stored but not computed (yellow frame; A-VL's secondary tokens) and evicted
  (darkened). Policies other than A-VL, and A-VL at K = 1, compute every image token they store.
- right, the last prompt token's attention over the image tokens in that layer (mean over heads, dense
  attention): where the model looks when it starts to answer. The colour scale under it runs from 0 to
  the largest share one token receives, as the red's strength (drawn over mid-grey; a cell keeps the
  image's light and dark under its red). With a threshold (`--hires-threshold`), the blocks that
  FlexAttention's selection takes from that attention are framed in blue (tinyavl/hires.py): the
  squares of the image a FlexAttention model would read again at high resolution in the next layer
  (LLaVA-1.6: on the base crop, the low-resolution view).
The question, what the strip shows and the counts of each role are written above the panels, each line cut
to the picture's width (`fitted`), in characters the font has (`drawable`).
"""
import functools
import math
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from tinyavl import anyres, hires
from tinyavl.attention_stats import record_attention
from tinyavl.cache import AVLCache, KVCache
from tinyavl.errors import UserError
from tinyavl.files import write_file_atomically
from tinyavl.model import stitch_tiles

EVICTED, STORED, COMPUTED = 0, 1, 2
FRAME = {COMPUTED: (40, 220, 70), STORED: (250, 210, 40)}
PANEL = 384  # px per panel side
GAP = 10  # px between the two panels
HEADER = 58  # px above the panels: the question, the title and the panels' captions, the counts of each role
SCALE_BAR = 34  # px below them: the heat map's colour scale
HEAT = (255, 30, 30)
BLOCK = (40, 90, 255)  # frame of a block FlexAttention's selection takes


def image_heat(model, input_ids, pixel_values, layer: int, image_sizes=None) -> torch.Tensor:
    """(n_img,) the last prompt token's dense attention over the image tokens in `layer` (head mean). A
    FlexAttention model runs without its high-resolution view here: in a layer that reads the view
    (config.hires.first_layer on), this is the attention the model would give without it."""
    recorder, _ = record_attention(model, input_ids, pixel_values, max_new_tokens=1,  # the prefill only
                                   image_sizes=image_sizes)
    return recorder.image_row(0, layer)


def image_roles(cache: KVCache, layer: int) -> torch.Tensor:
    """(n_img,) EVICTED / STORED / COMPUTED for each image token of a layer, read off the cache's positions.

    A token counts as stored when any KV head keeps it."""
    image_positions = torch.arange(cache.n_sys, cache.n_sys + cache.n_img)            # (n_img,)
    held = cache.pos[layer][0].flatten().cpu()                                          # (Hkv * n,)
    roles = torch.isin(image_positions, held).long() * STORED
    # Only A-VL computes fewer image rows than it stores, and only where K > 1: at K = 1 every step is an
    # update step, which computes every stored image row.
    if isinstance(cache, AVLCache) and cache.K > 1:
        # KV head 0 stands for all: A-VL's image rows are the same in every head (only its text differs).
        core_positions = cache.pos[layer][0, 0, cache.core[layer]].cpu()
        roles[torch.isin(image_positions, core_positions)] = COMPUTED
    else:
        roles[roles == STORED] = COMPUTED
    return roles


def seen_image(pixels, processor) -> Image.Image:
    """Pixels the vision tower saw (3, H, W), un-normalised back into an RGB picture."""
    x = pixels.float().cpu() * processor.image_std + processor.image_mean   # (3, H, W) in [0, 1]
    x = (x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).contiguous()  # (H, W, 3)
    return Image.fromarray(x.numpy())


@dataclass
class TokenPicture:
    """A picture that image tokens tile: one cell per token, in reading order."""
    label: str
    image: Image.Image
    tokens: torch.Tensor     # (rows * columns,) their indices in the image block
    grid: tuple[int, int]    # (rows, columns) of cells


def token_pictures(model, processor, inputs) -> list[TokenPicture]:
    """The pictures of a prompt's image block: LLaVA-1.5's one crop (CLS, if kept, has no cell);
    LLaVA-1.6's base crop, then its tile map over the unpadded canvas (newline tokens have no cell)."""
    config = model.config
    side, patch = config.vision.patches_per_side, config.vision.patch_size
    # The pixels the patches cover: where S is no multiple of the patch, the convolution never reads the last.
    # s = side * patch px.
    crops = inputs["pixel_values"][0][..., :side * patch, :side * patch]   # (3, s, s), or NeXT's (n_crops, 3, s, s)
    if not config.is_next:
        first = 1 if config.vision_feature_select_strategy == "full" else 0  # CLS comes first
        return [TokenPicture("image", seen_image(crops, processor), torch.arange(first, first + side * side),
                             (side, side))]
    image_hw = tuple(inputs["image_sizes"][0].tolist())
    rows, columns = anyres.tile_grid(image_hw, config.image_grid_pinpoints, config.vision.image_size)
    tiles = crops[1:1 + rows * columns].permute(0, 2, 3, 1).flatten(1, 2)  # (rows * columns, s s, 3)
    canvas = stitch_tiles(tiles, rows, columns).permute(2, 0, 1)            # (3, rows s, columns s)
    kept_rows, kept_columns = anyres.unpadded_region(image_hw, (rows * side, columns * side))
    canvas = canvas[:, kept_rows.start * patch:kept_rows.stop * patch,
                    kept_columns.start * patch:kept_columns.stop * patch]              # the image, unpadded
    grid = (kept_rows.stop - kept_rows.start, kept_columns.stop - kept_columns.start)
    base = TokenPicture("base crop", seen_image(crops[0], processor), torch.arange(side * side), (side, side))
    if 0 in grid:  # an image over 72:1 keeps no row of the map (as in transformers): nothing to draw
        return [base]
    cell_rows, cell_columns = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    map_tokens = anyres.map_token(cell_rows, cell_columns, grid[1], side).flatten()     # newlines have no cell
    return [base, TokenPicture("high resolution", seen_image(canvas, processor), map_tokens, grid)]


# A character no font has (the last of Unicode's private use plane 15): a FreeType font draws it as its box for
# a missing glyph (.notdef), as it draws every character it lacks.
NO_GLYPH = "\U000FFFFD"


def has_glyph(font, char: str) -> bool:
    """Whether the font draws `char` as itself. Pillow's bitmap font (its default before 10.1, or without
    FreeType) has Latin-1 and raises on the rest; a FreeType font draws what it lacks as its missing-glyph
    box (Pillow's default FreeType font, Aileron, has ASCII and a few marks, «»‹›‘’“”…°±´·⁄©™ and the ligatures
    "ﬁ" and "ﬂ": "é" is a box)."""
    if not isinstance(font, ImageFont.FreeTypeFont):
        return ord(char) < 256
    return glyph(font, char) != glyph(font, NO_GLYPH)


@functools.lru_cache(maxsize=4096)
def glyph(font, char: str) -> tuple:
    """(size, pixels) of the character as the FreeType font draws it: each character of a text, and the
    missing-glyph box every one is compared with, drawn once."""
    mask = font.getmask(char)
    return mask.size, bytes(mask)


def drawable(text: str, font) -> str:
    """The text on one line (a newline would draw over the line below it), in characters the font has: one it
    lacks is drawn as its compatibility form without accents where the font has all of that ("é" as "e", "ﬁ"
    as "fi"), an accent it lacks left out (its letter stays), anything else as "?"."""
    def shown(char: str) -> str:
        if has_glyph(font, char):
            return char
        if unicodedata.combining(char):
            return ""
        plain = "".join(c for c in unicodedata.normalize("NFKD", char) if not unicodedata.combining(c))
        return plain if plain and all(has_glyph(font, c) for c in plain) else "?"
    # NFC first: an accent written after its letter (e + U+0301) joins it ("é"), where a font may have both.
    return "".join(shown(char) for char in unicodedata.normalize("NFC", " ".join(text.split())))


def fitted(text: str, draw: ImageDraw.ImageDraw, width: float) -> str:
    """`text` (drawable) as much of it as `width` px holds, ending in "..." where it is cut ("" where not even
    that fits)."""
    if draw.textlength(text) <= width:
        return text
    if draw.textlength("...") > width:
        return ""
    short, long = 0, len(text)  # the longest prefix that fits with its "...", by bisection: a question may be long
    while short < long:
        middle = (short + long + 1) // 2
        short, long = (middle, long) if draw.textlength(text[:middle] + "...") <= width else (short, middle - 1)
    return text[:short] + "..."


def draw_attention_map(image: Image.Image, roles: torch.Tensor, heat: torch.Tensor, title: str,
                       question: str = "", grid: tuple[int, int] | None = None, blocks=None,
                       footnote: str = "") -> Image.Image:
    """Two panels (roles | heat) over `image`, one cell per image token of a (rows, columns) grid (default
    square); above them the question, the title (what the strip shows), the panels' captions and the count
    of each role; the heat's colour scale below, the footnote under the left panel. blocks (n, n) bool, if
    given: frame block (i, j), the i-th n-th of the image down and the j-th across, on the heat panel."""
    rows, columns = grid or (math.isqrt(len(roles)),) * 2
    if rows * columns != len(roles):
        raise ValueError(f"{len(roles)} image tokens do not fill a {rows} x {columns} grid of cells")
    # A panel is PANEL px on its longer side, or wider where a side has more than PANEL cells (a LLaVA-1.6
    # config whose canvases are many tiles long; the published ones make at most 72): a pixel a cell at least.
    cell = max(PANEL / max(rows, columns), 1.0)
    width, height = round(cell * columns), round(cell * rows)
    slot = max(PANEL, width)                                   # px across the left panel's slot
    right_x = slot + GAP                                       # where the right panel starts
    base = image.resize((width, height), Image.Resampling.NEAREST)
    strip = Image.new("RGB", (2 * slot + GAP, HEADER + height + SCALE_BAR), (255, 255, 255))
    draw = ImageDraw.Draw(strip)

    def write(xy, text: str, width: float) -> None:  # one line of text, cut to `width` px
        draw.text(xy, fitted(drawable(text, draw.getfont()), draw, width), fill=(0, 0, 0))

    write((4, 4), f"Q: {question}", strip.width - 8)
    write((4, 22), title, slot + 2)
    write((right_x, 22), "last prompt token's attention", slot - 4)
    counts = {role: int((roles == role).sum()) for role in (COMPUTED, STORED, EVICTED)}
    write((4, 40), f"computed (green) {counts[COMPUTED]}, stored only (yellow) {counts[STORED]}, evicted (dark) "
          f"{counts[EVICTED]}", strip.width - 8)
    strip.paste(roles_panel(base, roles, columns, cell), (0, HEADER))
    peak = float(heat.max()) or 1.0
    strip.paste(heat_panel(base, heat, peak, columns, cell, blocks), (right_x, HEADER))

    # The colour scale: the red's opacity from 0 (left) to the peak share (right), over mid-grey. A cell
    # also shows the image under it (half grey), so over a dark part it is darker than the bar at its
    # share: the red's strength, not the brightness, is the share.
    bar = Image.new("RGB", (PANEL, 10), (128, 128, 128))
    ramp = ImageDraw.Draw(bar, "RGBA")
    for x in range(PANEL):
        ramp.line([(x, 0), (x, 9)], fill=(*HEAT, int(220 * x / (PANEL - 1))))
    bar_top = HEADER + height + 4
    strip.paste(bar, (right_x, bar_top))
    write((4, bar_top), footnote, slot + 2)
    draw.text((right_x, bar_top + 12), "0", fill=(0, 0, 0))
    label = f"{peak:.3g} of the attention"  # 3 significant digits: a long prompt's peak may be under 0.001
    draw.text((right_x + PANEL - draw.textlength(label), bar_top + 12), label, fill=(0, 0, 0))  # right-aligned
    return strip


def roles_panel(base: Image.Image, roles: torch.Tensor, columns: int, cell: float) -> Image.Image:
    """The policy's roles over the image: evicted cells darkened, the others framed by role."""
    panel = base.copy()
    shade = ImageDraw.Draw(panel, "RGBA")
    for i, role in enumerate(roles.tolist()):
        box = _cell_box(i, columns, cell)
        if role == EVICTED:
            shade.rectangle(box, fill=(0, 0, 0, 170))
        else:
            shade.rectangle(box, outline=FRAME[role], width=2)
    return panel


def heat_panel(base: Image.Image, heat: torch.Tensor, peak: float, columns: int, cell: float,
               blocks=None) -> Image.Image:
    """The attention over the image, half grey: red with opacity proportional to each cell's heat over the peak
    (the peak opaque-ish), and FlexAttention's blocks (n, n) framed where given."""
    panel = Image.blend(base, Image.new("RGB", base.size, (128, 128, 128)), 0.5)
    glow = ImageDraw.Draw(panel, "RGBA")
    for i, value in enumerate(heat.tolist()):
        glow.rectangle(_cell_box(i, columns, cell), fill=(*HEAT, int(220 * value / peak)))
    if blocks is not None:
        n, (width, height) = blocks.shape[0], base.size
        for i, j in blocks.nonzero().tolist():
            glow.rectangle((round(j * width / n), round(i * height / n), round((j + 1) * width / n) - 1,
                            round((i + 1) * height / n) - 1), outline=BLOCK, width=2)
    return panel


def _cell_box(index: int, columns: int, cell: float):
    row, col = divmod(index, columns)
    return (round(col * cell), round(row * cell), round((col + 1) * cell) - 1, round((row + 1) * cell) - 1)


def map_layer(config, layer: int | None) -> int:
    """The decoder layer to draw: `layer` checked against the model's config, or the last one."""
    n_layers = config.text.num_hidden_layers
    if layer is None:
        return n_layers - 1
    if not 0 <= layer < n_layers:
        raise UserError(f"the map layer (--map-layer) must be in 0..{n_layers - 1} (the decoder's layers), "
                        f"got {layer}")
    return layer


def save_attention_map(path, model, processor, inputs, cache: KVCache, layer: int | None = None,
                       question: str = "", hires_threshold: float | None = None, replace: bool = False) -> None:
    """Draw the picture for a finished generation (its `inputs` and the `cache` it ran with) to `path`,
    written atomically: one strip of two panels per picture the image tokens tile (token_pictures).

    layer: the decoder layer to show; default the last one. question: the text shown above the panels.
    replace: whether a file at `path` may be replaced (a command's --force; `write_file_atomically`).
    hires_threshold: also frame the blocks FlexAttention's selection takes from the heat of the first
    picture (as many per side as the model's hires_config reads, or hires.BLOCKS for a model without one;
    fewer where the grid has fewer tokens); None: no selection."""
    layer = map_layer(model.config, layer)
    heat = image_heat(model, inputs["input_ids"], inputs["pixel_values"], layer, inputs.get("image_sizes"))
    roles = image_roles(cache, layer)
    blocks_per_side = hires.BLOCKS if model.config.hires is None else model.config.hires.blocks
    strips = []
    for i, picture in enumerate(token_pictures(model, processor, inputs)):
        cells, picture_heat = roles[picture.tokens], heat[picture.tokens]
        title = f"{picture.label}, layer {layer}, policy {cache.name}"
        blocks, footnote = None, ""
        if hires_threshold is not None and i == 0:  # the low-resolution view, which FlexAttention selects from
            blocks = hires.select_blocks(picture_heat[None], picture.grid, hires_threshold,
                                         min(blocks_per_side, *picture.grid))[0]       # (n, n)
            footnote = (f"FlexAttention's selection (blue, threshold {hires_threshold:g}): "
                        f"{int(blocks.sum())} of {blocks.numel()} blocks")
        strips.append(draw_attention_map(picture.image, cells, picture_heat, title, question, picture.grid,
                                         blocks, footnote))
    # As wide as the widest strip: a map of more than PANEL cells a side draws wider panels (draw_attention_map).
    figure = Image.new("RGB", (max(s.width for s in strips), sum(s.height for s in strips)), (255, 255, 255))
    for i, strip in enumerate(strips):
        figure.paste(strip, (0, sum(s.height for s in strips[:i])))
    # The format from path's suffix: the partial file's suffix is ".partial".
    image_format = Image.registered_extensions().get(Path(path).suffix.lower())
    write_file_atomically(path, lambda partial: figure.save(partial, format=image_format), replace=replace)
