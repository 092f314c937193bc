"""A broken llava-hf folder is refused once, at load, with one UserError line that names the problem.

Each test breaks a private copy of the tiny "mha" checkpoint (tests/tiny_checkpoints.py): a weight, a field
of config.json or of preprocessor_config.json. Before these checks most of these loaded and answered garbage,
or crashed with a traceback.
"""
import json
import math
import os
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tiny_checkpoints import VARIANTS, sparse_config, tokenizer_info

import tinyavl
from tinyavl.errors import UserError
from tinyavl.loading import parse_config
from tinyavl.model import LlavaConfig, TextConfig, VisionConfig

NORM = "language_model.model.norm.weight"


@pytest.fixture
def folder(tiny_ckpt, tmp_path):
    """A private copy of a good published single-file checkpoint, free to break."""
    return shutil.copytree(tiny_ckpt.folder("mha"), tmp_path / "ckpt")


def load_error(folder) -> str:
    """The UserError message of loading `folder`: a single line of reasonable length."""
    with pytest.raises(UserError) as info:
        tinyavl.load_pretrained(folder, device="cpu")
    message = str(info.value)
    assert "\n" not in message and len(message) <= 1000, message
    return message


def edit_json(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def edit_weights(folder, edit):
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors")


def test_a_valid_checkpoint_loads(folder):
    model, processor = tinyavl.load_pretrained(folder, device="cpu")
    assert model.config.vision.num_hidden_layers == 2 and processor.image_token_id == model.config.image_token_id


# ----------------------------------------------------------------------------------------- weights
@pytest.mark.parametrize("key,value", [(NORM, float("nan")), ("multi_modal_projector.linear_1.weight", float("inf")),
                                       (NORM, float("-inf"))])
def test_non_finite_weight(folder, key, value):
    edit_weights(folder, lambda t: t[key].view(-1)[3:5].fill_(value))
    message = load_error(folder)
    assert key in message and "NaN or inf" in message


def test_weight_that_overflows_the_run_dtype(folder):
    edit_weights(folder, lambda t: t[NORM].view(-1)[0].fill_(1e6))  # fine in fp32, inf in fp16
    with pytest.raises(UserError, match=f"{NORM} overflows float16: load the model in bfloat16 or float32"):
        tinyavl.load_pretrained(folder, device="cpu", dtype="float16")
    # bf16's largest is about 3.39e38: 3.4e38 (fp32's range) rounds to inf there, and only fp32 holds it.
    edit_weights(folder, lambda t: t[NORM].view(-1)[0].fill_(3.4e38))
    with pytest.raises(UserError, match=rf"{NORM} overflows bfloat16: load the model in float32 \(--dtype\)$"):
        tinyavl.load_pretrained(folder, device="cpu", dtype="bfloat16")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_an_f64_weight_past_float32s_range_is_damage_not_a_dtype_to_change(folder, dtype):
    """1e300 in an F64 file is finite there and inf in every dtype tinyavl runs (bfloat16 has float32's
    range): the error says the file is damaged, not to pick a --dtype that could not hold it either."""
    def to_f64(tensors):
        for key in tensors:
            tensors[key] = tensors[key].double()
        tensors[NORM].view(-1)[0] = 1e300
    edit_weights(folder, to_f64)
    with pytest.raises(UserError) as info:
        tinyavl.load_pretrained(folder, device="cpu", dtype=dtype)
    message = str(info.value)
    assert NORM in message and "past float32's range" in message and "--dtype" not in message, message


def test_integer_weight(folder):
    edit_weights(folder, lambda t: t.__setitem__(NORM, t[NORM].to(torch.int8)))
    message = load_error(folder)
    assert NORM in message and "I8" in message


# ----------------------------------------------------------------------------------------- preprocessor_config.json
@pytest.mark.parametrize("field,value", [
    ("image_std", [0.0, 0.26, 0.27]), ("image_std", [0.26, -0.26, 0.27]), ("image_std", [0.26, 0.27]),
    ("image_std", ["0.26", 0.26, 0.27]), ("image_std", 0.26), ("image_mean", [0.48, 0.45, 0.40, 0.1]),
    ("image_mean", [0.48, None, 0.40]), ("image_std", [1e-320, 1, 1]),  # 0 in float32: pixels would be inf
])
def test_bad_normalisation(folder, field, value):
    edit_json(folder / "preprocessor_config.json", lambda c: c.__setitem__(field, value))
    message = load_error(folder)
    assert "preprocessor_config.json" in message and field in message


# ----------------------------------------------------------------------------------------- config.json
def test_a_text_config_that_cannot_run_is_refused_as_it_is_built():
    """A norm's epsilon must be a positive finite number (inf would make every hidden state 0), and RoPE
    rotates pairs of a head's dimensions: an odd head size has a dimension left over."""
    with pytest.raises(UserError, match="rms_norm_eps is inf, but it must be a positive number"):
        TextConfig(rms_norm_eps=math.inf)
    with pytest.raises(UserError, match="odd head size 15"):
        TextConfig(hidden_size=60, num_attention_heads=4, num_key_value_heads=4, head_dim=15)
    # A field that may be null says so: a window of 0 tokens is no window, null is (Mistral's, turned off).
    with pytest.raises(UserError, match="sliding_window is 0, but it must be a positive integer or null"):
        TextConfig(sliding_window=0)
    with pytest.raises(UserError, match="hidden_size is 0, but it must be a positive integer;"):
        TextConfig(hidden_size=0)


# Small configs built directly, for the checks a config makes of itself (LlavaConfig.validate, which
# loading.parse_config calls): a folder's preprocessor_config.json can refuse some of these first.
SMALL_TEXT = dict(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
SMALL_VISION = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                    image_size=28, patch_size=7)


def small_llava(**fields) -> LlavaConfig:
    return LlavaConfig(text=TextConfig(**SMALL_TEXT), vision=VisionConfig(**SMALL_VISION), image_token_id=39,
                       **fields)


def test_token_id_zero_is_a_row_of_the_embedding_table():
    """Token ids run from 0 to vocab_size - 1: a bos or eos of 0 is one (Llama's <unk>, a pad in others)."""
    config = TextConfig(**SMALL_TEXT, bos_token_id=0, eos_token_id=[0, 39])
    assert config.bos_token_id == 0 and config.eos_token_id == [0, 39]
    with pytest.raises(UserError, match=r"eos_token_id is -1, but it must be a token id \(0 \.\. 39\)"):
        TextConfig(**SMALL_TEXT, eos_token_id=-1)


def test_refusal_messages_say_what_the_field_must_be():
    """Each message names the kind the field needs: an empty eos list is told the list must not be empty."""
    with pytest.raises(UserError, match=r"text_config\.eos_token_id is \[\], but it must be a token id "
                                        r"\(0 \.\. 39\), a non-empty list of them, or null"):
        TextConfig(**SMALL_TEXT, eos_token_id=[])
    with pytest.raises(UserError, match=r"text_config\.hidden_act is 5, but it must be a string;"):
        TextConfig(**SMALL_TEXT, hidden_act=5)
    with pytest.raises(UserError, match=r"text_config\.attention_bias is 'false', but it must be true or false;"):
        TextConfig(**SMALL_TEXT, attention_bias="false")


@pytest.mark.parametrize("layer", [True, [False, -1]])
def test_a_bool_vision_feature_layer_is_refused_not_read_as_layer_1(layer):
    """JSON's true is Python's True, which int() reads as 1: a layer index must be an integer, not a bool."""
    with pytest.raises(UserError, match=r"vision_feature_layer (True|False) does not exist"):
        small_llava(vision_feature_layer=layer).validate()


def test_validate_refuses_a_feature_layer_the_tower_lacks():
    """Before any model is built: 2 layers give 3 hidden states (the embeddings' and each layer's)."""
    with pytest.raises(UserError, match=r"vision_feature_layer 3 does not exist: the vision tower has 3 hidden "
                                        r"states"):
        small_llava(vision_feature_layer=3).validate()


@pytest.mark.parametrize("pinpoints", [[], [[28, 50]], [[28.0, 56]], [[56, 28.0]]],
                         ids=["empty", "not_a_tile_multiple", "float_height", "float_width"])
def test_validate_refuses_malformed_canvases(pinpoints):
    """The config's own check, which a folder whose preprocessor_config.json lacks image_grid_pinpoints (or
    was edited alike) reaches: a canvas of 50 px would run as one 28 px tile and drop the columns past it."""
    with pytest.raises(UserError, match=r"image_grid_pinpoints is .*, but LLaVA-1.6 needs a non-empty list of "
                                        r"\[height, width\] canvases in pixels, each a positive multiple of the "
                                        r"vision tower's 28 px"):
        small_llava(image_grid_pinpoints=pinpoints).validate()


def test_llava_next_with_the_full_strategy_is_refused():
    """A tile's 1 + P features with CLS cannot be laid out as a grid: refused by name, not a view() traceback."""
    with pytest.raises(UserError, match=r"vision_feature_select_strategy is 'full': LLaVA-1.6 lays each tile's "
                                        r"patch features out as a grid, which needs the CLS token dropped"):
        small_llava(image_grid_pinpoints=[[28, 56]], vision_feature_select_strategy="full").validate()


def test_pixels_of_another_size_than_the_towers_are_refused(folder):
    model, _ = tinyavl.load_pretrained(folder, device="cpu")
    size = model.config.vision.image_size
    with pytest.raises(ValueError, match=f"pixel_values are \\({size + 1}, {size + 1}\\), the vision tower takes"):
        model.vision_features(torch.zeros(1, 3, size + 1, size + 1))


@pytest.mark.parametrize("shape", [(3, 0, 0), (1, 2, 3, 0, 0), (1, 1, 0, 0)], ids=["unbatched", "five_d", "grey"])
def test_pixels_of_another_layout_than_a_batch_of_rgb_images_are_refused(folder, shape):
    """One image without its batch dimension, LLaVA-1.6's crops given to a LLaVA-1.5, one channel: each
    said in one line (torch would fail deep in the tower, or in conv2d)."""
    model, processor = tinyavl.load_pretrained(folder, device="cpu")
    size = model.config.vision.image_size
    shape = tuple(size if n == 0 else n for n in shape)
    inputs = processor(processor.chat_prompt("What is it?"), image=Image.new("RGB", (size, size)))
    with pytest.raises(ValueError, match=rf"pixel_values are \({', '.join(map(str, shape))}\), the vision tower "
                                         rf"takes \(N, 3, {size}, {size}\)"):
        tinyavl.generate(model, inputs["input_ids"], torch.zeros(shape), max_new_tokens=1)


def test_an_attention_mask_not_shaped_as_the_ids_is_refused(folder):
    model, _ = tinyavl.load_pretrained(folder, device="cpu")
    ids = torch.tensor([[1, 5, 6, 7]])
    for mask in (torch.ones(4), torch.ones(1, 3)):
        with pytest.raises(ValueError, match=rf"attention_mask is \({', '.join(map(str, mask.shape))},?\): it must "
                                             r"be \(B, T\), the shape of input_ids, \(1, 4\)"):
            model(ids, attention_mask=mask)


@pytest.mark.parametrize("section,field,value", [
    ("vision_config", "num_hidden_layers", 0),     # the vision tower would silently run no layer
    ("text_config", "hidden_size", -64),
    ("text_config", "num_attention_heads", 0),
    ("text_config", "num_hidden_layers", 0),
    ("text_config", "intermediate_size", "128"),
    ("text_config", "vocab_size", 0),
    ("text_config", "max_position_embeddings", 0),
    ("text_config", "head_dim", 0),
    ("vision_config", "patch_size", 0),
    ("vision_config", "image_size", 7),            # smaller than patch_size 14: no patch at all
    ("text_config", "hidden_size", 66),            # not divisible by 4 heads
    ("vision_config", "hidden_size", 30),          # not divisible by 4 heads
    ("text_config", "num_key_value_heads", 3),     # 4 query heads cannot share 3 KV heads
    ("text_config", "rms_norm_eps", 0.0),
    ("text_config", "rope_theta", -10000.0),
    ("vision_config", "layer_norm_eps", -1e-5),
])
def test_config_value_out_of_range(folder, section, field, value):
    edit_json(folder / "config.json", lambda c: c[section].__setitem__(field, value))
    message = load_error(folder)
    assert f"{section}.{field}" in message and str(value) in message, message


@pytest.mark.parametrize("step,value", [("do_resize", None), ("do_center_crop", 0), ("do_normalize", False)])
def test_a_preprocessing_step_switched_off_is_refused(folder, step, value):
    """transformers' processor skips a step whose flag is anything but true (null and 0 too); tinyavl runs
    every step, so it refuses the file rather than preprocess otherwise."""
    edit_json(folder / "preprocessor_config.json", lambda c: c.__setitem__(step, value))
    assert f"sets {step}: {json.dumps(value)}" in load_error(folder)


@pytest.mark.parametrize("text, says", [('{"x": 1' + "0" * 5000 + "}", "is not valid JSON"),
                                        ("[" * 100000, "is not valid JSON"), ("null", "holds null, not a JSON object"),
                                        ("[]", "holds an array, not a JSON object"),
                                        ('"x"', "holds a string, not a JSON object"),
                                        ("3", "holds a number, not a JSON object")])
def test_a_config_json_that_is_no_json_object_is_one_line(folder, text, says):
    """A number longer than Python reads, arrays nested past its recursion limit, null, an array, a string, a
    number: each said as what it is."""
    (folder / "config.json").write_text(text)
    message = load_error(folder)
    assert f"config.json {says}" in message, message


@pytest.mark.parametrize("rope,says", [
    ({"rope_type": "dynamic", "factor": 2.0}, "not supported"), ({"type": "yarn", "factor": 4.0}, "not supported"),
    ({"type": "linear"}, "factor of at least 1"), ({"rope_type": "linear", "factor": 0}, "factor"),
    ({"rope_type": "linear", "factor": 5e-324}, "factor of at least 1"),   # angles of inf: NaN logits
    ({"rope_type": "linear", "factor": "4"}, "factor"),
    ({"rope_type": "linear", "factor": float("inf")}, "factor of at least 1"),  # JSON's Infinity: every angle 0
    ({"rope_type": "linear", "factor": True}, "factor of at least 1"),          # true is no number
])
def test_rope_scaling_other_than_linear_or_without_a_factor(folder, rope, says):
    """tinyavl implements plain and linear RoPE; another kind, or a linear one without a positive factor,
    would rotate keys by other angles than the checkpoint was trained with."""
    edit_json(folder / "config.json", lambda c: c["text_config"].__setitem__("rope_scaling", rope))
    message = load_error(folder)
    assert "RoPE scaling" in message and says in message and repr(rope) in message, message


@pytest.mark.parametrize("factor", [1, 1.0, 4.0])
def test_linear_rope_scaling_takes_any_factor_from_1(factor):
    """The refusal above says "at least 1": 1 itself (no scaling) is a factor transformers takes too."""
    raw = sparse_config(VARIANTS["mha"])
    raw["text_config"]["rope_scaling"] = {"rope_type": "linear", "factor": factor}
    assert parse_config(raw).text.rope_linear_factor == factor


def test_a_rope_linear_factor_key_in_the_file_scales_nothing():
    """rope_linear_factor is tinyavl's field, not a key transformers reads: a file that has one gets plain
    RoPE, as in transformers (its rope_scaling alone can scale)."""
    raw = sparse_config(VARIANTS["mha"])
    raw["text_config"]["rope_linear_factor"] = 4.0
    assert parse_config(raw).text.rope_linear_factor == 1.0
    raw["text_config"]["rope_scaling"] = {"rope_type": "linear", "factor": 2.0}
    assert parse_config(raw).text.rope_linear_factor == 2.0


@pytest.mark.parametrize("section, model_type, says", [
    ("text_config", "gemma", "the Llama (Vicuna) and Mistral decoders of LLaVA only"),
    ("vision_config", "siglip_vision_model", "the CLIP vision tower of LLaVA only"),
])
def test_a_decoder_or_vision_tower_tinyavl_does_not_implement_is_refused(folder, section, model_type, says):
    """Weights of another architecture would load into tinyavl's modules by name and run as the wrong model."""
    edit_json(folder / "config.json", lambda c: c[section].__setitem__("model_type", model_type))
    message = load_error(folder)
    assert f"{section}.model_type is {model_type!r}" in message and says in message, message


def test_image_token_outside_the_vocabulary_or_not_an_integer():
    raw = sparse_config(VARIANTS["mha"])
    raw["image_token_index"] = raw["text_config"]["vocab_size"]
    with pytest.raises(UserError, match="image_token_index .* is outside the vocabulary"):
        parse_config(raw)
    raw["image_token_index"] = "4"
    with pytest.raises(UserError, match="image_token_index '4' is not an integer"):
        parse_config(raw)


@pytest.mark.parametrize("layers", [3, 10 ** 9])
def test_more_decoder_layers_than_stored_are_refused_before_the_model_is_built(folder, monkeypatch, layers):
    """The tiny checkpoint stores 2 decoder layers: a config asking for more (a damaged count of a billion
    would build layers until the memory ran out) is refused before any layer is built."""
    edit_json(folder / "config.json", lambda c: c["text_config"].__setitem__("num_hidden_layers", layers))
    monkeypatch.setattr(tinyavl.loading, "LlavaForConditionalGeneration", lambda config: pytest.fail("built"))
    assert f"config.json has {layers} decoder layers (text_config.num_hidden_layers) but the checkpoint stores " \
           "2" in load_error(folder)


@pytest.mark.parametrize("layers", [4, 10 ** 9])
def test_more_vision_layers_than_stored_are_refused_before_the_model_is_built(folder, monkeypatch, layers):
    """The tower is built up to its feature layer, -2: layers - 1 of them (a billion would build layers until
    the memory ran out); the tiny checkpoint stores 2 CLIP layers."""
    edit_json(folder / "config.json", lambda c: (c["vision_config"].__setitem__("num_hidden_layers", layers),
                                                 c.__setitem__("vision_feature_layer", -2)))
    monkeypatch.setattr(tinyavl.loading, "LlavaForConditionalGeneration", lambda config: pytest.fail("built"))
    assert f"config.json has {layers - 1} vision layers to run (vision_config.num_hidden_layers, " \
           "vision_feature_layer) but the checkpoint stores 2:" in load_error(folder)


def test_a_weights_folder_whose_path_is_not_utf8_is_refused_in_one_line(folder):
    """safetensors and tokenizers open UTF-8 paths only: such a folder's tokenizer.json was called invalid
    ("download it again"), though nothing was wrong with it."""
    odd = folder.parent / os.fsdecode(b"ckpt\xfd")
    try:
        folder.rename(odd)
    except OSError:  # a file system that takes UTF-8 names only
        pytest.skip("this file system refuses names that are not UTF-8")
    assert load_error(odd).startswith(f"weights folder {str(odd)!r} is not UTF-8, and tokenizers and safetensors")


@pytest.mark.parametrize("section,field", [("text_config", "hidden_size"), ("text_config", "intermediate_size"),
                                           ("text_config", "vocab_size"), ("vision_config", "hidden_size")])
def test_a_size_past_what_a_tensor_can_address_is_one_line(folder, section, field):
    """2^62 x a layer's width overflows the storage size PyTorch computes, even on the meta device."""
    edit_json(folder / "config.json", lambda c: c[section].__setitem__(field, 2 ** 62))
    assert load_error(folder).startswith("config.json's sizes make a tensor past what PyTorch can address")


def test_empty_vision_feature_layer_list(folder):
    edit_json(folder / "config.json", lambda c: c.__setitem__("vision_feature_layer", []))
    assert "vision_feature_layer" in load_error(folder)


def test_checkpoint_with_more_vision_layers_than_the_config(folder):
    """The file has 2 CLIP layers; a config of 1 layer read at -1 must not silently drop layer 1."""
    edit_json(folder / "config.json", lambda c: (c["vision_config"].__setitem__("num_hidden_layers", 1),
                                                 c.__setitem__("vision_feature_layer", -1)))
    message = load_error(folder)
    assert "unexpected keys" in message and "vision_tower.vision_model.encoder.layers.1." in message


def test_vocab_smaller_than_the_tokenizer(folder):
    """config.json and the embedding rows agree on a vocabulary one token short of tokenizer.json's."""
    vocab = tokenizer_info()["vocab_size"] - 1
    edit_json(folder / "config.json", lambda c: c["text_config"].__setitem__("vocab_size", vocab))
    keys = ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight")
    edit_weights(folder, lambda t: t.update({k: t[k][:vocab].clone() for k in keys}))
    message = load_error(folder)
    assert "tokenizer.json" in message and str(vocab) in message and "vocab_size" in message


def test_the_tokenizer_is_checked_before_any_weight_is_read(folder, monkeypatch):
    """The small files first: a 7B checkpoint's weights take minutes to stream, a broken tokenizer.json
    is said at once."""
    (folder / "tokenizer.json").unlink()
    monkeypatch.setattr(tinyavl, "load_model", lambda *args: pytest.fail("read the weights first"))
    assert "tokenizer.json" in load_error(folder)


@pytest.mark.parametrize("value", [None, "llama"])
def test_no_text_config(folder, value):
    edit_json(folder / "config.json", lambda c: c.pop("text_config") if value is None
              else c.__setitem__("text_config", value))
    assert "no text_config" in load_error(folder)


def test_key_mismatch_is_summarised(folder):
    """Without vision_config the tower is LLaVA's CLIP ViT-L/14-336 (24 layers, the 23 up to its feature layer
    run), where the file stores 2; with only its layer count, the layers' sizes are ViT-L's: every vision
    tensor is mis-shaped, in one short line. Both say where the sizes came from. (preprocessor_config.json's
    56 px crops, which disagree with 336 and are read first, are taken away.)"""
    (folder / "preprocessor_config.json").unlink()
    edit_json(folder / "config.json", lambda c: c.pop("vision_config"))
    message = load_error(folder)
    assert "has 23 vision layers to run" in message and message.endswith("ViT-L/14-336 without a vision_config")
    edit_json(folder / "config.json", lambda c: c.__setitem__("vision_config", {"num_hidden_layers": 3}))
    message = load_error(folder)
    assert "mis-shaped tensors" in message and " more" in message
    assert message.endswith("ViT-L/14-336 without a vision_config")


# ----------------------------------------------------------------------------------------- types and ids
@pytest.mark.parametrize("section,field,value", [
    ("vision_config", "num_channels", 3.0),        # a count, not a number: nn.Conv2d would refuse it later
    ("text_config", "attention_bias", "false"),     # a string: true to Python
    ("text_config", "hidden_act", ["silu"]),
    ("vision_config", "hidden_act", None),
    ("text_config", "eos_token_id", 2.0),
    ("text_config", "eos_token_id", "2"),
    ("text_config", "eos_token_id", -1),
    ("text_config", "eos_token_id", 5000),          # past the vocabulary: generation would never stop at it
    ("text_config", "eos_token_id", []),
    ("text_config", "bos_token_id", 5000),
    ("text_config", "bos_token_id", [1, 2]),        # one token begins a prompt
])
def test_config_value_of_the_wrong_kind(folder, section, field, value):
    edit_json(folder / "config.json", lambda c: c[section].__setitem__(field, value))
    message = load_error(folder)
    assert f"{section}.{field} is {value!r}" in message, message


@pytest.mark.parametrize("field,value", [("multimodal_projector_bias", "false"), ("projector_hidden_act", ["gelu"]),
                                         ("tie_word_embeddings", "false"), ("tie_word_embeddings", 1),
                                         ("model_type", ["llava"])])
def test_top_level_field_of_the_wrong_kind(folder, field, value):
    edit_json(folder / "config.json", lambda c: c.__setitem__(field, value))
    assert f"{field} {value!r}" in load_error(folder).replace(" is ", " ")


@pytest.mark.parametrize("section,field,value", [("text_config", "hidden_act", "mish"),
                                                 ("vision_config", "hidden_act", "tanh"),
                                                 (None, "projector_hidden_act", "gelu_10"),
                                                 (None, "vision_feature_select_strategy", "cls")])
def test_a_setting_tinyavl_does_not_implement(folder, section, field, value):
    """Activations transformers knows but tinyavl does not, and a feature selection transformers does not know."""
    edit_json(folder / "config.json", lambda c: (c[section] if section else c).__setitem__(field, value))
    message = load_error(folder)
    assert repr(value) in message and ("activation" in message or field in message), message


def test_token_ids_in_the_vocabulary_and_none_declared(folder):
    """A list of EOS ids, and null for none, are what config.json may say (transformers reads both)."""
    for value in ([2, 3], None):
        edit_json(folder / "config.json", lambda c: c["text_config"].__setitem__("eos_token_id", value))
        model, _ = tinyavl.load_pretrained(folder, device="cpu")
        assert model.config.text.eos_token_id == value


def edit_tokenizer(folder, edit):
    edit_json(folder / "tokenizer.json", edit)


def test_token_ids_past_the_vocabulary_are_refused_at_load(folder):
    """config.json's vocab_size is the embedding table's rows: a token the tokenizer gives an id past it would
    crash the forward, whether the vocabulary holds it or the post-processor adds it (BOS)."""
    vocab = json.loads((folder / "config.json").read_text())["text_config"]["vocab_size"]

    def eos_far(t):
        for token in t["added_tokens"]:
            if token["content"] == "</s>":
                token["id"] = vocab + 5
        t["model"]["vocab"]["</s>"] = vocab + 5
    edit_tokenizer(folder, eos_far)
    assert f"gives '</s>' the id {vocab + 5}, but config.json's vocab_size is {vocab}" in load_error(folder)


def test_a_bos_id_past_the_vocabulary_is_refused_at_load(folder):
    vocab = json.loads((folder / "config.json").read_text())["text_config"]["vocab_size"]
    edit_tokenizer(folder, lambda t: t["post_processor"]["special_tokens"]["<s>"].__setitem__("ids", [vocab]))
    assert f"adds the id {vocab} (its post-processor)" in load_error(folder)


@pytest.mark.parametrize("key", ["vision_tower.vision_model.encoder.layers.extra.weight",
                                 "language_model.model.layers.extra.weight",
                                 # digits that are no layer's name: int() refused "²" (a traceback before)
                                 "vision_tower.vision_model.encoder.layers.².weight",
                                 "language_model.model.layers.².weight", "language_model.model.layers.01.weight",
                                 # nothing after layers (an IndexError before)
                                 "language_model.model.layers", "model.language_model.layers"])
def test_an_odd_key_among_the_layers_is_an_unexpected_key(folder, key):
    edit_weights(folder, lambda t: t.__setitem__(key, torch.zeros(2)))
    message = load_error(folder)
    assert f"unexpected keys (1): {key}" in message


@pytest.mark.parametrize("field,value", [("image_mean", [1e308, 1e308, 1e308]), ("image_mean", [0.5, 1.2, 0.5]),
                                         ("image_mean", [-0.1, 0.5, 0.5]), ("resample", True),
                                         ("resample", [3]), ("resample", 3.0), ("resample", 99),
                                         ("size", {"shortest_edge": 0}), ("size", {"shortest_edge": "20"}),
                                         ("size", {"shortest_edge": 10 ** 9})])
def test_preprocessing_values_out_of_their_range(folder, field, value):
    """The mean is a colour of pixels in 0 .. 1 (do_pad pads with it: 1e308 x 255 has no integer); a
    resampling filter is one of PIL's integers (true and 3.0 are not, though Python counts them equal;
    99 is none of PIL's filters); the short side is resized to a positive integer, not so large that every
    image resized to it passes PIL's decompression-bomb warning size."""
    edit_json(folder / "preprocessor_config.json", lambda c: c.__setitem__(field, value))
    message = load_error(folder)
    assert "preprocessor_config.json" in message and f"{field} {value!r}" in message
    if value == {"shortest_edge": 10 ** 9}:
        assert "even a square image would have more than" in message
