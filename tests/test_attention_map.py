"""Attention pictures: the heat map against transformers' attention weights, roles against the policy."""
import math
from types import SimpleNamespace

import pytest
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import tinyavl
from tinyavl import attention_map, hires
from tinyavl.attention_map import (COMPUTED, EVICTED, FRAME, HEADER, HEAT, PANEL, SCALE_BAR, STORED, drawable,
                                    draw_attention_map, fitted, image_heat, image_roles, map_layer, seen_image,
                                    token_pictures)
from tinyavl.cache import make_cache
from tinyavl.errors import UserError
from tiny_checkpoints import make_image


def prompt(processor, seed=0):
    return processor(processor.chat_prompt("what is this ?"), image=make_image(50, 40, seed))


@pytest.mark.parametrize("variant", ["mha", "gqa_full"])
def test_heat_is_transformers_last_row_attention(tiny_ckpt, variant):
    model, processor = tinyavl.load_pretrained(tiny_ckpt.folder(variant), device="cpu")
    hf = tiny_ckpt.model(variant)
    hf.set_attn_implementation("eager")
    inputs = prompt(processor)
    with torch.no_grad():
        attentions = hf(**inputs, output_attentions=True).attentions  # per layer (1, H, T, T)
    image = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
    for layer, weights in enumerate(attentions):
        expected = weights[0, :, -1, image].mean(0)  # head mean of the last row, image columns
        heat = image_heat(model, inputs["input_ids"], inputs["pixel_values"], layer)
        assert torch.allclose(heat, expected, atol=1e-5), f"layer {layer}"


def run_policy(model, processor, policy, **params):
    cache = make_cache(policy, **params)
    inputs = prompt(processor, seed=1)
    tinyavl.generate(model, **inputs, max_new_tokens=5, policy=cache)
    return cache


def test_avl_roles_are_core_secondary_and_minor(tiny_ckpt):
    model, processor = tinyavl.load_pretrained(tiny_ckpt.folder("gqa_full"), device="cpu")
    S, C = 0.5, 0.25
    cache = run_policy(model, processor, "avl", S=S, C=C, K=2, P=1.0)
    n = cache.n_img  # 37: 36 patches + CLS ("full" strategy)
    for layer in range(model.config.text.num_hidden_layers):
        roles = image_roles(cache, layer)
        assert int((roles == COMPUTED).sum()) == math.floor(C * n)
        assert int((roles == STORED).sum()) == math.floor(S * n) - math.floor(C * n)
        assert int((roles == EVICTED).sum()) == n - math.floor(S * n)


def test_avl_roles_fall_on_the_tokens_the_cache_holds(tiny_ckpt):
    """Token by token, not only counted: image token i is computed when position n_sys + i sits in the core's
    rows (the layout's rows n_sys .. n_sys + n_core - 1), stored when some other row holds it, else evicted."""
    model, processor = tinyavl.load_pretrained(tiny_ckpt.folder("gqa_full"), device="cpu")
    cache = run_policy(model, processor, "avl", S=0.5, C=0.25, K=2, P=1.0)
    for layer in range(model.config.text.num_hidden_layers):
        rows = cache.pos[layer][0]                                                     # (Hkv, n) positions
        core = {int(p) for p in rows[0, cache.n_sys:cache.n_sys + cache.n_core]}
        held = {int(p) for p in rows.flatten()}
        expected = [COMPUTED if cache.n_sys + i in core else STORED if cache.n_sys + i in held else EVICTED
                    for i in range(cache.n_img)]
        assert image_roles(cache, layer).tolist() == expected, f"layer {layer}"


@pytest.mark.parametrize("policy, params", [("full", {}), ("h2o", {}), ("fastv", {"filter_layer": 1, "R": 0.5}),
                                            ("avl", dict(S=0.5, C=0.25, K=1, P=1.0))])   # every step an update
def test_other_policies_compute_what_they_store(tiny_ckpt, policy, params):
    model, processor = tinyavl.load_pretrained(tiny_ckpt.folder("mha"), device="cpu")
    cache = run_policy(model, processor, policy, **params)
    for layer in range(model.config.text.num_hidden_layers):
        roles = image_roles(cache, layer)
        held = cache.pos[layer][0].flatten()
        in_image = held[(held >= cache.n_sys) & (held < cache.n_sys + cache.n_img)]
        assert int((roles == COMPUTED).sum()) == len(in_image.unique())
        assert not (roles == STORED).any()
    if policy == "full":
        assert (image_roles(cache, 0) == COMPUTED).all()


