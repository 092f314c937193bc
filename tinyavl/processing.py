"""Turn a question and an image into model inputs, and generated ids back into text (LLaVA-1.5 and 1.6).

    image  -> RGB -> (with do_pad: centred on a square of the mean colour) -> resize (short side =
              shortest_edge; resample from the file, bicubic by default) -> center crop -> /255 -> normalise
           -> pixel_values [1, 3, crop, crop]                                       (LLaVA-1.5: one crop)
           -> the whole image squeezed to one crop, then the tiles of its anyres canvas, each as above
           -> pixel_values [1, n_crops, 3, crop, crop], image_sizes [1, 2]          (LLaVA-1.6)
    prompt -> the folder's chat template (or "{system} USER: <image>\\n{question} ASSISTANT:") -> ids from
              tokenizer.json, with the single <image> id widened to one slot per image feature
           -> input_ids [1, T]

The numbers equal transformers' CLIPImageProcessor (LlavaImageProcessor with do_pad) and
LlavaNextImageProcessor (PIL backends), and
LlavaProcessor / LlavaNextProcessor, which are only used as oracles in the tests. Tokenisation itself is
the `tokenizers` library running the checkpoint's own tokenizer.json; the chat template is rendered by
jinja2, as transformers renders it.
"""
import json
import math
import os
import unicodedata
import warnings
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import numpy as np
import torch
from PIL import ExifTags, Image, UnidentifiedImageError
from tokenizers import Tokenizer

from tinyavl import anyres
from tinyavl.errors import UserError
from tinyavl.files import check_readable, name_too_long_as_user_error, read_json_object

IMAGE_TOKEN = "<image>"
# The system prompt LLaVA-1.5 was trained with (the Vicuna v1 conversation of the LLaVA repository,
# llava/conversation.py). llava-hf's documented prompt leaves it out; a checkpoint that wants it says so
# in processor_config.json ("system_prompt"), as the toy LLaVA does.
LLAVA_SYSTEM_PROMPT = ("A chat between a curious human and an artificial intelligence assistant. "
                       "The assistant gives helpful, detailed, and polite answers to the human's questions.")
# OpenAI CLIP's per-channel statistics (RGB), the defaults of CLIPImageProcessor.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# The short side and the crop of transformers' CLIP, LLaVA and LLaVA-NeXT image processors where a file leaves
# them out.
IMAGE_PROCESSOR_SIZE = 224
# The smallest image_std accepted: float32's smallest normal number, whose inverse is still finite.
STD_MIN = torch.finfo(torch.float32).tiny


# ---------------------------------------------------------------------------------------------------
# Images: a file read upright as RGB, and the limits on the sizes read or made from one.
# ---------------------------------------------------------------------------------------------------

def load_image(path) -> Image.Image:
    """Read an image file into a fully decoded RGB image, upright; UserError if it cannot be read.

    The file's EXIF orientation is applied (a phone photo stored sideways is turned upright), as
    transformers' load_image does for an image given by path or URL; an image given as a PIL object is
    taken as it is, by tinyavl and by transformers' processors. Transparent pixels go on white (`to_rgb`), as
    transformers' processors put a PIL image's (its load_image drops the alpha of a file it reads, and the
    colours hidden under it show).
    """
    path = Path(path)
    with name_too_long_as_user_error(f"image {path}"):
        if not path.exists():
            if path.is_symlink():  # exists() follows the link
                raise UserError(f"{path} is a link to nothing that exists (a missing file, or links in a loop): "
                                "give an image file")
            raise UserError(f"image not found: {path} (check the path)")
        if path.is_dir():
            raise UserError(f"{path} is a folder: give an image file")
        if not path.is_file():  # a FIFO or a device would block or read forever
            raise UserError(f"{path} is not a regular file (a pipe or a device?): give an image file")
    try:
        img = decoded(path)
    except UnidentifiedImageError:
        raise UserError(f"{path} is not an image PIL can read: give a PNG, JPEG, WebP, BMP, ... file") from None
    except PermissionError:
        raise  # not "damaged" below: a file the user may not read is the system's refusal (one line, status 1)
    except Image.DecompressionBombError:
        raise UserError(f"{path} has more than {pixel_limit()} pixels, the size at which PIL refuses "
                        "to decode an image (against decompression bombs): resize it first") from None
    # What Pillow's decoders raise for a damaged file or a variant they do not know: SyntaxError for a bad
    # PNG chunk, TypeError for a TIFF tag of the wrong type, NotImplementedError for a DDS or BLP format.
    except (OSError, SyntaxError, ValueError, TypeError, NotImplementedError) as e:
        raise UserError(f"cannot decode image {path} ({e}): the file is damaged or truncated, or a variant of its "
                        "format that PIL cannot decode") from None
    with img:
        return to_rgb(upright(img))


