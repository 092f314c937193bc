"""tinyavl.processing against transformers' CLIPImageProcessor (PIL backend) and LlavaProcessor.

Images are generated here (noise + gradients, fixed seeds); the tokenizer is the tiny Llama-style
tokenizer.json of tests/tiny_tokenizer.py.
"""
import functools
import io
import json
import os
import struct
import tempfile
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile, ImageOps
from tokenizers import AddedToken, Tokenizer
from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, LlavaProcessor
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from tiny_tokenizer import build_tiny_tokenizer, write_tiny_tokenizer
from tinyavl.errors import UserError
from tinyavl import processing
from tinyavl.processing import Processor, load_image

SIZE, PATCH = 28, 14
NUM_IMAGE_TOKENS = (SIZE // PATCH) ** 2  # 4: CLIP patches of a 28x28 crop, CLS dropped


def make_image(width, height, seed=0):
    """Noise on top of gradients (red across, green down), so that resize or crop errors show."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randint(0, 256, (height, width, 3), generator=g)
    ramp_x = torch.linspace(0, 255, width).expand(height, width)
    ramp_y = torch.linspace(0, 255, height)[:, None].expand(height, width)
    ramps = torch.stack([ramp_x, ramp_y, (ramp_x + ramp_y) / 2], dim=-1)  # [H, W, 3]
    pixels = ((noise + ramps) / 2).round().to(torch.uint8)  # [H, W, 3]
    return Image.fromarray(pixels.numpy())


def hf_pixels(image, shortest_edge, crop):
    hf = CLIPImageProcessorPil(size={"shortest_edge": shortest_edge}, crop_size={"height": crop, "width": crop})
    return hf(image, return_tensors="pt")["pixel_values"][0]  # [3, crop, crop]


@functools.cache
def tiny_tokenizer() -> Tokenizer:
    with tempfile.TemporaryDirectory() as d:
        write_tiny_tokenizer(d)
        return Tokenizer.from_file(os.path.join(d, "tokenizer.json"))


def processor_for(crop=SIZE, shortest_edge=None):
    return Processor(tiny_tokenizer(), image_id(), NUM_IMAGE_TOKENS, image_size=crop,
                     shortest_edge=shortest_edge or crop)


def image_id():
    return tiny_tokenizer().token_to_id("<image>")


def assert_close(ours, theirs, atol=1e-5):
    assert ours.shape == theirs.shape and ours.dtype == torch.float32
    err = (ours - theirs.float()).abs()
    assert err.max() <= atol, f"max |diff| {err.max():.3g}, mean {err.mean():.3g}"


# ---------------------------------------------------------------- preprocessing vs transformers

@pytest.mark.parametrize("crop, shortest_edge", [(336, 336), (30, 30), (28, 28), (30, 20)])
@pytest.mark.parametrize("width, height", [(500, 375), (375, 500), (337, 1000), (100, 60), (31, 29), (7, 5)])
def test_preprocess_matches_transformers(crop, shortest_edge, width, height):
    # (30, 20): the short side is resized below the crop, so both pad the crop with black.
    image = make_image(width, height, seed=width * height)
    ours = processor_for(crop=crop, shortest_edge=shortest_edge).preprocess(image)
    assert ours.shape == (3, crop, crop)
    assert_close(ours, hf_pixels(image, shortest_edge, crop))


@pytest.mark.parametrize("width, height", [(50, 31), (31, 50), (40, 40), (7, 30), (301, 40)])
def test_do_pad_centres_the_image_on_a_square_of_the_mean_colour_like_transformers(width, height):
    """LLaVA-1.5 with do_pad: pad to a square of the mean colour first, then resize and crop, as transformers'
    LlavaImageProcessor (PIL backend) does; a square image is unchanged, and the hires view pads alike."""
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    ours = Processor(tiny_tokenizer(), image_id(), NUM_IMAGE_TOKENS, image_size=SIZE, shortest_edge=SIZE,
                     image_mean=mean, image_std=std, pad_to_square=True, hires_scale=2)
    image = make_image(width, height, seed=width + height)
    inputs = ours(ours.chat_prompt("What is it?"), image)
    hf = LlavaImageProcessorPil(do_pad=True, size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE},
                                image_mean=mean, image_std=std)
    assert_close(inputs["pixel_values"][0], hf(image, return_tensors="pt")["pixel_values"][0])
    hf_hires = LlavaImageProcessorPil(do_pad=True, size={"shortest_edge": 2 * SIZE},
                                      crop_size={"height": 2 * SIZE, "width": 2 * SIZE}, image_mean=mean, image_std=std)
    assert_close(inputs["hires_pixel_values"][0], hf_hires(image, return_tensors="pt")["pixel_values"][0])


def test_resize_truncates_long_side_and_crop_floors():
    # 337x1000 -> 336x997 (336 * 1000 / 337 = 997.03, truncated); crop top = (997 - 336) // 2 = 330.
    image = make_image(337, 1000, seed=1)
    resized = image.resize((336, 997), Image.Resampling.BICUBIC).crop((0, 330, 336, 666))
    expected = torch.tensor(np.asarray(resized), dtype=torch.float32).permute(2, 0, 1) / 255
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)  # CLIP's, as in llava.md
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
    expected = (expected - mean) / std
    assert_close(processor_for(crop=336).preprocess(image), expected, atol=1e-6)


# ---------------------------------------------------------------- image files and modes

def _save(image, path, **kw):
    image.save(path, **kw)
    return path


def test_modes_convert_like_transformers(tmp_path):
    base = make_image(45, 33, seed=3)
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(base.size))  # alpha 0..255 across rows
    palette = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    files = {
        "L": _save(base.convert("L"), tmp_path / "l.png"),
        "LA": _save(rgba.convert("LA"), tmp_path / "la.png"),
        "RGBA": _save(rgba, tmp_path / "rgba.png"),
        "P": _save(palette, tmp_path / "p.png"),
        "P+transparency": _save(palette, tmp_path / "pt.png", transparency=3),
        "CMYK": _save(base.convert("CMYK"), tmp_path / "cmyk.tiff"),
        "1": _save(base.convert("1"), tmp_path / "one.png"),
    }
    for name, path in files.items():
        with Image.open(path) as original:
            original.load()
            assert original.mode == name.split("+")[0], name
            rgb = load_image(path)
            assert rgb.mode == "RGB" and rgb.size == base.size, name
            assert_close(processor_for().preprocess(path), hf_pixels(original, SIZE, SIZE))


def test_transparency_goes_on_white(tmp_path):
    image = Image.new("RGBA", (4, 1), (10, 20, 30, 255))
    image.putpixel((1, 0), (10, 20, 30, 0))  # fully transparent
    image.putpixel((2, 0), (0, 0, 0, 128))  # half transparent black
    rgb = load_image(_save(image, tmp_path / "a.png"))
    assert [rgb.getpixel((x, 0)) for x in range(3)] == [(10, 20, 30), (255, 255, 255), (127, 127, 127)]
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 200, 100, 50])
    palette.putpixel((1, 0), 1)
    rgb = load_image(_save(palette, tmp_path / "p.png", transparency=0))
    assert [rgb.getpixel((x, 0)) for x in range(2)] == [(255, 255, 255), (200, 100, 50)]


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_exif_orientation_is_applied(tmp_path, suffix):
    """A file whose EXIF says "rotate 90 clockwise to view" (orientation 6) is read upright: its stored
    top-left pixel ends at the top right, and width and height trade places."""
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 10, 10))                      # a red block at the stored top left
    exif = Image.Exif()
    exif[0x0112] = 6                                                # Orientation
    path = tmp_path / f"sideways{suffix}"
    stored.save(path, exif=exif, **({"quality": 100} if suffix == ".jpg" else {}))
    upright = load_image(path)
    assert upright.size == (20, 40)
    red, blue = upright.getpixel((15, 4)), upright.getpixel((4, 4))
    assert red[0] > 200 and red[2] < 60 and blue[2] > 200 and blue[0] < 60, (red, blue)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_turns_as_pillow_turns_it(tmp_path, orientation):
    """Against Pillow's own ImageOps.exif_transpose, on a picture whose every pixel differs."""
    stored = Image.frombytes("RGB", (6, 4), bytes(range(72)))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = _save(stored, tmp_path / "o.png", exif=exif)
    with Image.open(path) as img:
        img.load()
        reference = ImageOps.exif_transpose(img)
    got = load_image(path)
    assert got.size == reference.size and got.tobytes() == reference.convert("RGB").tobytes()


def test_a_damaged_exif_block_still_turns_the_image(tmp_path):
    """An EXIF block with orientation 6 beside a malformed entry (tag 0x0124, an ASCII value 4 bytes long
    whose bytes are no text): Pillow's exif_transpose fails rewriting it; the picture is still read, upright."""
    exif = bytes.fromhex("4578696600004d4d002a000000080002012400020000000443ce6d99"
                         "01120003000000010006000000000000")
    path = tmp_path / "damaged.jpg"
    make_image(8, 6, seed=3).save(path, exif=exif, quality=95)
    assert load_image(path).size == (6, 8)


def test_pillows_warning_of_a_corrupt_exif_block_is_not_shown(tmp_path):
    """A JPEG whose EXIF block is cut short: Pillow warns as it opens the file ("Corrupt EXIF data"), a warning
    about its parser that a user running main.py cannot act on. The picture is read; nothing is printed."""
    path = tmp_path / "corrupt-exif.jpg"
    make_image(8, 6, seed=3).save(path, exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x05", quality=95)
    with pytest.warns(UserWarning, match="Corrupt EXIF"), Image.open(path) as img:    # Pillow's own
        img.load()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(path).size == (8, 6)


def test_16_bit_grey_with_a_transparent_value_goes_on_white_there_only(tmp_path):
    """A 16-bit grey PNG's tRNS names one 16-bit value: only pixels of that value are transparent (on white),
    not those that share its high byte, which the 8-bit picture keeps (v >> 8)."""
    values = [10400, 10401, 10300, 0, 65535]              # the first transparent; the next two share its high byte
    image = Image.new("I;16", (5, 1))
    image.putdata(values)
    rgb = load_image(_save(image, tmp_path / "g16t.png", transparency=10400))
    assert [rgb.getpixel((x, 0)) for x in range(5)] == [(255,) * 3, (40,) * 3, (40,) * 3, (0,) * 3, (255,) * 3]


def test_16_bit_grey_keeps_the_high_byte(tmp_path):
    values = [0, 255, 256, 511, 1000, 12345, 40000, 65280, 65535]  # 9 pixels
    expected = [0, 0, 1, 1, 3, 48, 156, 255, 255]  # v >> 8, by hand
    little = Image.new("I;16", (9, 1))
    little.putdata(values)
    big = Image.frombytes("I;16B", (9, 1), b"".join(v.to_bytes(2, "big") for v in values))
    for image in (load_image(_save(little, tmp_path / "g16.png")), load_image(_save(little, tmp_path / "g16.tiff"))):
        assert [image.getpixel((x, 0)) for x in range(9)] == [(v, v, v) for v in expected]
    # (transformers would clip all but the first two values to 255.) In-memory images convert the same way:
    for image in (big, little.convert("I")):
        pixels = processor_for().preprocess(image)
        assert_close(pixels, processor_for().preprocess(Image.frombytes("L", (9, 1), bytes(expected))))


def test_32_bit_grey_within_8_bits_is_read_as_transformers_reads_it():
    """A mode "I" image whose values lie in 0..255 (a 32-bit integer TIFF, `convert("I")` of an 8-bit grey
    image) is 8-bit data: kept as it is, not taken for 16-bit data (which would make it black)."""
    image = Image.new("I", (9, 1))
    image.putdata([0, 1, 17, 64, 128, 200, 254, 255, 90])
    assert_close(processor_for().preprocess(image), hf_pixels(image, SIZE, SIZE))


def test_float_image_is_read_as_0_to_255():
    image = Image.new("F", (3, 1))
    image.putdata([-3.0, 100.2, 300.0])
    assert_close(processor_for().preprocess(image), hf_pixels(image, SIZE, SIZE))


@pytest.mark.parametrize("size", [(0, 5), (5, 0), (0, 0)])
def test_an_image_object_without_pixels_is_a_user_error(size):
    """PIL makes a 0-pixel-wide image (no file it decodes holds one): the Python API says so in one line."""
    processor = processor_for()
    with pytest.raises(UserError, match=rf"the image is {size[0]}x{size[1]} pixels: it has no pixel to read"):
        processor(processor.chat_prompt("What is it?"), Image.new("RGB", size))


def test_bad_image_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_image(tmp_path / "missing.png")
    # A link to a missing file, and two links to each other: the link is what is wrong, not the path typed.
    (tmp_path / "dangling.png").symlink_to(tmp_path / "missing.png")
    (tmp_path / "loop-a.png").symlink_to(tmp_path / "loop-b.png")
    (tmp_path / "loop-b.png").symlink_to(tmp_path / "loop-a.png")
    for link in ("dangling.png", "loop-a.png"):
        with pytest.raises(UserError, match=f"{link} is a link to nothing that exists"):
            load_image(tmp_path / link)
    (tmp_path / "notes.jpg").write_text("not an image\n")
    with pytest.raises(UserError, match="not an image"):
        load_image(tmp_path / "notes.jpg")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    for fmt in ("png", "jpg"):
        path = _save(make_image(64, 48, seed=4), tmp_path / f"full.{fmt}")
        data = path.read_bytes()
        (tmp_path / f"cut.{fmt}").write_bytes(data[: len(data) // 2])
        with pytest.raises(UserError, match="damaged or truncated") as err:
            load_image(tmp_path / f"cut.{fmt}")
        assert "\n" not in str(err.value)


def damaged_tiff(path):
    """A TIFF whose StripOffsets tag (273) is typed FLOAT (11), not LONG: Pillow's decoder raises TypeError."""
    buffer = io.BytesIO()
    Image.new("RGB", (30, 24), (10, 20, 30)).save(buffer, "TIFF")
    data = bytearray(buffer.getvalue())
    ifd = struct.unpack("<I", data[4:8])[0]                                # little-endian ("II") by Pillow
    for entry in range(ifd + 2, ifd + 2 + 12 * struct.unpack("<H", data[ifd:ifd + 2])[0], 12):
        if struct.unpack("<H", data[entry:entry + 2])[0] == 273:
            data[entry + 2:entry + 4] = struct.pack("<H", 11)
    path.write_bytes(data)
    return path


def unknown_dds(path):
    """A DDS whose pixel format flags are 0, a format Pillow does not know: NotImplementedError."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buffer, "DDS")
    data = bytearray(buffer.getvalue())
    data[80:84] = struct.pack("<I", 0)                                     # DDS_PIXELFORMAT.dwFlags
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("make, raised", [(damaged_tiff, TypeError), (unknown_dds, NotImplementedError)],
                         ids=["tiff_tag_of_the_wrong_type", "dds_of_an_unknown_format"])
def test_files_pillow_fails_on_with_other_errors_are_one_line(tmp_path, make, raised):
    path = make(tmp_path / f"bad.{make.__name__}")
    with pytest.raises(raised), Image.open(path) as img:                   # what Pillow itself raises
        img.load()
    with pytest.raises(UserError, match="damaged or truncated, or a variant of its format") as err:
        load_image(path)
    assert "\n" not in str(err.value)


def test_a_bug_after_the_file_is_decoded_is_not_called_a_damaged_file(tmp_path, monkeypatch):
    """Only opening and decoding the file can find it damaged: an error in tinyavl's own conversion after
    that is a bug, and keeps its traceback."""
    path = _save(make_image(8, 6, seed=1), tmp_path / "fine.png")
    monkeypatch.setattr(processing, "to_rgb", lambda img: (_ for _ in ()).throw(TypeError("a bug")))
    with pytest.raises(TypeError, match="a bug"):
        load_image(path)


# ---------------------------------------------------------------- prompts and token ids

@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_tokenizer")
    write_tiny_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def processor(folder):
    return Processor.from_pretrained(folder, image_id(), NUM_IMAGE_TOKENS, vision_image_size=SIZE)


@pytest.fixture(scope="module")
def hf_processor(folder):
    return LlavaProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": SIZE},
                                                                crop_size={"height": SIZE, "width": SIZE}),
                          tokenizer=AutoTokenizer.from_pretrained(folder), patch_size=PATCH,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)


def test_a_prompt_whose_image_token_the_tokenizer_splits_is_one_line():
    """<image> as a single-word added token is matched only between word boundaries: glued to its
    neighbours ("USER:<image>hi") it is encoded as pieces, and the prompt holds no image token to widen.
    One line says so (the widening's list.index raised a bare ValueError)."""
    tok = build_tiny_tokenizer()
    tok.add_special_tokens([AddedToken("<image>", normalized=False, special=True, single_word=True)])
    glued = Processor(tok, tok.token_to_id("<image>"), NUM_IMAGE_TOKENS, SIZE, shortest_edge=SIZE)
    image = make_image(50, 40, seed=5)
    assert (glued("USER: <image>\nhi ASSISTANT:", image=image)["input_ids"] == image_id()).sum() == NUM_IMAGE_TOKENS
    with pytest.raises(UserError, match=f"does not encode <image> in this prompt as its token \\(id {image_id()}\\)"):
        glued("USER:<image>hi ASSISTANT:", image=image)


QUESTIONS = ["What is in the image?", "Describe the picture in detail.", "How many shapes?\nAnswer briefly.",
             "Wie viele Kreise? 😀", "  spaces  around  "]


@pytest.mark.parametrize("question", QUESTIONS)
def test_ids_match_llava_processor(processor, hf_processor, question):
    image = make_image(50, 40, seed=5)
    ours = processor(processor.chat_prompt(question), image)
    theirs = hf_processor(images=image, text=processor.chat_prompt(question), return_tensors="pt")
    assert ours["input_ids"].dtype == torch.long and ours["input_ids"].shape[0] == 1
    assert ours["input_ids"].tolist() == theirs["input_ids"].tolist()
    assert_close(ours["pixel_values"], theirs["pixel_values"])
    assert ours["pixel_values"].shape == (1, 3, SIZE, SIZE)

    ids = ours["input_ids"][0].tolist()
    bos, eos = (processor.tokenizer.token_to_id(token) for token in ("<s>", "</s>"))  # its post-processor's BOS
    assert ids[0] == bos and eos not in ids
    at = ids.index(processor.image_token_id)
    assert ids.count(processor.image_token_id) == NUM_IMAGE_TOKENS
    assert ids[at:at + NUM_IMAGE_TOKENS] == [processor.image_token_id] * NUM_IMAGE_TOKENS
    # Widening the one <image> id after tokenising = repeating "<image>" in the text before.
    expanded = processor.chat_prompt(question).replace("<image>", "<image>" * NUM_IMAGE_TOKENS)
    assert ids == processor.tokenizer.encode(expanded).ids


@pytest.mark.parametrize("question", QUESTIONS)
def test_text_only_prompt(processor, folder, question):
    prompt = processor.chat_prompt(question, has_image=False)
    assert prompt == f"USER: {question} ASSISTANT:"
    out = processor(prompt)
    assert out["pixel_values"] is None
    assert out["input_ids"].tolist() == [AutoTokenizer.from_pretrained(folder)(prompt)["input_ids"]]


def test_prompt_errors(processor):
    image = make_image(20, 20)
    with pytest.raises(UserError, match="no <image>"):
        processor("USER: What is this? ASSISTANT:", image)
    with pytest.raises(UserError, match="no image was given"):
        processor(processor.chat_prompt("What is this?"))
    with pytest.raises(UserError, match="one image per prompt"):
        processor("USER: <image>\n<image>\nSame? ASSISTANT:", image)
    with pytest.raises(UserError, match="not found"):
        processor(processor.chat_prompt("What?"), "no/such/image.png")
    # An unset $VARIABLE, or only characters that draw nothing (zero-width space, joiner, byte-order mark; a control
    # character; a variation selector, the Hangul filler): the model would answer no question.
    for blank in ("", "  \n\t", "\u200b", " \u200d\ufeff\n", "\x07", "\ufe0f", "\u3164", "\U000e0100\u034f"):
        with pytest.raises(UserError, match="the prompt is empty: ask a question"):
            processor.chat_prompt(blank)
    shown = "\u2764\ufe0f\u200b what is red?"  # a heart drawn in colour, a zero-width space: a question still
    assert shown in processor.chat_prompt(shown)
    with pytest.raises(UserError, match="the question contains <image>"):  # the user's, not the template's
        processor.chat_prompt("what is <image>?")


def test_tokenizer_and_config_errors(folder, tmp_path):
    image_token_id = image_id()
    with pytest.raises(UserError, match="tokenizer.json not found"):
        Processor.from_pretrained(tmp_path, image_token_id, NUM_IMAGE_TOKENS, SIZE)
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(UserError, match="not a valid tokenizer.json"):
        Processor.from_pretrained(tmp_path, image_token_id, NUM_IMAGE_TOKENS, SIZE)

    data = json.loads((folder / "tokenizer.json").read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<image>"]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match="no <image> token"):
        Processor.from_pretrained(tmp_path, image_token_id, NUM_IMAGE_TOKENS, SIZE)
    with pytest.raises(UserError, match="image_token_index"):
        Processor.from_pretrained(folder, image_token_id + 1, NUM_IMAGE_TOKENS, SIZE)


@pytest.mark.parametrize("name", ["preprocessor_config.json", "tokenizer_config.json", "processor_config.json"])
def test_a_damaged_optional_file_is_told_it_may_be_deleted(folder, tmp_path, name):
    """A file the folder may do without: a damaged one is refused, and the remedy says so."""
    (tmp_path / "tokenizer.json").write_bytes((folder / "tokenizer.json").read_bytes())
    (tmp_path / name).write_text("{broken")
    with pytest.raises(UserError, match=f"{name} is not valid JSON .*download it again, or delete it to use the "
                                        "defaults"):
        Processor.from_pretrained(tmp_path, image_id(), NUM_IMAGE_TOKENS, SIZE)


def test_an_image_that_is_no_pil_image_is_a_user_error():
    processor = processor_for()
    for image in (np.zeros((8, 8, 3), np.uint8), torch.zeros(3, 8, 8)):
        with pytest.raises(UserError, match="an image is a file's path or a PIL image"):
            processor(processor.chat_prompt("What is it?"), image)


def test_an_rgb_image_with_a_transparent_colour_goes_on_white_like_transformers(tmp_path):
    """PNG's tRNS chunk gives an RGB image a transparent colour: transformers' convert_to_rgb puts it on white."""
    image = make_image(45, 33, seed=3)
    key = image.getpixel((0, 0))
    image.info["transparency"] = key
    assert_close(processor_for().preprocess(image), hf_pixels(image, SIZE, SIZE))
    image.save(tmp_path / "t.png", transparency=key)
    assert load_image(tmp_path / "t.png").getpixel((0, 0)) == (255, 255, 255)


def image_settings(cfg, size=SIZE):
    return processing.preprocessor_settings(cfg, "preprocessor_config.json", size)


SETTINGS = {"crop_size": SIZE, "size": {"shortest_edge": SIZE}}


def test_image_settings_as_transformers_reads_them():
    """Each as transformers' CLIP image processors take it: an empty file has no crop size (their default,
    224, is no tower's here); a null longest_edge or height is unset; a rescale factor written rounded is
    1/255; the fast and PIL CLIP processors never pad to a square, whatever do_pad says."""
    with pytest.raises(UserError, match=r"no crop_size \(the image processor's default: 224\)"):
        image_settings({})
    assert image_settings(None)["shortest_edge"] == SIZE                                 # no file: the tower's
    assert image_settings({**SETTINGS, "size": {"shortest_edge": 20, "longest_edge": None, "height": None}}
                          )["shortest_edge"] == 20
    image_settings({**SETTINGS, "rescale_factor": 0.003921568627451})                  # no UserError
    for kind in ("CLIPImageProcessorFast", "CLIPImageProcessorPil"):
        assert not image_settings({**SETTINGS, "do_pad": True, "image_processor_type": kind})["pad_to_square"]


@pytest.mark.parametrize("change,named", [({"crop_size": {"height": SIZE, "width": 2 * SIZE}}, "crop_size"),
                                          ({"do_resize": 1}, "sets do_resize: 1"),
                                          ({"do_rescale": 1}, "sets do_rescale: 1"),
                                          ({"image_mean": [True, 0.5, 0.5]}, "image_mean"),
                                          ({"image_std": [0.2, 0.2, 0.2, 0.2]}, "image_std")])
def test_image_settings_tinyavl_cannot_honour_are_refused(change, named):
    """A non-square crop (transformers would crop it so), a step set to 1 rather than true, a bool as a mean,
    four channels' std."""
    with pytest.raises(UserError, match=named):
        image_settings({**SETTINGS, **change})


def test_empty_nested_image_settings_are_the_settings(tmp_path):
    """processor_config.json's "image_processor": {} is read as the settings (transformers reads it so), not
    passed over for preprocessor_config.json."""
    write_tiny_tokenizer(tmp_path)
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_processor": {}}))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(SETTINGS))
    with pytest.raises(UserError, match="image_processor has no crop_size"):
        Processor.from_pretrained(tmp_path, image_id(), NUM_IMAGE_TOKENS, SIZE)


def test_an_image_at_the_pixel_limit_passes(monkeypatch):
    """PIL refuses an image above twice MAX_IMAGE_PIXELS (here 50): 100 pixels is still in."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)
    assert image_settings({"crop_size": 10, "size": {"shortest_edge": 10}}, size=10)["shortest_edge"] == 10
    processing.check_made_size((10, 10), (10, 10), "resized")


def test_preprocessor_config(folder, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((folder / "tokenizer.json").read_bytes())
    image_token_id = image_id()
    # Laid out like llava-1.5-7b-hf's file; shortest_edge < crop makes both pad, and mean / std are not CLIP's.
    config = {"crop_size": {"height": SIZE, "width": SIZE}, "do_center_crop": True, "do_convert_rgb": True,
              "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.4, 0.3],
              "image_std": [0.2, 0.25, 0.3], "resample": 3, "rescale_factor": 1 / 255,
              "size": {"shortest_edge": 20}}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    processor = Processor.from_pretrained(tmp_path, image_token_id, NUM_IMAGE_TOKENS, SIZE)
    image = make_image(50, 40, seed=6)
    hf = CLIPImageProcessorPil(**{k: v for k, v in config.items() if k != "do_convert_rgb"})
    assert_close(processor.preprocess(image), hf(image, return_tensors="pt")["pixel_values"][0])

    assert not processor.pad_to_square
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**config, "do_pad": True}))
    assert Processor.from_pretrained(tmp_path, image_token_id, NUM_IMAGE_TOKENS, SIZE).pad_to_square
    # do_pad is LlavaImageProcessor's: a file that names CLIP's processor, which has none, is not padded by
    # transformers, nor here.
    for kind, pads in (("LlavaImageProcessor", True), ("CLIPImageProcessor", False)):
        (tmp_path / "preprocessor_config.json").write_text(json.dumps(
            {**config, "do_pad": True, "image_processor_type": kind}))
        ours = Processor.from_pretrained(tmp_path, image_token_id, NUM_IMAGE_TOKENS, SIZE)
        theirs = AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
        assert ours.pad_to_square == pads
        padded = ours.padded_to_square(image) if pads else image                  # as the processor's call pads
        assert_close(ours.preprocess(padded), theirs(image, return_tensors="pt")["pixel_values"][0])
    # LLaVA-1.6's do_pad pads a batch's lists of crops, not an image.
    assert not Processor.from_pretrained(tmp_path, image_token_id, NUM_IMAGE_TOKENS, SIZE,
                                         image_grid_pinpoints=[[SIZE, 2 * SIZE]], patch_size=PATCH).pad_to_square

    # A file that leaves the short side out resizes to the image processors' default, 224, as transformers
    # does; one that leaves the crop out would crop 224 x 224, which the 28 px tower cannot take.
    no_size = {k: v for k, v in config.items() if k != "size"}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(no_size))
    ours = Processor.from_pretrained(tmp_path, image_token_id, NUM_IMAGE_TOKENS, SIZE)
    theirs = CLIPImageProcessorPil(**{k: v for k, v in no_size.items() if k != "do_convert_rgb"})
    assert ours.shortest_edge == 224
    assert_close(ours.preprocess(image), theirs(image, return_tensors="pt")["pixel_values"][0])
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "crop_size"}))
    with pytest.raises(UserError, match=r"has no crop_size \(the image processor's default: 224\)"):
        Processor.from_pretrained(tmp_path, image_token_id, NUM_IMAGE_TOKENS, SIZE)

    # What tinyavl does not implement is refused, not ignored.
    for key, value, named in (("crop_size", 224, "crop_size 224"),
                              ("size", {"shortest_edge": 20, "longest_edge": 30}, "longest_edge"),
                              ("rescale_factor", 1 / 128, "rescale_factor"), ("rescale_factor", "1/255", "1/255"),
                              ("do_pad", "yes", "do_pad")):
        (tmp_path / "preprocessor_config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(UserError, match=named):
            Processor.from_pretrained(tmp_path, image_token_id, NUM_IMAGE_TOKENS, SIZE)


def test_image_settings_transformers_5_saves_in_processor_config_are_read_first(folder, tmp_path):
    """transformers 5's save_pretrained writes the image processor's settings into processor_config.json
    ("image_processor") and no preprocessor_config.json, and its from_pretrained reads them there first. Both
    folders, and one holding both (other settings in each), must give transformers' pixels."""
    source, saved = tmp_path / "source", tmp_path / "saved"
    source.mkdir()
    write_tiny_tokenizer(source)
    settings = {"image_processor_type": "LlavaImageProcessor", "do_pad": True, "image_mean": [0.5, 0.4, 0.3],
                "size": {"shortest_edge": 20}, "crop_size": {"height": SIZE, "width": SIZE}}
    (source / "preprocessor_config.json").write_text(json.dumps(settings))
    (source / "processor_config.json").write_text(json.dumps(
        {"processor_class": "LlavaProcessor", "patch_size": PATCH, "vision_feature_select_strategy": "default",
         "num_additional_image_tokens": 1}))
    (source / "config.json").write_text(json.dumps({"model_type": "llava"}))
    AutoProcessor.from_pretrained(source, backend="pil").save_pretrained(saved)
    assert not (saved / "preprocessor_config.json").exists()               # the premise: settings nested only
    prompt, image = "USER: <image>\nWhat is it? ASSISTANT:", make_image(50, 31, seed=3)

    def pixels_both_ways(where):
        ours = Processor.from_pretrained(where, image_id(), NUM_IMAGE_TOKENS, SIZE)(prompt, image)["pixel_values"]
        theirs = AutoProcessor.from_pretrained(where, backend="pil")(images=image, text=prompt,
                                                                    return_tensors="pt")["pixel_values"]
        return ours, theirs

    for where in (source, saved):
        assert_close(*pixels_both_ways(where))
    # Both files, telling different sizes: the nested settings win, as in transformers.
    (saved / "preprocessor_config.json").write_text(json.dumps({**settings, "size": {"shortest_edge": 40}}))
    ours, theirs = pixels_both_ways(saved)
    assert_close(ours, theirs)
    assert_close(ours, pixels_both_ways(source)[0])                        # (the source's settings: 20 px)
    # "image_processor": null is no settings there, in transformers too: preprocessor_config.json's count.
    nested = json.loads((saved / "processor_config.json").read_text())
    (saved / "processor_config.json").write_text(json.dumps({**nested, "image_processor": None}))
    ours, theirs = pixels_both_ways(saved)
    assert_close(ours, theirs)
    assert not torch.allclose(ours, pixels_both_ways(source)[0])            # (its 40 px, not the nested 20)
    # Nested settings are checked as the file's are, and named in the error.
    nested = json.loads((saved / "processor_config.json").read_text())
    for value, message in (({**settings, "crop_size": 224},
                            "processor_config.json's image_processor has crop_size 224"),
                           ([1, 2], "processor_config.json's image_processor is not a JSON object: \\[1, 2\\]")):
        (saved / "processor_config.json").write_text(json.dumps({**nested, "image_processor": value}))
        with pytest.raises(UserError, match=message):
            Processor.from_pretrained(saved, image_id(), NUM_IMAGE_TOKENS, SIZE)


@pytest.mark.parametrize("resample", [0, 2])                                       # nearest, bilinear
def test_the_files_resampling_filter_is_used(folder, tmp_path, resample):
    (tmp_path / "tokenizer.json").write_bytes((folder / "tokenizer.json").read_bytes())
    config = {"crop_size": {"height": SIZE, "width": SIZE}, "size": {"shortest_edge": SIZE}, "resample": resample}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    ours = Processor.from_pretrained(tmp_path, image_id(), NUM_IMAGE_TOKENS, SIZE)
    image = make_image(50, 40, seed=6)
    assert_close(ours.preprocess(image), CLIPImageProcessorPil(**config)(image, return_tensors="pt")["pixel_values"][0])


def test_decode_round_trip(processor):
    for text in ["The red ball is under the table.", "Zwei grüne Quadrate 😀\nand one blue circle."]:
        ids = processor(text)["input_ids"]  # [1, T], starts with <s>
        assert processor.decode(ids) == text
        assert processor.decode(ids[0].tolist() + [processor.tokenizer.token_to_id("</s>")]) == text
    ids = processor(processor.chat_prompt("What?"), make_image(20, 20))["input_ids"]
    assert processor.decode(ids) == "USER:  \nWhat? ASSISTANT:"  # the image slots decode to nothing


def test_system_prompt_from_processor_config(folder, tmp_path):
    """processor_config.json's "system_prompt" goes in front of every chat prompt, as in LLaVA-1.5's
    training conversation; without the file the prompt is llava-1.5-hf's documented one."""
    (tmp_path / "tokenizer.json").write_bytes((folder / "tokenizer.json").read_bytes())
    image_token_id = image_id()
    plain = Processor.from_pretrained(tmp_path, image_token_id, NUM_IMAGE_TOKENS, SIZE)
    assert plain.chat_prompt("What?") == "USER: <image>\nWhat? ASSISTANT:"
    (tmp_path / "processor_config.json").write_text(json.dumps({"system_prompt": "Be brief."}))
    processor = Processor.from_pretrained(tmp_path, image_token_id, NUM_IMAGE_TOKENS, SIZE)
    assert processor.chat_prompt("What?") == "Be brief. USER: <image>\nWhat? ASSISTANT:"
    assert processor.chat_prompt("What?", has_image=False) == "Be brief. USER: What? ASSISTANT:"
    ids = processor(processor.chat_prompt("What?"), make_image(20, 20))["input_ids"][0].tolist()
    # The system prompt is part of sys: every token before the image block.
    assert ids.index(image_token_id) == len(processor.tokenizer.encode("Be brief. USER: ").ids)
    for bad, message in [({"system_prompt": 3}, "not a string"), ({"system_prompt": "See <image>."}, "with <image> in it"),
                         ([1, 2], "not a JSON object")]:
        (tmp_path / "processor_config.json").write_text(json.dumps(bad))
        with pytest.raises(UserError, match=message):
            Processor.from_pretrained(tmp_path, image_token_id, NUM_IMAGE_TOKENS, SIZE)
    (tmp_path / "processor_config.json").write_text("{broken")
    with pytest.raises(UserError, match="not valid JSON"):
        Processor.from_pretrained(tmp_path, image_token_id, NUM_IMAGE_TOKENS, SIZE)
    # With a chat template the system_prompt is not used, whatever it holds.
    (tmp_path / "processor_config.json").write_text(json.dumps({"system_prompt": "See <image>."}))
    (tmp_path / "chat_template.jinja").write_text("<image>\n{{ messages[0]['content'][-1]['text'] }}")
    templated = Processor.from_pretrained(tmp_path, image_token_id, NUM_IMAGE_TOKENS, SIZE)
    assert templated.chat_prompt("What?") == "<image>\nWhat?"


def test_a_llava_next_processor_needs_the_patch_size():
    """LLaVA-1.6 counts an image's tokens from its tiles' patches: without patch_size the processor is refused
    when built, not at its first image."""
    with pytest.raises(ValueError, match="patch_size"):
        Processor(tiny_tokenizer(), image_id(), NUM_IMAGE_TOKENS, image_size=SIZE, shortest_edge=SIZE,
                  image_grid_pinpoints=[[SIZE, 2 * SIZE]])


def test_a_large_image_under_the_refusal_size_loads_without_pil_warning(tmp_path, monkeypatch):
    """PIL warns between MAX_IMAGE_PIXELS and twice it and refuses beyond: a user's large photo in between
    loads, with no warning printed (here the limit is lowered to 1000 pixels)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    make_image(40, 40).save(tmp_path / "large.png")            # 1600 pixels: past the warning, under the refusal
    make_image(50, 50).save(tmp_path / "bomb.png")             # 2500: refused
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(tmp_path / "large.png").size == (40, 40)
    with pytest.raises(UserError, match="the size at which PIL refuses to decode"):
        load_image(tmp_path / "bomb.png")


def test_an_image_too_elongated_to_resize_is_refused(processor, monkeypatch):
    """A 4 KB PNG of 1 x 1000000 pixels is under the size at which PIL refuses to decode an image, but its
    short side resized to the crop's would make a picture of billions of pixels: the same size (twice
    MAX_IMAGE_PIXELS) refuses it, before any memory is spent. Here MAX_IMAGE_PIXELS is lowered to 10000
    pixels, so that the case is small: an image may be made of up to 20000."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    inputs = processor(processor.chat_prompt("What?"), make_image(40, 60))  # 28 x 42 once resized: fine
    assert inputs["pixel_values"].shape == (1, 3, SIZE, SIZE)
    for width, height in ((1, 400), (400, 1)):                              # 28 x 11200: over the limit
        with pytest.raises(UserError, match=f"a {width}x{height} image is too elongated"):
            processor(processor.chat_prompt("What?"), make_image(width, height))
    # do_pad (LLaVA-1.5's square padding) pads first: 150 x 150 is over the limit before any resize.
    padding = Processor(tiny_tokenizer(), image_id(), NUM_IMAGE_TOKENS, image_size=SIZE, shortest_edge=SIZE,
                        pad_to_square=True)
    assert padding(padding.chat_prompt("What?"), make_image(40, 60))["pixel_values"].shape == (1, 3, SIZE, SIZE)
    with pytest.raises(UserError, match="a 1x150 image is too elongated for this model: padded to a square"):
        padding(padding.chat_prompt("What?"), make_image(1, 150))
    # A large square image, or a nearly square one, which load_image reads (between the two sizes PIL warns
    # and refuses at), is no bigger padded: it is taken.
    for width, height in ((120, 120), (140, 130)):                         # 14400 and 19600 pixels padded
        assert padding(padding.chat_prompt("What?"), make_image(width, height))["pixel_values"].shape == (1, 3, SIZE, SIZE)
    # One handed over in memory that is itself past the limit (a file would be refused as it is read) is too
    # large, not too elongated.
    with pytest.raises(UserError, match="a 150x150 image has more than the 20000 pixels .*: resize it first"):
        padding(padding.chat_prompt("What?"), make_image(150, 150))


def test_every_default_ignorable_character_shows_nothing():
    """Every character Unicode calls default-ignorable (that Python's Unicode tables assign) draws nothing, so a
    question of them alone is refused as empty: checked against the `regex` module's Unicode property (installed
    with transformers), not against tinyavl's own table, whose ranges must all be such characters."""
    import sys
    import unicodedata
    regex = pytest.importorskip("regex")
    from tinyavl.processing import IGNORABLE_BEYOND_FORMAT, shows_nothing
    ignorable = regex.compile(r"\p{Default_Ignorable_Code_Point}")
    missed = [hex(c) for c in range(sys.maxunicode + 1)
              if ignorable.match(chr(c)) and unicodedata.category(chr(c)) != "Cn" and not shows_nothing(chr(c))]
    assert missed == []
    assert all(ignorable.match(chr(c)) for first, last in IGNORABLE_BEYOND_FORMAT for c in range(first, last + 1))