def test_cells_lie_on_the_pixels_their_patches_cover():
    """A 30 px crop of 7 px patches: 4 x 4 tokens cover its first 28 px a side (the convolution never reads
    the last 2); the picture under the cells is those 28 px, not the 30 spread over 4 cells."""
    vision = SimpleNamespace(patches_per_side=30 // 7, patch_size=7, image_size=30)
    model = SimpleNamespace(config=SimpleNamespace(vision=vision, is_next=False,
                                                               vision_feature_select_strategy="default"))
    processor = SimpleNamespace(image_mean=torch.full((3, 1, 1), 0.5), image_std=torch.full((3, 1, 1), 0.25))
    pixels = torch.randn(1, 3, 30, 30, generator=torch.Generator().manual_seed(0))
    [picture] = token_pictures(model, processor, {"pixel_values": pixels})
    assert picture.grid == (4, 4) and picture.image.size == (28, 28)
    assert picture.image.tobytes() == seen_image(pixels[0, :, :28, :28], processor).tobytes()


def test_picture_marks_each_cell(tiny_ckpt):
    _, processor = tinyavl.load_pretrained(tiny_ckpt.folder("mha"), device="cpu")
    inputs = prompt(processor)
    image = seen_image(inputs["pixel_values"][0], processor)
    assert image.size == (56, 56)
    roles = torch.tensor([EVICTED, STORED, COMPUTED, COMPUTED] * 4)   # 4 x 4 grid
    heat = torch.zeros(16)
    heat[5] = 1.0
    picture = draw_attention_map(image, roles, heat, "test", question="What colour is the square?")
    assert picture.size == (2 * PANEL + 10, HEADER + PANEL + SCALE_BAR)
    cell, top = PANEL // 4, HEADER
    base = image.resize((PANEL, PANEL))
    inside = (cell // 2, cell // 2)  # centre of cell 0 (evicted: darkened)
    assert sum(picture.getpixel((inside[0], top + inside[1]))) < sum(base.getpixel(inside))
    assert picture.getpixel((2 * cell, top)) == FRAME[COMPUTED]        # cell 2's top-left corner: green frame
    assert picture.getpixel((cell, top)) == FRAME[STORED]               # cell 1: yellow frame
    hot = picture.getpixel((PANEL + 10 + cell + cell // 2, top + cell + cell // 2))  # heat cell 5
    cold = picture.getpixel((PANEL + 10 + cell // 2, top + cell // 2))              # heat cell 0
    assert hot[0] > 200 and hot[1] < 100 and cold != hot


def test_a_map_with_more_cells_than_pixels_gets_a_wider_panel(tiny_ckpt):
    """A LLaVA-1.6 config whose canvases are many tiles long can make a map of more than PANEL cells on one
    side: the panel widens to a pixel a cell, and the hottest cell is still the one painted red, on the right panel."""
    _, processor = tinyavl.load_pretrained(tiny_ckpt.folder("mha"), device="cpu")
    image = seen_image(prompt(processor)["pixel_values"][0], processor)
    rows, columns = 2, 1000
    roles, heat = torch.full((rows * columns,), COMPUTED), torch.zeros(rows * columns)
    heat[columns + 700] = 1.0                                          # row 1, column 700
    picture = draw_attention_map(image, roles, heat, "t", grid=(rows, columns))
    assert picture.size == (2 * columns + 10, HEADER + rows + SCALE_BAR)
    hot, cold = picture.getpixel((columns + 10 + 700, HEADER + 1)), picture.getpixel((columns + 10 + 699, HEADER + 1))
    assert hot[0] > 200 and hot[1] < 100 and cold != hot
    tall = draw_attention_map(image, roles, heat, "t", grid=(columns, rows))
    assert tall.size == (2 * PANEL + 10, HEADER + columns + SCALE_BAR)


def test_roles_that_do_not_fill_the_grid_are_refused():
    """One role per cell: 15 roles fill no square grid (3 x 3 holds 9), 16 do not fill a 3 x 4 one; a wrong
    count would otherwise draw cells over the wrong tokens, or leave some out."""
    image = Image.new("RGB", (40, 40))
    with pytest.raises(ValueError, match="15 image tokens do not fill a 3 x 3 grid"):
        draw_attention_map(image, torch.full((15,), COMPUTED), torch.zeros(15), "t")
    with pytest.raises(ValueError, match="16 image tokens do not fill a 3 x 4 grid"):
        draw_attention_map(image, torch.full((16,), COMPUTED), torch.zeros(16), "t", grid=(3, 4))
    assert draw_attention_map(image, torch.full((12,), COMPUTED), torch.zeros(12), "t", grid=(3, 4)).size == \
        (2 * PANEL + 10, HEADER + round(PANEL / 4 * 3) + SCALE_BAR)


def test_picture_shows_the_question_and_a_colour_scale(tiny_ckpt):
    """The question is written above the panels (its line is blank without one), and under the heat panel
    a scale runs from the grey of zero attention to the red of the hottest cell."""
    _, processor = tinyavl.load_pretrained(tiny_ckpt.folder("mha"), device="cpu")
    image = seen_image(prompt(processor)["pixel_values"][0], processor)
    roles, heat = torch.full((16,), COMPUTED), torch.zeros(16)
    heat[5] = 1.0
    asked = draw_attention_map(image, roles, heat, "t", question="What colour is the square?")
    blank = draw_attention_map(image, roles, heat, "t", question="")

    def dark_pixels(picture, box):
        pixels = np.asarray(picture.crop(box)).reshape(-1, 3)
        return int((pixels.sum(-1) < 300).sum())

    question_line = (30, 2, 2 * PANEL, 18)  # right of "Q:"
    assert dark_pixels(asked, question_line) > 20 and dark_pixels(blank, question_line) == 0
    bar_y = HEADER + PANEL + 8
    zero, top = asked.getpixel((PANEL + 10, bar_y)), asked.getpixel((2 * PANEL + 9, bar_y))
    alpha = 220 / 255  # the hottest cell's opacity
    assert zero == (128, 128, 128)
    assert all(abs(got - (128 * (1 - alpha) + red * alpha)) <= 1 for got, red in zip(top, HEAT)), top


def test_text_is_drawn_in_characters_the_font_has():
    """Pillow's bitmap font (its default before 10.1, or without FreeType) has Latin-1 alone and raises on the
    rest; its default FreeType font (Aileron) has ASCII and a few marks and draws the rest as boxes. A
    character the font lacks is drawn as its letter without the accent where the font has that, else as "?";
    a newline as a space (it would draw over the line below)."""
    question = "Q: Wie groß?\n正方形 😀 carré, cafe\u0301"                           # an accent after its e
    bitmap = ImageFont.load_default_imagefont()
    assert drawable(question, bitmap) == "Q: Wie groß? ??? ? carré, café"
    assert drawable("ﬁsh…", bitmap) == "fish..."                                 # a ligature, an ellipsis: NFKD's
    ImageDraw.Draw(Image.new("RGB", (400, 20))).text((0, 0), drawable(question, bitmap), font=bitmap)  # no raise
    default = ImageFont.load_default()
    if isinstance(default, ImageFont.FreeTypeFont):  # Pillow built with FreeType
        assert default.getname()[0] == "Aileron"
        assert drawable(question, default) == "Q: Wie gro?? ??? ? carre, cafe"
        assert drawable("x\u0301", default) == "x"                               # an accent no letter takes: left out


def test_a_line_longer_than_the_picture_is_cut_with_an_ellipsis():
    draw = ImageDraw.Draw(Image.new("RGB", (10, 10)))
    question = "Q: " + "is the circle left of the square? " * 40
    cut = fitted(question, draw, 300)
    assert cut.endswith("...") and question.startswith(cut[:-3]) and draw.textlength(cut) <= 300
    assert draw.textlength(question[:len(cut) - 3 + 1] + "...") > 300                 # one more character would not fit
    assert fitted("Q: short", draw, 300) == "Q: short" and fitted("Q: short", draw, 5) == ""
    exact = draw.textlength("Q: short")                                    # a line exactly as wide as its room
    assert fitted("Q: short", draw, exact) == "Q: short" and fitted("Q: short", draw, exact - 1).endswith("...")
    ellipsis = draw.textlength("...")                                      # room for the ellipsis alone
    assert fitted("Q: short", draw, ellipsis) == "..." and fitted("Q: short", draw, ellipsis - 1) == ""


def test_a_long_question_runs_across_both_panels(drawn_text):
    """The question's line is the picture's whole width less its margins (4 px each side), not a panel's."""
    picture = draw_attention_map(Image.new("RGB", (40, 40)), torch.full((16,), COMPUTED), torch.rand(16), "t",
                                 question="is the circle left of the square? " * 20)
    (length,) = [length for _, text, length in drawn_text if text.startswith("Q: ")]
    widest_character = max(ImageDraw.Draw(picture).textlength(c) for c in "is the circle left of square?")
    assert picture.width - 8 - widest_character < length <= picture.width - 8


def test_the_text_of_a_strip(tiny_ckpt, drawn_text):
    """What a strip writes, recorded as it is drawn: the question, the title, the two panels' captions, the
    count of each role, and under the heat the scale's peak to 3 significant digits (a long prompt's peak may
    be under 0.001, which 3 decimals printed as 0.000), its right end at the bar's. A long question is cut at
    the picture's edge."""
    _, processor = tinyavl.load_pretrained(tiny_ckpt.folder("mha"), device="cpu")
    image = seen_image(prompt(processor)["pixel_values"][0], processor)
    roles = torch.tensor([EVICTED, STORED, COMPUTED, COMPUTED] * 4)   # 4 evicted, 4 stored only, 8 computed
    heat = torch.full((16,), 0.0001)
    heat[5] = 0.000349
    picture = draw_attention_map(image, roles, heat, "image, layer 1, policy avl", question="what is it? " * 30)
    by_text = {line: (xy, length) for xy, line, length in drawn_text}
    question = next(line for line in by_text if line.startswith("Q: what is it?"))
    assert question.endswith("...") and by_text[question][1] <= picture.width - 8
    assert by_text["image, layer 1, policy avl"][0] == (4, 22)
    assert by_text["last prompt token's attention"][0] == (PANEL + 10, 22)
    assert by_text["computed (green) 8, stored only (yellow) 4, evicted (dark) 4"][0] == (4, 40)
    (x, y), length = by_text["0.000349 of the attention"]
    assert x + length == pytest.approx(2 * PANEL + 10) and y > HEADER + PANEL


def test_map_layer_by_hand():
    config = SimpleNamespace(text=SimpleNamespace(num_hidden_layers=4))
    assert [map_layer(config, layer) for layer in (None, 0, 3)] == [3, 0, 3]     # default: the last layer
    for layer in (-1, 4):
        with pytest.raises(UserError, match=r"0\.\.3"):
            map_layer(config, layer)


def test_the_hottest_cell_is_the_red_at_the_end_of_the_scale():
    """Over a grey image the heat panel is grey 128; the hottest cell (0.5 of the attention) gets HEAT at
    opacity 220 / 255, as the scale's right end; a cell of half the peak, opacity int(110) / 255."""
    image = Image.new("RGB", (56, 56), (128, 128, 128))
    roles, heat = torch.full((16,), COMPUTED), torch.zeros(16)
    heat[5], heat[6], heat[0] = 0.5, 0.25, 0.25
    picture = draw_attention_map(image, roles, heat, "t")
    cell = PANEL // 4

    def at(index):
        row, column = divmod(index, 4)
        return picture.getpixel((PANEL + 10 + column * cell + cell // 2, HEADER + row * cell + cell // 2))

    for index, alpha in ((5, 220), (6, 110)):
        expected = [128 * (1 - alpha / 255) + red * alpha / 255 for red in HEAT]
        assert all(abs(got - want) <= 1 for got, want in zip(at(index), expected)), index
    # The scale's last column (under the heat panel, 4 px below it) is that very colour.
    assert picture.getpixel((PANEL + 10 + PANEL - 1, HEADER + PANEL + 4 + 5)) == at(5)


def test_the_cls_token_has_no_cell(tiny_ckpt):
    """gqa_full keeps CLS: 37 image tokens, CLS first, then the 6 x 6 patches."""
    model, processor = tinyavl.load_pretrained(tiny_ckpt.folder("gqa_full"), device="cpu")
    inputs = processor(processor.chat_prompt("what is this ?"), image=make_image(50, 40, 0))
    (picture,) = token_pictures(model, processor, inputs)
    assert picture.tokens.tolist() == list(range(1, 37)) and picture.grid == (6, 6)


def test_the_map_draws_each_patch_with_its_own_role_and_heat(tiny_ckpt, tmp_path, monkeypatch):
    """gqa_full keeps CLS, image token 0: the map's cells are tokens 1 .. 36's roles and heat, and the blocks
    FlexAttention's selection frames come from those 36 cells' heat, not from tokens 0 .. 35."""
    from tinyavl import attention_map, hires
    model, processor = tinyavl.load_pretrained(tiny_ckpt.folder("gqa_full"), device="cpu")
    inputs = prompt(processor, seed=1)
    cache = make_cache("avl", S=0.5, C=0.25, K=2, P=1.0)
    tinyavl.generate(model, **inputs, max_new_tokens=5, policy=cache)
    drawn, draw = [], attention_map.draw_attention_map
    monkeypatch.setattr(attention_map, "draw_attention_map", lambda *args: drawn.append(args) or draw(*args))
    attention_map.save_attention_map(tmp_path / "m.png", model, processor, inputs, cache, layer=1, hires_threshold=48)
    (_, cells, heat, *_, blocks, _), = drawn
    roles = image_roles(cache, 1)                                                    # (37,) CLS first
    every_heat = image_heat(model, inputs["input_ids"], inputs["pixel_values"], 1)   # (37,)
    assert torch.equal(cells, roles[1:]) and torch.equal(heat, every_heat[1:])
    assert not torch.equal(cells, roles[:-1]) or not torch.equal(heat, every_heat[:-1])  # the offset shows
    assert torch.equal(blocks, hires.select_blocks(every_heat[1:][None], (6, 6), 48, 6)[0])


def test_the_bitmap_font_draws_latin_1_and_nothing_past_it():
    """Pillow's bitmap font has U+0000-U+00FF: "ÿ" (U+00FF) is drawn as itself, "Ā" (U+0100, the first
    character past Latin-1) as its letter without the macron, since the font raises on it."""
    bitmap = ImageFont.load_default_imagefont()
    assert drawable("ÿĀ", bitmap) == "ÿA"
    ImageDraw.Draw(Image.new("RGB", (40, 20))).text((0, 0), drawable("ÿĀ", bitmap), font=bitmap)   # no raise


def test_a_tiled_map_padded_above_and_below_is_cropped_to_its_rows(tiny_ckpt):
    """A 100 x 20 image on the tiny LLaVA-1.6's 28 px tiles: a 1 x 3 canvas (28 x 84 px) and a 4 x 12 map, of
    which int(20 x 12 / 100) = 2 rows show the image, after 1 row of padding: rows 1..2 (7..21 px), every
    column. The picture is the tiles side by side, cropped to those pixels; the tokens are rows 1..2 of the
    map, each row 12 tokens and a newline, after the base crop's 16."""
    model, processor = tinyavl.load_pretrained(tiny_ckpt.folder("next_vicuna_gqa"), device="cpu")
    image = make_image(100, 20, seed=3)
    base, tiled = token_pictures(model, processor, processor(processor.chat_prompt("what?"), image))
    assert tiled.grid == (2, 12) and tiled.image.size == (84, 14)
    canvas = Image.new("RGB", (84, 28))
    for i, tile in enumerate(processor.anyres_crops(image)[1:]):
        canvas.paste(tile, (28 * i, 0))
    expected = np.asarray(canvas.crop((0, 7, 84, 21)), dtype=int)
    assert np.abs(np.asarray(tiled.image, dtype=int) - expected).max() <= 1
    assert tiled.tokens.tolist() == [16 + 13 * row + column for row in range(2) for column in range(12)]


def test_an_image_wider_than_the_map_has_rows_shows_its_base_crop_alone(tiny_ckpt):
    """300 x 2 px: int(2 x 12 / 300) = 0 rows of the 4 x 12 map show the image, so there is no tiled picture."""
    model, processor = tinyavl.load_pretrained(tiny_ckpt.folder("next_vicuna_gqa"), device="cpu")
    pictures = token_pictures(model, processor, processor(processor.chat_prompt("what?"), make_image(300, 2, seed=3)))
    assert [picture.label for picture in pictures] == ["base crop"]


def test_the_header_counts_each_role(drawn_text):
    roles = torch.tensor([EVICTED] * 3 + [STORED] * 5 + [COMPUTED] * 8)
    draw_attention_map(Image.new("RGB", (40, 40)), roles, torch.rand(16), "t")
    assert "computed (green) 8, stored only (yellow) 5, evicted (dark) 3" in [text for _, text, _ in drawn_text]


def test_the_colour_scale_sits_under_a_panel_shorter_than_wide(drawn_text):
    """A 3 x 4 grid: cells of PANEL / 4 = 96 px, a panel 288 px tall; the bar starts 4 px below it and its
    "0" 12 px below the bar's top."""
    picture = draw_attention_map(Image.new("RGB", (40, 30)), torch.full((12,), COMPUTED), torch.rand(12), "t",
                                 grid=(3, 4))
    assert picture.getpixel((PANEL + 10, HEADER + 288 + 4 + 5)) == (128, 128, 128)
    assert [xy for xy, text, _ in drawn_text if text == "0"] == [(PANEL + 10, HEADER + 288 + 4 + 12)]


def test_the_saved_map_is_titled_with_its_layer_policy_and_blocks(tiny_ckpt, tmp_path, monkeypatch):
    """The title names the layer and policy; the footnote counts the blocks FlexAttention's selection takes
    at the threshold (`hires.select_blocks` on the layer's heat, 6 x 6 blocks of the 6 x 6 grid)."""
    model, processor = tinyavl.load_pretrained(tiny_ckpt.folder("gqa_full"), device="cpu")
    inputs = processor(processor.chat_prompt("what is this ?"), image=make_image(50, 40, 1))
    cache = make_cache("avl", S=0.5, C=0.25, K=2, P=1.0)
    tinyavl.generate(model, **inputs, max_new_tokens=5, policy=cache)
    drawn, draw = [], attention_map.draw_attention_map
    monkeypatch.setattr(attention_map, "draw_attention_map", lambda *args: drawn.append(args) or draw(*args))
    attention_map.save_attention_map(tmp_path / "m.png", model, processor, inputs, cache, layer=1, hires_threshold=48)
    [args] = drawn
    heat = attention_map.image_heat(model, inputs["input_ids"], inputs["pixel_values"], 1)[1:]   # past the CLS
    chosen = int(hires.select_blocks(heat[None], (6, 6), 48, 6)[0].sum())
    assert chosen != 36 - chosen                                  # a count told from its complement
    assert args[3] == "image, layer 1, policy avl"
    assert args[7] == f"FlexAttention's selection (blue, threshold 48): {chosen} of 36 blocks"


def test_the_map_is_a_png_whatever_the_suffix_case_and_keeps_a_file(tiny_ckpt, tmp_path):
    model, processor = tinyavl.load_pretrained(tiny_ckpt.folder("mha"), device="cpu")
    inputs = processor(processor.chat_prompt("what is this ?"), image=make_image(50, 40, 1))
    cache = make_cache("full")
    tinyavl.generate(model, **inputs, max_new_tokens=2, policy=cache)
    attention_map.save_attention_map(tmp_path / "m.PNG", model, processor, inputs, cache)
    with Image.open(tmp_path / "m.PNG") as picture:
        assert picture.format == "PNG"
    existing = tmp_path / "mine.png"
    existing.write_text("the user's")
    with pytest.raises(UserError):
        attention_map.save_attention_map(existing, model, processor, inputs, cache)
    assert existing.read_text() == "the user's"


def test_the_seen_image_rounds_to_the_nearest_level():
    processor = SimpleNamespace(image_mean=torch.zeros(3, 1, 1), image_std=torch.ones(3, 1, 1))
    assert seen_image(torch.full((3, 1, 1), 0.999), processor).getpixel((0, 0)) == (255, 255, 255)   # 254.7 -> 255


def test_the_panels_pixels_by_hand():
    """The heat panel is the image half grey under the heat, whatever the roles; in the roles panel an evicted
    cell is the image darkened by 170/255, and a computed cell's frame is 2 px wide."""
    colour = (200, 100, 40)
    image = Image.new("RGB", (56, 56), colour)
    heat = torch.zeros(16)
    heat[5] = 1.0
    right = (PANEL + 10, HEADER, 2 * PANEL + 10, HEADER + PANEL)
    drawn = [draw_attention_map(image, torch.full((16,), role), heat, "t") for role in (COMPUTED, EVICTED)]
    assert drawn[0].crop(right).tobytes() == drawn[1].crop(right).tobytes()    # the roles never reach the heat
    cell = PANEL // 4
    cold = drawn[1].getpixel((PANEL + 10 + cell // 2, HEADER + cell // 2))     # heat 0: half grey
    assert all(abs(got - (c + 128) / 2) <= 1 for got, c in zip(cold, colour))
    evicted = drawn[1].getpixel((cell // 2, HEADER + cell // 2))
    assert all(abs(got - c * (1 - 170 / 255)) <= 1 for got, c in zip(evicted, colour))
    assert drawn[0].getpixel((cell + 1, HEADER + 1)) == FRAME[COMPUTED]        # a frame's second pixel