def decoded(path: Path) -> Image.Image:
    """The image file at path with every pixel decoded now, so that a truncated file fails here, where
    `load_image` says so, and not in the code after; or Pillow's error for a file it cannot read.

    An image between PIL's two decompression-bomb sizes is read (it is one the user chose), without the
    two-line warning PIL prints for it; one past the larger raises. So is one with a damaged EXIF block,
    whose warning concerns the file's parser, not the user (`upright` counts such an orientation as upright).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.filterwarnings("ignore", message=r"(Possibly c|C)orrupt EXIF", category=UserWarning)
        img = Image.open(path)
        try:
            img.load()
        except BaseException:
            img.close()
            raise
    return img


# EXIF orientation (2-8) -> the transpose that shows the stored pixels upright (1: already upright).
EXIF_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
                  5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                  8: Image.Transpose.ROTATE_90}


def upright(img: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation says (what ImageOps.exif_transpose does, without rewriting
    the EXIF block, which fails on a damaged one). An orientation that cannot be read counts as upright."""
    try:
        with warnings.catch_warnings():  # a damaged block's warnings are no concern of the user's
            warnings.simplefilter("ignore")
            orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # Pillow parses EXIF lazily; a damaged block raises whatever its parser hits
        return img
    method = EXIF_TRANSPOSE.get(orientation)
    if method is None:
        return img
    turned = img.transpose(method)
    turned.info = img.info  # transparency (a palette or grey image's transparent colour) goes with the pixels
    return turned


def rgb_image(image) -> Image.Image:
    """An image file's path (read by load_image) or a PIL image, as 8-bit RGB."""
    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    if not isinstance(image, Image.Image):  # a numpy array or a tensor, which transformers' processors also take
        raise UserError(f"an image is a file's path or a PIL image, got a {type(image).__name__}: for an array, "
                        "give PIL.Image.fromarray(array)")
    if min(image.size) == 0:  # PIL makes such images, though no file it decodes holds one
        raise UserError(f"the image is {image.width}x{image.height} pixels: it has no pixel to read")
    return to_rgb(image)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB, as transformers' convert_to_rgb does (plus a fix for 16-bit grey).

    Grey (1, L), palette (P), CMYK and float (F, read as 0..255 and clipped) use PIL's own conversion.
    """
    # 32-bit integer grey ("I") holding values above 255 is 16-bit data (older Pillows open 16-bit PNGs so);
    # within 0..255 it is 8-bit data in a wider type, which PIL converts as it is, as transformers does. (So a
    # 16-bit PNG whose every value is under 256 reads dark as "I;16", as Pillow 13 opens it, bright as "I".)
    wide_integers = img.mode == "I" and img.getextrema()[1] > 255
    if wide_integers or img.mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        # 16-bit grey (PNG, TIFF): PIL's conversion would clip every value above 255 to white, so keep
        # the high byte instead (v >> 8): pack as big-endian 16 bit (clipping to 0..65535) and take
        # every first byte.
        values = img.convert("I")
        grey = Image.frombytes("L", img.size, values.tobytes("raw", "I;16B")[0::2])
        transparent = img.info.get("transparency")  # one 16-bit grey value (a PNG's tRNS), or None
        if transparent is None:
            img = grey
        else:  # transparent where the 16-bit value is that one, not where its high byte is the same
            alpha = np.where(np.asarray(values) == transparent, 0, 255).astype(np.uint8)   # (H, W)
            img = Image.merge("LA", (grey, Image.fromarray(alpha, "L")))
    if img.mode == "RGB" and img.info.get("transparency") is None:
        return img  # nothing to convert (preprocess calls this again on every crop)
    try:
        if "A" in img.getbands() or img.info.get("transparency") is not None:
            # Composite transparent pixels on white, as transformers does; a plain convert("RGB")
            # would show whatever colour hides under alpha 0 (often black).
            white = Image.new("RGBA", img.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
        return img.convert("RGB")
    except ValueError as e:
        raise UserError(f"cannot convert a {img.mode} image to RGB ({e}): save it as an RGB PNG or JPEG") from None


def pixel_limit() -> int | None:
    """The most pixels an image may have here, read or made: twice Image.MAX_IMAGE_PIXELS, the size at which
    PIL refuses to decode an image (between the two it only warns of a decompression bomb); None where a
    program has set MAX_IMAGE_PIXELS to None, PIL's way to turn the check off."""
    return Image.MAX_IMAGE_PIXELS and 2 * Image.MAX_IMAGE_PIXELS


def check_size_set_by_files(pixels: int, what_it_makes: str) -> None:
    """UserError if a size the model's files set would make every image into one of `pixels` pixels, more
    than `pixel_limit`: not the image's fault, so the error names the file (what_it_makes, a sentence's
    start: "... would have")."""
    limit = pixel_limit()
    if limit and pixels > limit:
        raise UserError(f"{what_it_makes} more than the {limit} pixels of the largest image tinyavl reads (where PIL "
                        "refuses to decode one); download the file again")


def check_made_size(size: tuple[int, int], made: tuple[int, int], how: str) -> None:
    """UserError if preprocessing would make an image of `size` (width, height) into one of `made`, larger
    than `pixel_limit`, the largest image load_image reads: a 4 KB PNG of 1 x 1000000 pixels is none, but
    resized to a short side of 336, or padded to a square, it would take gigabytes."""
    limit = pixel_limit()
    if not limit:
        return
    if size[0] * size[1] > limit:  # a picture handed over in memory: a file this large is refused as it is read
        raise UserError(f"a {size[0]}x{size[1]} image has more than the {limit} pixels of the largest image tinyavl "
                        "reads (where PIL refuses to decode one, against decompression bombs): resize it first")
    if made[0] * made[1] > limit:
        raise UserError(f"a {size[0]}x{size[1]} image is too elongated for this model: {how} it would be "
                        f"{made[0]}x{made[1]}, more than the {limit} pixels of the largest image tinyavl reads (where "
                        "PIL refuses to decode one, against decompression bombs); crop it nearer to a square first")


