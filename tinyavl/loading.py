"""Reading a llava-hf folder: config.json into a LlavaConfig, safetensors into a model, tensor by tensor.

    config = read_config(folder)            # config.json, with transformers' class defaults filled in
                                            # (and generation_config.json's ids that end an answer)
    model = load_model(folder)              # built on the meta device, then streamed from the files

Three things make this more than `load_state_dict`:
- A published config.json is sparse: what it leaves out takes the transformers class default, which
  for the decoder depends on its model_type (Llama's and Mistral's differ). `parse_config` applies them.
- Three key layouts exist (the hub files; transformers 4.52-4.57's and 5.x's save_pretrained):
  `published_key` rewrites the others onto the hub's, so one set of module names reads all three.
- A 7B model in fp16 is 13-14 GiB: it is never built in memory first. The model is built on the meta
  device (shapes only), every key, shape and dtype is checked against the files, and then each tensor
  is read from the memory-mapped file, converted, and assigned as the parameter itself.

The same code reads LLaVA-1.5 (model_type "llava") and LLaVA-1.6 (model_type "llava_next", which adds
image_grid_pinpoints to the config and image_newline to the weights), with a Llama (Vicuna) or a
Mistral decoder. Weights load from safetensors only: a pickle (.bin) can run code when it is read.
"""
import math
import re
from collections import Counter
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from tinyavl.errors import UserError
from tinyavl.files import (check_readable, check_utf8_path, name_too_long_as_user_error,
                           read_json_object)
from tinyavl.model import (HiresConfig, LlavaConfig, LlavaForConditionalGeneration, TextConfig, VisionConfig,
                           eos_token_id_rule, is_eos_token_id)

# ---------------------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------------------

# TextConfig's defaults are LlamaConfig's. MistralConfig's differ in these (transformers'
# configuration_mistral.py).
TEXT_MODEL_DEFAULTS = {
    "llama": {},
    "mistral": dict(intermediate_size=14336, num_key_value_heads=8, max_position_embeddings=4096 * 32,
                    sliding_window=4096),
}
MODEL_TYPES = {"llava": "LLaVA-1.5, e.g. llava-hf/llava-1.5-7b-hf",
               "llava_next": "LLaVA-1.6, e.g. llava-hf/llava-v1.6-vicuna-7b-hf"}


def parse_config(raw: dict) -> LlavaConfig:
    """A LlavaConfig from the parsed config.json of a llava-hf folder (UserError for what tinyavl cannot run)."""
    model_type, text_type = supported_types(raw)
    text_raw, vision_raw = dict(raw["text_config"]), raw.get("vision_config")
    text_raw.update(rope_fields(text_raw), tie_word_embeddings=ties_embeddings(raw, text_raw, model_type))
    if text_type == "mistral":  # transformers' Mistral layers have no biases, whatever the file says
        text_raw.update(attention_bias=False, mlp_bias=False)
    if text_type == "llama":  # LlamaConfig keeps a sliding_window key, but its model never reads it
        text_raw.pop("sliding_window", None)
    text_raw = {**TEXT_MODEL_DEFAULTS[text_type], **text_raw}
    config = LlavaConfig(
        text=_dataclass_from(TextConfig, text_raw),
        **({} if vision_raw is None else {"vision": _dataclass_from(VisionConfig, vision_raw)}),  # else LlavaConfig's
        **{key: raw[key] for key in ("projector_hidden_act", "multimodal_projector_bias",
                                     "vision_feature_layer", "vision_feature_select_strategy")
           if key in raw},
    )
    # transformers' LlavaConfig stores image_token_index and reads image_token_id as an alias of it; a file
    # with both is read here as transformers reads it: the alias wins.
    config.image_token_id = raw.get("image_token_id", raw.get("image_token_index", config.image_token_id))
    if model_type == "llava_next":
        # transformers would fall back to the published list; a llava_next config.json always has its own.
        if raw.get("image_grid_pinpoints") is None:
            raise UserError("config.json has model_type 'llava_next' but no image_grid_pinpoints (the canvases "
                            "LLaVA-1.6 tiles an image on): download it again")
        config.image_grid_pinpoints = raw["image_grid_pinpoints"]
    hires_raw = raw.get("hires_config")
    if hires_raw is not None:  # not a llava-hf key: FlexAttention's view and projections (tinyavl/hires.py)
        if not isinstance(hires_raw, dict):
            raise UserError("config.json has a hires_config that is not a JSON object")
        config.hires = _dataclass_from(HiresConfig, hires_raw)
    config.validate()
    return config


