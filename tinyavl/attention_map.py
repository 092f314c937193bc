"""Attention pictures: what a KV policy kept of the image, and where the model looks.

    python main.py --image weights/toy/examples/scene-0.png --policy avl --attention-map out.png

Two panels over the image the vision tower saw, one cell per image token of a chosen decoder layer:
- left, the policy's decision for that layer at the end of generation: computed (green frame; for
  A-VL the core), stored but not computed (yellow frame; A-VL's secondary tokens) and evicted
  (darkened). Policies other than A-VL compute every image token they store.
- right, the last prompt token's attention over the image tokens in that layer (mean over heads, dense
  attention): where the model looks when it starts to answer. The colour scale under it runs from 0 to
  the largest share one token receives.
The question and the counts of each role are written above the panels.
"""
import math
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from tinyavl.attention_stats import record_attention
from tinyavl.cache import AVLCache, KVCache
from tinyavl.errors import UserError
from tinyavl.files import write_file_atomically

EVICTED, STORED, COMPUTED = 0, 1, 2
FRAME = {COMPUTED: (40, 220, 70), STORED: (250, 210, 40)}
PANEL = 384  # px per panel side
HEADER = 40  # px above the panels: the question, then the title
SCALE = 34   # px below them: the heat map's colour scale
HEAT = (255, 30, 30)


def image_heat(model, input_ids, pixel_values, layer: int) -> torch.Tensor:
    """(n_img,) the last prompt token's dense attention over the image tokens in `layer` (head mean)."""
    recorder, _ = record_attention(model, input_ids, pixel_values, max_new_tokens=1)  # the prefill only
    return recorder.image_row(0, layer)


def image_roles(cache: KVCache, layer: int) -> torch.Tensor:
    """(n_img,) EVICTED / STORED / COMPUTED for each image token of a layer, read off the cache's positions.

    A token counts as stored when any KV head keeps it."""
    image_positions = torch.arange(cache.n_sys, cache.n_sys + cache.n_img)            # (n_img,)
    held = cache.pos[layer][0].flatten().cpu()                                          # (Hkv * n,)
    roles = torch.isin(image_positions, held).long() * STORED
    if isinstance(cache, AVLCache):  # only A-VL computes fewer image rows than it stores
        core_positions = cache.pos[layer][0, 0, cache.core[layer]].cpu()
        roles[torch.isin(image_positions, core_positions)] = COMPUTED
    else:
        roles[roles == STORED] = COMPUTED
    return roles


def seen_image(pixel_values, processor) -> Image.Image:
    """The vision tower's input (1, 3, H, W), un-normalised back into an RGB picture."""
    x = pixel_values[0].float().cpu() * processor.image_std + processor.image_mean   # (3, H, W) in [0, 1]
    x = (x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).contiguous()             # (H, W, 3)
    return Image.fromarray(x.numpy())


def draw_attention_map(image: Image.Image, roles: torch.Tensor, heat: torch.Tensor, title: str,
                       question: str = "") -> Image.Image:
    """Two panels (roles | heat) over `image`, one grid cell per image token (a square grid of patches,
    after CLS if the model keeps it), the question and title above, the heat's colour scale below."""
    side = math.isqrt(len(roles))
    if side * side == len(roles) - 1:  # the "full" feature strategy keeps CLS first: it has no cell
        roles, heat = roles[1:], heat[1:]
    elif side * side != len(roles):
        raise ValueError(f"{len(roles)} image tokens do not form a square grid of patches")
    cell = PANEL / side
    base = image.resize((PANEL, PANEL), Image.Resampling.NEAREST)
    canvas = Image.new("RGB", (2 * PANEL + 10, HEADER + PANEL + SCALE), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), f"Q: {question}", fill=(0, 0, 0))
    draw.text((4, 22), title, fill=(0, 0, 0))
    top = HEADER

    # Left: the policy's roles. Evicted cells are darkened, the others framed by role.
    left = base.copy()
    shade = ImageDraw.Draw(left, "RGBA")
    for i, role in enumerate(roles.tolist()):
        box = _cell_box(i, side, cell)
        if role == EVICTED:
            shade.rectangle(box, fill=(0, 0, 0, 170))
        else:
            shade.rectangle(box, outline=FRAME[role], width=2)
    canvas.paste(left, (0, top))

    # Right: the heat map, red with opacity proportional to attention (max = opaque-ish).
    right = Image.blend(base, Image.new("RGB", base.size, (128, 128, 128)), 0.5)
    glow = ImageDraw.Draw(right, "RGBA")
    peak = float(heat.max()) or 1.0
    for i, value in enumerate(heat.tolist()):
        glow.rectangle(_cell_box(i, side, cell), fill=(*HEAT, int(220 * value / peak)))
    canvas.paste(right, (PANEL + 10, top))

    # The colour scale: the same red over the same grey, from 0 (left) to the peak share (right).
    bar = Image.new("RGB", (PANEL, 10), (128, 128, 128))
    ramp = ImageDraw.Draw(bar, "RGBA")
    for x in range(PANEL):
        ramp.line([(x, 0), (x, 9)], fill=(*HEAT, int(220 * x / (PANEL - 1))))
    bar_top = top + PANEL + 4
    canvas.paste(bar, (PANEL + 10, bar_top))
    draw.text((PANEL + 10, bar_top + 12), "0", fill=(0, 0, 0))
    label = f"{peak:.3f} of the attention"
    draw.text((2 * PANEL + 10 - 6 * len(label) - 2, bar_top + 12), label, fill=(0, 0, 0))
    return canvas


def _cell_box(index: int, side: int, cell: float):
    row, col = divmod(index, side)
    return (round(col * cell), round(row * cell), round((col + 1) * cell) - 1, round((row + 1) * cell) - 1)


def map_layer(model, layer: int | None) -> int:
    """The decoder layer to draw: `layer` checked, or the last one."""
    n_layers = model.config.text.num_hidden_layers
    if layer is None:
        return n_layers - 1
    if not 0 <= layer < n_layers:
        raise UserError(f"the map layer must be in 0..{n_layers - 1} (the decoder's layers), got {layer}")
    return layer


def save_attention_map(path, model, processor, inputs, cache: KVCache, layer: int | None = None,
                       question: str = "") -> None:
    """Draw the picture for a finished generation (its `inputs` and the `cache` it ran with) to `path`,
    written atomically.

    layer: the decoder layer to show; default the last one. question: the text shown above the panels."""
    layer = map_layer(model, layer)
    heat = image_heat(model, inputs["input_ids"], inputs["pixel_values"], layer)
    roles = image_roles(cache, layer)
    counts = {name: int((roles == role).sum()) for name, role in
              (("computed", COMPUTED), ("stored", STORED), ("evicted", EVICTED))}
    title = (f"layer {layer}, policy {cache.name}: computed (green) {counts['computed']}, stored only (yellow) "
             f"{counts['stored']}, evicted (dark) {counts['evicted']}  |  last prompt token's attention")
    picture = draw_attention_map(seen_image(inputs["pixel_values"], processor), roles, heat, title, question)
    image_format = Image.registered_extensions().get(Path(path).suffix.lower())  # the partial file has no suffix
    write_file_atomically(path, lambda partial: picture.save(partial, format=image_format))