def centred(img: Image.Image, width: int, height: int, colour=(0, 0, 0)) -> Image.Image:
    """img pasted in the middle of a width x height canvas of `colour` (black by default); where the margin
    is odd, its extra pixel goes after the image (right, bottom), as transformers pads."""
    canvas = Image.new("RGB", (width, height), colour)
    canvas.paste(img, ((width - img.width) // 2, (height - img.height) // 2))
    return canvas


# ---------------------------------------------------------------------------------------------------
# The user's question, before a chat template wraps it.
# ---------------------------------------------------------------------------------------------------

# Unicode's default-ignorable characters that are not format characters (DerivedCoreProperties.txt,
# Default_Ignorable_Code_Point, assigned and outside category Cf): fillers and variation selectors, drawn as
# nothing. (first, last) code points.
IGNORABLE_BEYOND_FORMAT = ((0x034F, 0x034F), (0x115F, 0x1160), (0x17B4, 0x17B5), (0x180B, 0x180D), (0x180F, 0x180F),
                           (0x3164, 0x3164), (0xFE00, 0xFE0F), (0xFFA0, 0xFFA0), (0xE0100, 0xE01EF))


def shows_nothing(char: str) -> bool:
    """Whether a character draws nothing: white space, a control or format character (a zero-width space, a
    byte-order mark, which str.strip keeps), or another default-ignorable one (a variation selector)."""
    return (char.isspace() or unicodedata.category(char) in ("Cc", "Cf")
            or any(first <= ord(char) <= last for first, last in IGNORABLE_BEYOND_FORMAT))


def check_question(question: str) -> None:
    """A user's question is text that can be tokenized, and chat_prompt places the image itself."""
    # An unset variable ($Q), a stray "", or only characters that draw nothing: an answer to no question.
    if all(shows_nothing(c) for c in question):
        raise UserError("the prompt is empty: ask a question (main.py's default asks for a caption: Describe the "
                        "image.)")
    try:
        question.encode("utf-8")
    except UnicodeEncodeError:  # command-line bytes that are not UTF-8 arrive as lone surrogates
        raise UserError("the prompt is not valid UTF-8 text: check the terminal's encoding") from None
    if IMAGE_TOKEN in question:
        raise UserError(f"the question contains {IMAGE_TOKEN}: leave it out, the chat prompt puts the image "
                        "before the question")


# ---------------------------------------------------------------------------------------------------
# Chat templates: llava-hf folders ship their prompt format as a Jinja template. It is rendered as
# transformers' apply_chat_template renders it (src/transformers/utils/chat_template_utils.py): a
# sandboxed environment with trim_blocks and lstrip_blocks, loop controls, its {% generation %} tag, the
# raise_exception, strftime_now and tojson helpers templates call, and the tokenizer's special tokens
# (bos_token, ...) as variables.
# ---------------------------------------------------------------------------------------------------

class _GenerationTag(jinja2.ext.Extension):
    """transformers' {% generation %} ... {% endgeneration %}: it marks the assistant's text for training
    masks; rendered, it is just its body."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' own filter: Jinja's would escape HTML characters.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


# What an error about the folder's template advises: where it is kept, in the order `read_chat_template` reads.
TEMPLATE_ADVICE = ("download it again, or delete it to use LLaVA-1.5's prompt format (it is the \"chat_template\" of "
                   "processor_config.json, else of chat_template.json, else chat_template.jinja)")


def compile_chat_template(source: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    try:
        return env.from_string(source)
    # Not only a TemplateError: Jinja compiles a template to Python, and one nested deep enough ends in a
    # RecursionError or a SyntaxError ("too many statically nested blocks").
    except Exception as err:
        raise UserError(f"the folder's chat template does not parse ({type(err).__name__}: {err}): "
                        f"{TEMPLATE_ADVICE}") from None


def render_chat_template(template: jinja2.Template, messages: list[dict], special_tokens: dict) -> str:
    """The prompt for `messages`, ending where the assistant's answer begins (add_generation_prompt), with
    the variables transformers passes: no tools or documents, and the tokenizer's special tokens."""
    try:
        return template.render(messages=messages, tools=None, documents=None, add_generation_prompt=True,
                               **special_tokens)
    except Exception as err:  # a template is a program from the folder: whatever it raises is its failure
        raise UserError(f"the folder's chat template fails to render a user turn ({type(err).__name__}: {err}): "
                        f"{TEMPLATE_ADVICE}") from None


def read_chat_template(folder: Path, processor_config: dict) -> str | None:
    """The folder's chat template, from where transformers' processors take it when a folder has more than
    one (`ProcessorMixin.get_processor_dict`): the "chat_template" of processor_config.json (whose contents
    are processor_config), else that of chat_template.json (the older file), else chat_template.jinja;
    None if none of them has one. A file's "chat_template" may name its templates ({name: template}): the
    one named "default" is the one transformers renders."""
    json_file = folder / "chat_template.json"
    if processor_config.get("chat_template") is not None:
        template, source = processor_config["chat_template"], folder / "processor_config.json"
    elif json_file.is_file():
        template, source = read_json_object(json_file).get("chat_template"), json_file
    else:
        jinja_file = folder / "chat_template.jinja"
        if not jinja_file.is_file():
            return None
        try:
            return jinja_file.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise UserError(f"{jinja_file} is not UTF-8 text ({err}): download it again") from None
    if isinstance(template, dict):  # named templates (transformers' ProcessorMixin._resolve_chat_template)
        template = template.get("default")
    if not isinstance(template, str):
        raise UserError(f"{source} has no \"chat_template\" string (nor a named one, \"default\"): download it "
                        "again, or delete it to use LLaVA-1.5's prompt format")
    return template


# ---------------------------------------------------------------------------------------------------
# A model folder's processor files: the special tokens, the image processor's settings.
# ---------------------------------------------------------------------------------------------------

def read_tokenizer(folder: Path) -> Tokenizer:
    """The folder's tokenizer.json (required), or a UserError that says what to do."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{path} not found: copy the checkpoint's tokenizer.json into the model folder")
    check_readable(path)
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library raises a bare Exception
        raise UserError(f"{path} is not a valid tokenizer.json ({e}): download it again") from None


def image_processor_config(folder: Path, processor_config: dict) -> tuple[dict | None, Path | str]:
    """(settings, where they were read) of the folder's image processor, where transformers reads them:
    transformers 5 saves them inside processor_config.json (its "image_processor"), and reads them there
    before preprocessor_config.json. (None, the file's path) where neither holds them."""
    if processor_config.get("image_processor") is not None:  # null: as absent, as in transformers
        where, settings = f"{folder / 'processor_config.json'}'s image_processor", processor_config["image_processor"]
        if not isinstance(settings, dict):
            raise UserError(f"{where} is not a JSON object: {json.dumps(settings)[:80]}")
        return settings, where
    path = folder / "preprocessor_config.json"
    return read_json_object(path, optional=True), path


# The named special tokens of transformers 5 (SPECIAL_TOKENS_ATTRIBUTES), which a chat template may write.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def read_special_tokens(path: Path) -> dict:
    """{name: token} for the special tokens tokenizer_config.json declares, as transformers 5 hands them to a
    chat template (`special_tokens_map`, as tokenization_utils_base.py's from_pretrained and __init__ build
    it). A token is a string, or an AddedToken object ("__type": "AddedToken") with its "content"; null: none.
    From the lowest to the highest, each over the ones before where they name the same token:
    1. the SPECIAL_TOKEN_NAMES the file gives;
    2. where extra_special_tokens is an object, additional_special_tokens's named tokens, if it has any;
    3. every other name ending in _token that holds an AddedToken object;
    4. every other name ending in _token that holds a string ("image_token": "<image>"; not "add_bos_token":
       true), and the named tokens of extra_special_tokens (or of additional_special_tokens, its older name,
       where it is not given); where there are none of either, those of model_specific_special_tokens.
    Nothing for a name it leaves out, or without the file: transformers 5 loads a llava or llava_next folder's
    tokenizer.json as it is (TokenizersBackend, never a Llama tokenizer class with its default <s>, </s> and
    <unk>). What transformers refuses, a UserError refuses."""
    declared = read_json_object(path, optional=True) or {}

    def is_added_token(value) -> bool:
        return isinstance(value, dict) and value.get("__type") == "AddedToken"

    def token(where: str, value) -> str:
        content = value.get("content", "") if is_added_token(value) else value
        if not isinstance(content, str):
            raise UserError(f"{path} has {where} {value!r}: it must be a token (a string)")
        return content

    def named_in(group: str, value) -> dict:  # an object of named tokens; a list names none
        if value is not None and not isinstance(value, (dict, list)):
            raise UserError(f"{path} has {group} {value!r}: it must be a list of tokens or an object naming them")
        if isinstance(value, list):
            for item in value:
                token(f"{group} item", item)
            return {}
        return {name: token(f"{group} {name!r} =", item) for name, item in (value or {}).items()}

    named = {name: token(name, declared[name]) for name in SPECIAL_TOKEN_NAMES if declared.get(name) is not None}
    others = {name: value for name, value in declared.items()
              if name.endswith("_token") and name not in SPECIAL_TOKEN_NAMES}
    extra_group = "extra_special_tokens" if declared.get("extra_special_tokens") else "additional_special_tokens"
    extra = declared.get(extra_group)
    own = {**{name: value for name, value in others.items() if isinstance(value, str)}, **named_in(extra_group, extra)}
    # An object of extra tokens is taken as the model's own; additional_special_tokens then stands for the extra ones.
    later = (named_in("additional_special_tokens", declared.get("additional_special_tokens"))
             if extra_group == "extra_special_tokens" and isinstance(extra, dict) else {})
    added = {name: token(name, value) for name, value in others.items() if is_added_token(value)}
    if not own:
        block = declared.get("model_specific_special_tokens")
        if block is not None and not isinstance(block, dict):
            raise UserError(f"{path} has model_specific_special_tokens {block!r}: it must be an object naming tokens")
        own = named_in("model_specific_special_tokens", block)
    return {**named, **later, **added, **own}


def _rgb_numbers(cfg: dict, name: str, default, path: Path, in_range, rule: str):
    """cfg[name] (or the default): 3 finite numbers, one per colour (R, G, B), that `in_range` accepts."""
    values = cfg.get(name, default)
    three_finite = isinstance(values, (list, tuple)) and len(values) == 3 and all(
        type(v) in (int, float) and math.isfinite(v) for v in values)
    if not (three_finite and in_range(values)):
        raise UserError(f"{path} has {name} {values!r}: it must be 3 finite numbers (R, G, B), {rule}; fix it, or "
                        "delete the file to use the defaults")
    return values


def _special_id(tokenizer: Tokenizer, token: str, name: str) -> int:
    """The id of the special token `name` ("bos_token", "eos_token"), `token` as tokenizer_config.json declares it."""
    found = tokenizer.token_to_id(token)
    if found is None:
        raise UserError(f"tokenizer.json has no {token} token, the {name} of tokenizer_config.json: the files come "
                        "from different checkpoints")
    return found


def preprocessor_settings(cfg: dict | None, path: Path | str, vision_image_size: int, tiled: bool = False) -> dict:
    """Processor settings from preprocessor_config.json (cfg, its parsed contents, or processor_config.json's
    "image_processor"; None when there are none, giving the llava-1.5 defaults at the vision tower's size;
    path names where they were read in errors; tiled: LLaVA-1.6's anyres). Where they leave size or crop_size
    out, these take transformers' image processor defaults (CLIP's and LLaVA-NeXT's: 224,
    `IMAGE_PROCESSOR_SIZE`), as transformers reads them.

    Read: size.shortest_edge, crop_size (must equal the vision tower's input), image_mean, image_std,
    resample, and for LLaVA-1.5 do_pad (pad the image to a square first; for LLaVA-1.6, anyres, it pads a
    batch's crop lists, which one image never needs). rescale_factor must be 1/255, CLIP's. (LLaVA-1.6's
    image_grid_pinpoints, also written there, are read from config.json; from_pretrained checks that the two
    agree.)
    """
    # A folder without the settings (which transformers cannot load at all) is preprocessed at the tower's size.
    default_size = vision_image_size if cfg is None else IMAGE_PROCESSOR_SIZE
    cfg = cfg or {}
    # Older files write sizes as plain ints, newer ones as dicts.
    crop = cfg.get("crop_size", default_size)
    crop_hw = (crop.get("height"), crop.get("width")) if isinstance(crop, dict) else (crop, crop)
    if crop_hw != (vision_image_size, vision_image_size):
        said = f"crop_size {crop!r}" if "crop_size" in cfg else f"no crop_size (the image processor's default: {crop})"
        raise UserError(f"{path} has {said} but the vision tower takes {vision_image_size}x"
                        f"{vision_image_size} crops: the files come from different checkpoints")
    size = cfg.get("size", default_size)
    other_edges = isinstance(size, dict) and any(size[key] is not None for key in set(size) - {"shortest_edge"})
    shortest_edge = size.get("shortest_edge") if isinstance(size, dict) and not other_edges else size
    if type(shortest_edge) is not int or shortest_edge <= 0:
        raise UserError(f"{path} has size {size!r}; tinyavl supports only {{\"shortest_edge\": N}}, N > 0")
    # LLaVA-1.6 cuts crops of the tower's size; where the short side is that size too, resizing and centre
    # cropping a crop change nothing, and transformers' pixels are the same with the two steps or without.
    identities = ("do_resize", "do_center_crop") if tiled and shortest_edge == vision_image_size else ()
    for step in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"):
        # false, 0 or null skips the step in transformers' processor; tinyavl takes only true.
        if step in cfg and cfg[step] is not True and step not in identities:
            raise UserError(f"{path} sets {step}: {json.dumps(cfg[step])}; tinyavl implements only LLaVA's "
                            "preprocessing (resize, center crop, rescale, normalise), so it cannot run this checkpoint")
    check_size_set_by_files(shortest_edge ** 2, f"{path} has size {size!r}: resized to that short side, even a "
                            "square image would have")
    rescale = cfg.get("rescale_factor", 1 / 255)
    if type(rescale) not in (int, float) or not math.isclose(rescale, 1 / 255):
        raise UserError(f"{path} has rescale_factor {rescale!r}; tinyavl rescales pixels by 1/255, as CLIP does")
    # The mean is a colour of pixels scaled to 0 .. 1 (do_pad pads with it). The processor divides by the std
    # in float32: one that is 0 there (1e-320 is) or whose inverse overflows would make pixels inf or NaN.
    mean = _rgb_numbers(cfg, "image_mean", CLIP_MEAN, path, lambda v: 0 <= min(v) <= max(v) <= 1, "from 0 to 1")
    std = _rgb_numbers(cfg, "image_std", CLIP_STD, path, lambda v: min(v) >= STD_MIN, f"all at least {STD_MIN:.3g}")
    resample = cfg.get("resample", Image.Resampling.BICUBIC)
    # An integer (or the default, PIL's IntEnum), not true, which Python counts as 1, nor 3.0 or [3].
    filters = {r.value for r in Image.Resampling}
    if isinstance(resample, bool) or not isinstance(resample, int) or resample not in filters:
        raise UserError(f"{path} has resample {resample!r}; it must be a PIL resampling filter (3 = bicubic)")
    do_pad = cfg.get("do_pad", False)
    if type(do_pad) is not bool:
        raise UserError(f"{path} has do_pad {do_pad!r}; it must be true or false")
    # CLIP's image processor has no padding: transformers ignores do_pad where the file names that class.
    do_pad = do_pad and not str(cfg.get("image_processor_type", "")).startswith("CLIPImageProcessor")
    return dict(image_size=vision_image_size, shortest_edge=shortest_edge, image_mean=mean, image_std=std,
                resample=resample, pad_to_square=do_pad and not tiled)


# ---------------------------------------------------------------------------------------------------
# The processor: a prompt and an image in, the model's inputs out.
# ---------------------------------------------------------------------------------------------------

class Processor:
    """Prompt text and image -> {"input_ids", "pixel_values", "image_sizes"} (and "hires_pixel_values" for a
    FlexAttention model, one with hires_scale); generated ids -> text."""

    def __init__(self, tokenizer: Tokenizer, image_token_id: int, num_image_tokens: int, image_size: int,
                 shortest_edge: int, image_mean=CLIP_MEAN, image_std=CLIP_STD,
                 resample: int = Image.Resampling.BICUBIC, system_prompt: str = "", chat_template: str | None = None,
                 image_grid_pinpoints=None, patch_size: int | None = None, hires_scale: int | None = None,
                 pad_to_square: bool = False, special_tokens: dict | None = None):
        found = tokenizer.token_to_id(IMAGE_TOKEN)
        if found is None:
            raise UserError(f"tokenizer.json has no {IMAGE_TOKEN} token: use the tokenizer of a LLaVA checkpoint")
        if found != image_token_id:
            raise UserError(f"tokenizer.json gives {IMAGE_TOKEN} the id {found} but config.json says image_token_index "
                            f"{image_token_id}: the two files come from different checkpoints")
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id
        self.num_image_tokens = num_image_tokens  # of one crop: e.g. 576 = (336 / 14)^2 CLIP patches
        # What a chat template may write ({{ bos_token }}, ...): the tokens tokenizer_config.json declares, as
        # transformers hands them over (`read_special_tokens`); a name it leaves out is undefined, and renders
        # as nothing.
        self.special_tokens = special_tokens or {}
        self.bos_token = self.special_tokens.get("bos_token")  # None: none declared (BOS is the post-processor's)
        # Their ids, each None where none is declared; checked against tokenizer.json (`_special_id`). An answer
        # ends at the model's eos_token_id (config.json's, or generation_config.json's), not at this one.
        self.bos_token_id, self.eos_token_id = (
            None if token is None else _special_id(tokenizer, token, name)
            for name, token in (("bos_token", self.bos_token), ("eos_token", self.special_tokens.get("eos_token"))))
        self.image_size = image_size  # side of the square crop the vision tower sees
        self.shortest_edge = shortest_edge
        self.image_mean = torch.tensor(image_mean, dtype=torch.float32).view(3, 1, 1)  # [3, 1, 1]
        # LLaVA-1.5 with do_pad (the original LLaVA's "pad" aspect ratio): the image is first centred on a
        # square of the mean colour, as transformers' LlavaImageProcessor pads it, so no side is cropped away.
        self.pad_to_square = pad_to_square
        self.pad_colour = tuple(int(m * 255) for m in image_mean)
        self.image_std = torch.tensor(image_std, dtype=torch.float32).view(3, 1, 1)  # [3, 1, 1]
        self.resample = Image.Resampling(resample)
        self.system_prompt = system_prompt  # text in front of "USER:" without a chat template ("" = none)
        self.chat_template = None if chat_template is None else compile_chat_template(chat_template)
        # LLaVA-1.6: the anyres canvases, and the tower's patch size that counts an image's tokens.
        if image_grid_pinpoints is not None and patch_size is None:
            raise ValueError("a LLaVA-1.6 processor (image_grid_pinpoints) needs the tower's patch_size to count "
                             "an image's tokens")
        self.image_grid_pinpoints = image_grid_pinpoints
        self.patch_size = patch_size
        # FlexAttention (config.json's hires_config): the image also at hires_scale x the crop's size.
        self.hires_scale = hires_scale

    @classmethod
    def from_pretrained(cls, folder, image_token_id: int, num_image_tokens: int, vision_image_size: int,
                        image_grid_pinpoints=None, patch_size: int | None = None,
                        hires_scale: int | None = None) -> "Processor":
        """Build from a checkpoint folder: tokenizer.json (required); the image processor's settings
        (processor_config.json's "image_processor", as transformers 5 saves them, else preprocessor_config.json),
        the chat template (`read_chat_template`), processor_config.json's "system_prompt" (used when there is no
        template) and tokenizer_config.json (the special tokens: `read_special_tokens`) optional."""
        folder = Path(folder)
        tokenizer = read_tokenizer(folder)
        processor_path = folder / "processor_config.json"
        processor_config = read_json_object(processor_path, optional=True) or {}
        pre_cfg, pre_path = image_processor_config(folder, processor_config)
        pre = preprocessor_settings(pre_cfg, pre_path, vision_image_size, tiled=image_grid_pinpoints is not None)
        # Sizes config.json sets, checked here where images are made: past the limit, every image (for a canvas:
        # every image tiled on it) would be refused.
        for canvas_h, canvas_w in image_grid_pinpoints or ():
            check_size_set_by_files(canvas_h * canvas_w, f"config.json has image_grid_pinpoints canvas {canvas_h} x "
                                    f"{canvas_w}: an image tiled on it would have")
        if hires_scale is not None:
            edge = hires_scale * max(pre["shortest_edge"], vision_image_size)
            check_size_set_by_files(edge ** 2, f"config.json has hires_config.scale {hires_scale}: at {edge} px a "
                                    "side, even a square image would have")
        # The processor counts an image's slots from these canvases and the model tiles it on config.json's:
        # two lists would give a prompt whose slots and features do not match.
        pre_pinpoints = (pre_cfg or {}).get("image_grid_pinpoints")
        if image_grid_pinpoints is not None and pre_pinpoints is not None and \
                pre_pinpoints != [list(p) for p in image_grid_pinpoints]:  # as JSON: a malformed list differs too
            raise UserError(f"{pre_path} tiles images on image_grid_pinpoints "
                            f"{pre_pinpoints} but config.json on {image_grid_pinpoints}: the files come from "
                            "different checkpoints")
        system_prompt = processor_config.get("system_prompt", "")
        if not isinstance(system_prompt, str):
            raise UserError(f"{processor_path} has a system_prompt that is not a string")
        chat_template = read_chat_template(folder, processor_config)
        if IMAGE_TOKEN in system_prompt and chat_template is None:  # chat_prompt would place a second image
            raise UserError(f"{processor_path} has a system_prompt with {IMAGE_TOKEN} in it: take it out")
        return cls(tokenizer, image_token_id, num_image_tokens, **pre, system_prompt=system_prompt,
                   chat_template=chat_template, image_grid_pinpoints=image_grid_pinpoints,
                   patch_size=patch_size, hires_scale=hires_scale,
                   special_tokens=read_special_tokens(folder / "tokenizer_config.json"))

    def chat_prompt(self, question: str, has_image: bool = True) -> str:
        """One user turn, ready for the model's answer: the folder's chat template rendered as transformers'
        apply_chat_template(add_generation_prompt=True) renders it, or without a template llava-1.5's
        format, "{system} USER: <image>\\n{question} ASSISTANT:" (the system prompt, if any, first)."""
        check_question(question)
        if self.chat_template is not None:
            content = ([{"type": "image"}] if has_image else []) + [{"type": "text", "text": question}]
            prompt = render_chat_template(self.chat_template, [{"role": "user", "content": content}],
                                          self.special_tokens)
            # The question holds no <image> (check_question): every one in the prompt is the template's.
            if prompt.count(IMAGE_TOKEN) != has_image:
                raise UserError(f"the model folder's chat template wrote {prompt.count(IMAGE_TOKEN)} {IMAGE_TOKEN} "
                                f"for {int(has_image)} image: fix or delete the folder's chat template")
            return prompt
        turn = f"USER: {IMAGE_TOKEN}\n{question} ASSISTANT:" if has_image else f"USER: {question} ASSISTANT:"
        return f"{self.system_prompt} {turn}" if self.system_prompt else turn

    def __call__(self, text: str, image=None) -> dict:
        """Prompt (with one <image> where the picture goes, or none) and image (path or PIL) -> model inputs:
        input_ids [1, T]; pixel_values [1, 3, S, S] (LLaVA-1.5) or [1, n_crops, 3, S, S] (LLaVA-1.6);
        image_sizes [1, 2], the image's (height, width), which LLaVA-1.6 tiles by (None for LLaVA-1.5, as
        transformers' LlavaProcessor gives none). Without an image both are None. A FlexAttention model's
        processor (hires_scale) adds hires_pixel_values [1, 3, scale S, scale S]: the same image, preprocessed
        at scale x the sizes."""
        n = text.count(IMAGE_TOKEN)
        if n > 1:
            raise UserError(f"the prompt has {n} {IMAGE_TOKEN} placeholders, but tinyavl takes one image per "
                            f"prompt (batch size 1): keep a single {IMAGE_TOKEN}")
        if image is not None and n == 0:
            raise UserError(f"an image was given but the prompt has no {IMAGE_TOKEN}: put {IMAGE_TOKEN} where the "
                            f"image goes (chat_prompt does this)")
        if image is None and n == 1:
            raise UserError(f"the prompt contains {IMAGE_TOKEN} but no image was given: pass an image or "
                            f"remove {IMAGE_TOKEN}")
        # tokenizer.json's post-processor puts the BOS (<s>) in front, unless the prompt has it already (a chat
        # template may write it, and transformers' apply_chat_template(tokenize=True) then adds none); no
        # EOS is added.
        has_bos = self.bos_token is not None and text.startswith(self.bos_token)
        ids = self.tokenizer.encode(text, add_special_tokens=not has_bos).ids
        pixel_values = image_sizes = hires_pixel_values = None
        if image is not None:
            img = rgb_image(image)
            image_hw = (img.height, img.width)
            # "<image>" is one special token; widen it to one slot per image feature. transformers repeats
            # "<image>" that many times in the text before tokenising: the ids are the same.
            if self.image_token_id not in ids:  # "<image>" split into pieces, or merged with its neighbours
                raise UserError(f"the tokenizer does not encode {IMAGE_TOKEN} in this prompt as its token (id "
                                f"{self.image_token_id}): tokenizer.json should list {IMAGE_TOKEN} as a special "
                                "added token")
            at = ids.index(self.image_token_id)
            ids[at:at + 1] = [self.image_token_id] * self.image_token_count(image_hw)
            pixel_values, image_sizes, hires_pixel_values = self.pixel_inputs(img)
        inputs = {"input_ids": torch.tensor([ids], dtype=torch.long),   # [1, T]
                  "pixel_values": pixel_values, "image_sizes": image_sizes}
        return inputs if self.hires_scale is None else {**inputs, "hires_pixel_values": hires_pixel_values}

    def pixel_inputs(self, img: Image.Image) -> tuple:
        """An RGB image -> (pixel_values, image_sizes, hires_pixel_values) as `__call__` hands them to the model:
        LLaVA-1.5's one crop [1, 3, S, S] (padded to a square first with pad_to_square), no sizes, and a
        FlexAttention model's view of it [1, 3, scale S, scale S] (else None); LLaVA-1.6's crops
        [1, n_crops, 3, S, S] and the image's (height, width) [1, 2], no view."""
        if self.image_grid_pinpoints is not None:
            crops = [self.preprocess(crop) for crop in self.anyres_crops(img)]              # each [3, S, S]
            return torch.stack(crops)[None], torch.tensor([(img.height, img.width)]), None  # [1, n_crops, 3, S, S]
        if self.pad_to_square:
            img = self.padded_to_square(img)
        hires = None if self.hires_scale is None else self.preprocess(img, self.hires_scale)[None]  # [1, 3, sS, sS]
        return self.preprocess(img)[None], None, hires                                      # [1, 3, S, S]

    def image_token_count(self, image_hw: tuple[int, int]) -> int:
        """The slots an image of this (height, width) takes in the prompt."""
        if self.image_grid_pinpoints is None:
            return self.num_image_tokens
        return anyres.image_token_count(image_hw, self.image_grid_pinpoints, self.image_size, self.patch_size)

    def padded_to_square(self, img: Image.Image) -> Image.Image:
        """The image centred on a square of the mean colour, its long side's length (the short side's odd
        pixel of padding goes after it, as in transformers' pad_to_square)."""
        side = max(img.width, img.height)
        check_made_size(img.size, (side, side), "padded to a square")
        return centred(img, side, side, self.pad_colour)

    def anyres_crops(self, img: Image.Image) -> list[Image.Image]:
        """LLaVA-1.6: the whole image squeezed to a square (the base crop: all of it, its aspect lost), then
        the tiles of its canvas in reading order: resized to fit the canvas with its aspect kept, centred on
        black."""
        tile = self.image_size
        canvas_h, canvas_w = anyres.best_resolution((img.height, img.width), self.image_grid_pinpoints)
        new_h, new_w = anyres.fitted_size((img.height, img.width), (canvas_h, canvas_w))
        canvas = centred(img.resize((new_w, new_h), resample=self.resample), canvas_w, canvas_h)
        tiles = [canvas.crop((left, top, left + tile, top + tile))
                 for top in range(0, canvas_h, tile) for left in range(0, canvas_w, tile)]
        base = img.resize((self.shortest_edge, self.shortest_edge), resample=self.resample)
        return [base] + tiles

    def preprocess(self, image, scale: int = 1) -> torch.Tensor:
        """A path or PIL image -> normalised pixels [3, image_size, image_size], as CLIPImageProcessor (PIL);
        scale > 1 makes every size that many times larger (FlexAttention's high-resolution view)."""
        img = rgb_image(image)
        # Resize so the short side is shortest_edge; the long side keeps the aspect ratio, truncated with
        # int() exactly as transformers' get_resize_output_image_size does (500x375 -> 448x336).
        w, h = img.size
        edge = scale * self.shortest_edge
        new_long = int(edge * max(w, h) / min(w, h))
        size = (edge, new_long) if w <= h else (new_long, edge)
        check_made_size((w, h), size, f"its short side resized to {edge} px")
        img = img.resize(size, resample=self.resample)  # the file's PIL filter (bicubic) on uint8, as transformers
        # Center crop; floor division leaves an odd extra pixel on the right / bottom. An image smaller
        # than the crop (shortest_edge < image_size) is padded with black by PIL, as by transformers.
        c = scale * self.image_size
        left, top = (img.width - c) // 2, (img.height - c) // 2
        img = img.crop((left, top, left + c, top + c))
        # bytearray: torch.frombuffer warns on read-only bytes.
        x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(c, c, 3)  # [H, W, 3] uint8
        x = x.permute(2, 0, 1).float() / 255  # [3, H, W] in [0, 1]
        return (x - self.image_mean) / self.image_std  # [3, H, W]

    def decode(self, ids) -> str:
        """Token ids (list or tensor) -> text, leaving out special tokens (<s>, </s>, <image>)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.flatten().tolist()
        return self.tokenizer.decode(ids, skip_special_tokens=True)