def supported_types(raw: dict) -> tuple[str, str]:
    """config.json's model_type and text_config.model_type, where tinyavl can run them: LLaVA-1.5 or 1.6, a
    Llama or Mistral decoder, the CLIP vision tower. UserError otherwise."""
    model_type = raw.get("model_type", "llava")
    if not isinstance(model_type, str) or model_type not in MODEL_TYPES:
        raise UserError(f"config.json has model_type {model_type!r}: tinyavl runs " + " and ".join(
            f"{name!r} ({what})" for name, what in MODEL_TYPES.items()))
    # Without text_config, transformers would build a Llama-2-7B decoder: never what a llava-hf folder holds.
    text_raw, vision_raw = raw.get("text_config"), raw.get("vision_config")
    if not isinstance(text_raw, dict):
        raise UserError("config.json has no text_config object: a llava-hf config.json describes the "
                        "decoder there (hidden_size, num_hidden_layers, vocab_size, ...); download it again")
    if vision_raw is not None and not isinstance(vision_raw, dict):
        raise UserError("config.json has a vision_config that is not a JSON object: download it again")
    text_type = text_raw.get("model_type", "llama")
    if not isinstance(text_type, str) or text_type not in TEXT_MODEL_DEFAULTS:
        raise UserError(f"text_config.model_type is {text_type!r}: tinyavl implements the Llama (Vicuna) and "
                        "Mistral decoders of LLaVA only")
    if vision_raw is not None and vision_raw.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise UserError(f"vision_config.model_type is {vision_raw['model_type']!r}: tinyavl implements "
                        "the CLIP vision tower of LLaVA only")
    return model_type, text_type


def rope_fields(text_raw: dict) -> dict:
    """TextConfig's RoPE fields from text_config: rope_theta where it sets one, and rope_linear_factor
    always, from its linear scaling or 1 (a key named rope_linear_factor is TextConfig's, not
    transformers': a file's own would scale RoPE where transformers does not).

    transformers 5.x writes rope_parameters, older versions rope_theta (+ rope_scaling); where a file has
    both, rope_scaling wins unless it is empty or null, as in transformers (modeling_rope_utils.py,
    convert_rope_params_to_dict: rope_scaling or rope_parameters)."""
    rope = text_raw.get("rope_scaling") or text_raw.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise UserError(f"text_config's RoPE settings are {rope!r}, not a JSON object: download config.json again")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear"):
        raise UserError(f"RoPE scaling {rope!r} is not supported: tinyavl implements plain RoPE and linear scaling")
    settings = {"rope_linear_factor": 1.0, **({"rope_theta": rope["rope_theta"]} if "rope_theta" in rope else {})}
    if rope_type == "linear":
        factor = rope.get("factor")
        if type(factor) not in (int, float) or not 1 <= factor < math.inf:
            raise UserError(f"text_config's linear RoPE scaling {rope!r} needs a factor of at least 1 (a number), "
                            "as transformers expects: download config.json again")
        settings["rope_linear_factor"] = factor
    return settings


def ties_embeddings(raw: dict, text_raw: dict, model_type: str) -> bool:
    """Whether the output layer is the input embedding, as transformers reads config.json: at the top level,
    and for LLaVA-1.5 also in text_config, where older llava-hf files wrote it (LlavaConfig lifts it from
    there; LlavaNextConfig does not, so a LLaVA-1.6 file tied only there loads its own output layer)."""
    ties = {"tie_word_embeddings": raw.get("tie_word_embeddings"),
            "text_config.tie_word_embeddings": text_raw.get("tie_word_embeddings")}
    for name, value in ties.items():
        if value is not None and type(value) is not bool:  # the string "false" would tie
            raise UserError(f"config.json has {name} {value!r}: it must be true or false")
    return bool(ties["tie_word_embeddings"] or (model_type == "llava" and ties["text_config.tie_word_embeddings"]))


def _dataclass_from(cls, raw: dict):
    """Build a config dataclass from the keys it knows; config.json holds many more (dropout, ids...)."""
    known = {f.name for f in fields(cls)}
    return cls(**{key: value for key, value in raw.items() if key in known})


def read_config(folder: Path | str) -> LlavaConfig:
    folder = Path(folder)
    check_utf8_path(folder, "weights folder")
    path = folder / "config.json"
    with name_too_long_as_user_error(f"weights folder {str(folder)!r}"):
        if folder.exists() and not folder.is_dir():
            raise UserError(f"weights {str(folder)!r} is a file: give the llava-hf model folder that holds it")
        if not folder.is_dir():
            raise UserError(f"weights folder {str(folder)!r} does not exist: put a llava-hf model folder there "
                            "(see weights/README.md)")
        if path.exists() and not path.is_file():
            raise UserError(f"{path} is not a file: a llava-hf model folder holds config.json beside its "
                            "safetensors")
        if not path.is_file():
            raise UserError(f"{path} is missing: a llava-hf model folder holds config.json beside its safetensors")
    config = parse_config(read_json_object(path))
    config.text.eos_token_id = answer_end_ids(folder / "generation_config.json", config.text)
    return config


def answer_end_ids(path: Path, text: TextConfig) -> int | list[int] | None:
    """The ids that end an answer: generation_config.json's eos_token_id where the folder's file declares it
    (null included), else config.json's text_config.eos_token_id, as transformers' generate takes them.
    (Where generation_config.json leaves the key out, or neither file names an id, transformers stops at no
    id; tinyavl then stops at config.json's, Llama's default 2 where the file gives none.)"""
    declared = read_json_object(path, optional=True)
    if declared is None or "eos_token_id" not in declared:
        return text.eos_token_id
    eos = declared["eos_token_id"]
    if not is_eos_token_id(eos, text.vocab_size):
        raise UserError(f"{path}: eos_token_id is {eos!r}, but it must be {eos_token_id_rule(text.vocab_size)}; "
                        "fix the value, or remove the key to stop at config.json's")
    return eos


# ---------------------------------------------------------------------------------------------------
# safetensors: key layouts, files, dtypes, streaming
# ---------------------------------------------------------------------------------------------------

# Prefixes of transformers' own save layouts (4.52-4.57 and 5.x), mapped back to the published hub layout.
KEY_REWRITES = [
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.image_newline", "image_newline"),
]


def transformers_key(key: str) -> str:
    """The name transformers >= 4.52 gives a published-layout key of the decoder, the projector or the
    newline in memory (`KEY_REWRITES` the other way; its 5.x vision tower also drops `vision_model.`)."""
    for in_memory, published in KEY_REWRITES:
        if key.startswith(published):
            return in_memory + key[len(published):]
    return key


def published_key(key: str) -> str:
    """The published-layout name of a checkpoint key written by any supported transformers version."""
    for old, new in KEY_REWRITES:
        if key.startswith(old):
            key = new + key[len(old):]
            break
    # After the prefix: transformers 5.x also drops `vision_model.` from the vision tower's keys.
    if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
        key = "vision_tower.vision_model." + key[len("vision_tower."):]
    return key


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder: the single model.safetensors, or else the shards an index names
    (transformers' order: a folder holding both loads the single file)."""
    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    if index.is_file():
        weight_map = read_json_object(index).get("weight_map")
        if not (isinstance(weight_map, dict) and all(isinstance(f, str) for f in weight_map.values())):
            raise UserError(f"{index}: its weight_map is not a JSON object from tensor names to shard files")
        if not weight_map:
            raise UserError(f"{index}: its weight_map names no tensor; download the index again")
        names = sorted(set(weight_map.values()))
        # A shard is a file of the model's folder: an absolute path or one through ".." would load the weights
        # of wherever it points, with no sign of it in the folder the user gave.
        elsewhere = [name for name in names if Path(name).is_absolute() or ".." in Path(name).parts]
        if elsewhere:
            raise UserError(f"{index} names shards outside its folder ({', '.join(elsewhere[:3])}): a shard is a "
                            "file in the model's folder; download the index again")
        files = [folder / name for name in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise UserError(f"{index.name} lists shards that are missing from {folder}: {', '.join(missing)}")
        return files
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise UserError(f"{folder} holds only pickle weights (.bin/.pt): tinyavl loads safetensors only, "
                        "because unpickling can run code; download the .safetensors files")
    raise UserError(f"no model.safetensors or model.safetensors.index.json in {folder}")


STORED_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
FLOAT_DTYPES = {"F64", *STORED_DTYPES}
DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
               "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):  # torch's own refusal of a name it does not know
        raise UserError(f"unknown device {device!r}: use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("CUDA was asked for but this machine has no CUDA device: use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"unsupported device {str(device)!r}: use cpu or cuda")
    return device


def resolve_dtype(dtype, stored: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype to run in: one of DTYPE_NAMES' (by name or as a torch dtype), or None for the default."""
    if isinstance(dtype, str) and dtype in DTYPE_NAMES:
        dtype = DTYPE_NAMES[dtype]
    if dtype is not None and dtype not in DTYPE_NAMES.values():  # e.g. "int8", torch.int8 or float64
        raise UserError(f"dtype {dtype!r} is not one tinyavl runs in: use one of {', '.join(DTYPE_NAMES)}")
    if dtype is not None:
        return dtype
    # Default: the stored dtype, except fp16 on a CPU, whose matmuls are slow there; bf16 has the same size.
    return torch.bfloat16 if (stored == torch.float16 and device.type == "cpu") else stored


def open_safetensors(path: Path):
    """safe_open, with a broken file reported as the user's problem rather than a traceback."""
    try:
        return safe_open(path, framework="pt")
    except SafetensorError as err:
        raise UserError(f"{path} is not a readable safetensors file ({err})") from None


@dataclass(frozen=True)
class StoredTensor:
    """One tensor as its file's header describes it: where it is, its dtype ("F16", ...) and its shape."""
    path: Path
    key: str
    dtype: str
    shape: tuple[int, ...]


def read_headers(files: list[Path]) -> list[StoredTensor]:
    """Every tensor the checkpoint stores, in file order, from the files' headers alone (no tensor is read):
    what the checks before the weights load look at."""
    stored = []
    for path in files:
        with open_safetensors(path) as f:
            for key in f.keys():
                header = f.get_slice(key)
                stored.append(StoredTensor(path, key, header.get_dtype(), tuple(header.get_shape())))
    return stored


def first_few(items: list[str]) -> str:
    """The count and the first few items: a config for another model size mismatches every key."""
    shown = 3
    more = f" ... and {len(items) - shown} more" if len(items) > shown else ""
    return f"({len(items)}): {', '.join(items[:shown])}{more}"


def all_finite(t: torch.Tensor) -> bool:
    # min and max propagate NaN and show inf; one reduction is ~50x faster than isfinite(t).all() on a CPU.
    return bool(torch.isfinite(torch.stack(torch.aminmax(t))).all())


def ignored_key(model: LlavaForConditionalGeneration, key: str) -> bool:
    """Keys the forward never reads: post_layernorm, CLIP layers after the feature layer, and the
    position-id / rotary buffers older transformers versions saved (we derive them). A layer past
    vision_config.num_hidden_layers is not ignored: config.json and the file disagree."""
    if key.startswith("vision_tower.vision_model.post_layernorm."):
        return True
    if key.endswith((".position_ids", ".rotary_emb.inv_freq")):
        return True
    layer = layer_number(key, VISION_LAYERS)
    if layer is None:  # not a layer's: an unexpected key, unless the model has it
        return False
    built = len(model.vision_tower.vision_model.encoder.layers)
    return built <= layer < model.config.vision.num_hidden_layers  # in the file, never run


# Why config.json's sizes may disagree with the tensors' where the files come from one checkpoint.
DEFAULT_SIZES_HINT = (". Sizes config.json leaves out take transformers' defaults: Llama-2-7B in text_config, CLIP "
                      "ViT-L/14-336 without a vision_config")
VISION_LAYERS, DECODER_LAYERS = "vision_tower.vision_model.encoder.layers.", "language_model.model.layers."


def layer_number(key: str, prefix: str) -> int | None:
    """i of a key prefix + "<i>.<...>" (prefix: VISION_LAYERS, DECODER_LAYERS), i written as PyTorch names a
    layer (0, 1, ..., 12); None for any other key."""
    if not key.startswith(prefix):
        return None
    index = key[len(prefix):].split(".")[0]
    return int(index) if re.fullmatch(r"0|[1-9][0-9]*", index) else None  # not "²", "01" or ""


LM_HEAD = "language_model.lm_head.weight"


def match_keys(model: LlavaForConditionalGeneration, stored: list[StoredTensor]) -> tuple[dict, tuple | None]:
    """Where each of the model's tensors is in the files, {published name: (file, key)}, and a tied
    checkpoint's stored copy of the head ((file, key) or None); UserError, naming them, for keys missing or
    unexpected, a tensor stored twice, shapes that differ from the model's, and tensors that are not
    floating point."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}  # shapes only (meta)
    tied = model.config.text.tie_word_embeddings
    if tied:  # the head shares the embedding matrix; checkpoints usually omit it
        expected.pop(LM_HEAD)
    found, unexpected, misshaped, not_float, twice = {}, [], {}, [], []
    stored_head = None  # a tied checkpoint's copy of the head, if it keeps one: (file, key)
    first_key = {}  # published name -> the first stored key that names it
    for tensor in stored:
        name = published_key(tensor.key)
        if ignored_key(model, name):
            continue
        # Two keys for one tensor (two layouts' spellings, or one key in two shards) leave no way to know
        # which copy the checkpoint means: loading either would be a silent guess.
        if name in first_key:
            twice.append(f"{first_key[name]} and {tensor.key}" if first_key[name] != tensor.key
                         else f"{tensor.key} (in two files)")
            continue
        first_key[name] = tensor.key
        if tensor.dtype not in FLOAT_DTYPES:  # e.g. int8: a cast would give nonsense weights
            not_float.append(f"{tensor.key} ({tensor.dtype})")
        if tied and name == LM_HEAD:
            stored_head = (tensor.path, tensor.key)
        elif name not in expected:
            unexpected.append(tensor.key)
        elif tensor.shape != expected[name]:
            misshaped[name] = f"{tensor.key} {list(tensor.shape)} (model expects {list(expected[name])})"
        else:
            found[name] = (tensor.path, tensor.key)
    if not_float:
        raise UserError(f"checkpoint has non-float tensors {first_few(not_float)}; tinyavl loads float weights "
                        "(F32, F16, BF16) only, not quantised checkpoints: use the original llava-hf files")
    if twice:
        raise UserError(f"checkpoint stores tensors twice {first_few(twice)}; tinyavl cannot tell which copy "
                        "to load: keep one of each")
    missing = sorted(set(expected) - set(found) - set(misshaped))
    problems = [f"{label} {first_few(items)}" for label, items in
                (("missing keys", missing), ("unexpected keys", sorted(unexpected)),
                 ("mis-shaped tensors", list(misshaped.values()))) if items]
    if problems:
        raise UserError("checkpoint does not match config.json; " + "; ".join(problems) +
                        (DEFAULT_SIZES_HINT if misshaped else ""))
    return found, stored_head


def load_weights(model: LlavaForConditionalGeneration, stored: list[StoredTensor], dtype, device) -> None:
    """Check every key, shape and dtype against the model (`match_keys`), then stream the tensors in one by one.

    The model was built on the meta device (no memory); each tensor is read from the memory-mapped
    file, converted to the run dtype on the run device, and assigned as the parameter itself, so a
    7B model never exists twice in memory.
    """
    found, stored_head = match_keys(model, stored)
    tied = model.config.text.tie_word_embeddings
    state = {}
    for name, (path, key) in found.items():
        # One mapping per tensor: pages of a file that stays mapped count towards the process's memory
        # until it is closed, so holding a whole 5 GB shard open would add 5 GB to the peak.
        with open_safetensors(path) as f:
            tensor = f.get_tensor(key)
            state[name] = tensor.to(device=device, dtype=dtype)
        check_finite(tensor, state[name], path, key)
    if tied:
        embedding = state["language_model.model.embed_tokens.weight"]
        if stored_head is not None:  # kept beside the embedding: tying must not change what it holds
            with open_safetensors(stored_head[0]) as f:
                if not torch.equal(f.get_tensor(stored_head[1]).to(device=device, dtype=dtype), embedding):
                    raise UserError(f"config.json ties the output head to the input embedding, but the checkpoint's "
                                    f"{stored_head[1]} differs from it: set tie_word_embeddings to false (at the top "
                                    "level and in text_config)")
        state[LM_HEAD] = embedding
    model.load_state_dict(state, assign=True)
    if tied:  # assign=True replaced both parameters: tie them again
        model.language_model.lm_head.weight = model.language_model.model.embed_tokens.weight


def check_finite(stored, converted, path: Path, key: str) -> None:
    """A UserError unless the tensor `key` of the file `path` is finite as stored and as converted to the run
    dtype. One NaN or inf, even in a norm weight, makes every logit NaN: the answer would be <unk> repeated.
    Checked after the conversion too, so a value the run dtype cannot hold (fp32 -> fp16) is caught."""
    if all_finite(converted):
        return
    if not all_finite(stored):
        raise UserError(f"tensor {key} in {path.name} holds NaN or inf values: the file is damaged, download it again")
    if not all_finite(stored.float()):
        # An F64 file: bfloat16 has float32's range, so no --dtype would hold it.
        raise UserError(f"tensor {key} in {path.name} holds values past float32's range, which no weight of a "
                        "trained model reaches: the file is damaged, download it again")
    # Within float32's range, not the run dtype's.
    wider = "bfloat16 or float32" if converted.dtype == torch.float16 else "float32"
    raise UserError(f"tensor {key} overflows {str(converted.dtype).removeprefix('torch.')}: load the model in {wider} "
                    "(--dtype)")


def stored_dtype(stored: list[StoredTensor]) -> torch.dtype:
    """The floating dtype the checkpoint was saved in (fp16 for the published llava-hf files): the one most of
    its values are stored in (a file may keep a few tensors in another, as an fp32 head beside fp16 weights);
    float32 for an F64 checkpoint, which tinyavl does not run in."""
    values = Counter()  # stored dtype -> how many values the checkpoint holds in it
    for tensor in stored:
        if tensor.dtype in FLOAT_DTYPES:  # F64's values count as float32's, the dtype they run in
            values[STORED_DTYPES.get(tensor.dtype, torch.float32)] += math.prod(tensor.shape)
    return max(values, key=values.get, default=torch.float32)


def check_layer_counts(config: LlavaConfig, stored: list[StoredTensor]) -> None:
    """UserError if config.json asks for more decoder or vision layers than the checkpoint stores, before the
    model is built: a damaged num_hidden_layers (a billion) would build layers until the memory ran out.
    (Fewer layers than stored are unexpected keys, `match_keys`.)"""
    keys = [published_key(tensor.key) for tensor in stored]
    # The tower is built up to its deepest feature layer (`LlavaForConditionalGeneration`), so many layers.
    for prefix, wanted, what in (
            (DECODER_LAYERS, config.text.num_hidden_layers, "decoder layers (text_config.num_hidden_layers)"),
            (VISION_LAYERS, max(config.feature_layers),
             "vision layers to run (vision_config.num_hidden_layers, vision_feature_layer)")):
        # another part after the prefix is an odd key, for match_keys to name
        layers = {number for key in keys if (number := layer_number(key, prefix)) is not None}
        if wanted > len(layers):
            raise UserError(f"config.json has {wanted} {what} but the checkpoint stores {len(layers)}: the "
                            "files come from different checkpoints" + DEFAULT_SIZES_HINT)


def load_model(path, device=None, dtype=None, config: LlavaConfig | None = None) -> LlavaForConditionalGeneration:
    """The model of a llava-hf folder, on `device` (default: cuda if available), in `dtype` (default: the
    stored one, fp16 as bf16 on a CPU). config: the folder's, where the caller has read it (`read_config`)."""
    folder = Path(path)
    config = read_config(folder) if config is None else config
    files = checkpoint_files(folder)
    for file in files:  # once each, before the tensors are read one by one
        check_readable(file)
    stored = read_headers(files)
    check_layer_counts(config, stored)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, stored_dtype(stored), device)
    with torch.device("meta"):
        try:
            model = LlavaForConditionalGeneration(config)
        except RuntimeError as err:
            if "overflow" not in str(err):
                raise
            # A size (hidden_size 2^31) whose tensors no machine can address: the files then disagree anyway.
            raise UserError(f"config.json's sizes make a tensor past what PyTorch can address ({err}): the file "
                            "is damaged, or comes from another checkpoint") from None
    load_weights(model, stored, dtype, device)
    return model.eval().requires_grad_(False)
