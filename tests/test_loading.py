"""Loading llava-hf folders: every key layout, shards, stored dtypes, sparse configs, and loud errors.

Reference tensors come from the transformers model the folder was written from (tests/tiny_checkpoints.py),
renamed to the published layout, never from another tinyavl load.
"""
import copy
import json
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import tinyavl
from tinyavl.cli import TOY_WEIGHTS
from tinyavl.errors import UserError
from tinyavl.loading import StoredTensor, parse_config, read_config, resolve_dtype, stored_dtype
from tiny_checkpoints import (LAYOUTS, VARIANTS, make_image, published_state_dict, sparse_config,
                              tokenizer_info, write_checkpoint)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def unused_by_forward(key: str, config) -> bool:
    """Checkpoint keys a LLaVA forward never reads, derived from the HF config alone: `post_layernorm`
    and the CLIP layers after the deepest feature layer (hidden state i is the output of layer i - 1)."""
    if key.startswith("vision_tower.vision_model.post_layernorm."):
        return True
    m = re.match(r"vision_tower\.vision_model\.encoder\.layers\.(\d+)\.", key)
    if not m:
        return False
    n_states = config.vision_config.num_hidden_layers + 1
    layers = config.vision_feature_layer
    deepest = max(layer % n_states for layer in (layers if isinstance(layers, list) else [layers]))
    return int(m.group(1)) >= deepest


def assert_weights_equal(model, hf_model, dtype=torch.float32):
    """tinyavl's state_dict == the HF weights (published names) cast to `dtype`, bit for bit; any HF key
    tinyavl does not hold must be one the forward never reads."""
    ours = model.state_dict()
    ref = published_state_dict(hf_model)
    assert set(ours) <= set(ref), f"keys not in the checkpoint: {sorted(set(ours) - set(ref))[:5]}"
    skipped = sorted(set(ref) - set(ours))
    assert all(unused_by_forward(k, hf_model.config) for k in skipped), [
        k for k in skipped if not unused_by_forward(k, hf_model.config)]
    for key, tensor in ours.items():
        assert tensor.device.type == "cpu"
        assert tensor.dtype == dtype, (key, tensor.dtype)
        assert torch.equal(tensor, ref[key].to(dtype)), key


# ----------------------------------------------------------------------------------------- layouts, shards
@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_and_sharding_loads_the_same_tensors(tiny_ckpt, layout, shards):
    folder = tiny_ckpt.folder("gqa_full", layout=layout, shards=shards)
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    assert len(files) == shards
    model, _ = tinyavl.load_pretrained(folder, device="cpu")
    assert_weights_equal(model, tiny_ckpt.model("gqa_full"))


@pytest.mark.parametrize("name", ["mqa_rope", "multilayer"])
def test_all_vision_layers_load_when_the_last_one_is_a_feature_layer(tiny_ckpt, name):
    """Feature layer -1 (alone or in a list): every CLIP layer is needed and must be loaded."""
    model, _ = tinyavl.load_pretrained(tiny_ckpt.folder(name, layout="tf5", shards=2), device="cpu")
    hf_model = tiny_ckpt.model(name)
    assert_weights_equal(model, hf_model)
    n_layers = hf_model.config.vision_config.num_hidden_layers
    assert f"vision_tower.vision_model.encoder.layers.{n_layers - 1}.mlp.fc2.weight" in model.state_dict()


# ----------------------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("run", [None, "float32", "bfloat16", torch.float16])
@pytest.mark.parametrize("stored", ["float32", "float16", "bfloat16"])
def test_stored_and_run_dtypes(tiny_ckpt, stored, run):
    """Values are the stored tensors converted to the run dtype (e.g. fp16 storage run in fp32 = fp16 upcast)."""
    stored_dtype = DTYPES[stored]
    folder = tiny_ckpt.folder("mha", layout="published", shards=2, dtype=stored_dtype)
    model, _ = tinyavl.load_pretrained(folder, device="cpu", dtype=run)
    if run is None:
        # None keeps the stored dtype. Documented exception in load_pretrained: fp16 runs as bf16 on a CPU.
        expected = torch.bfloat16 if stored_dtype == torch.float16 else stored_dtype
    else:
        expected = DTYPES[run] if isinstance(run, str) else run
    hf_model = tiny_ckpt.model("mha")
    ours, ref = model.state_dict(), published_state_dict(hf_model)
    for key, tensor in ours.items():
        assert tensor.dtype == expected, (key, tensor.dtype)
        assert torch.equal(tensor, ref[key].to(stored_dtype).to(expected)), key
    # and the loaded model runs in that dtype
    ids = torch.tensor([[1, 300, 301, 302]])
    with torch.no_grad():
        assert torch.isfinite(model(ids)).all()


@pytest.mark.parametrize("most, head", [("float32", "float16"), ("float16", "float32")])
def test_a_checkpoint_of_mixed_dtypes_runs_in_the_dtype_most_of_it_is_stored_in(tiny_ckpt, tmp_path, most, head):
    """A checkpoint whose language head alone is stored in another dtype (the first tensor of a llava-hf
    file, by key) runs, by default, in the dtype of the rest (fp16 as bf16 on a CPU, as always)."""
    from safetensors.torch import load_file, save_file
    folder = shutil.copytree(tiny_ckpt.folder("mha", layout="published", dtype=DTYPES[most]), tmp_path / "mixed")
    tensors = load_file(folder / "model.safetensors")
    assert min(tensors) == "language_model.lm_head.weight"
    tensors["language_model.lm_head.weight"] = tensors["language_model.lm_head.weight"].to(DTYPES[head])
    assert tensors["language_model.lm_head.weight"].numel() < sum(t.numel() for t in tensors.values()) / 2
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    model, _ = tinyavl.load_pretrained(folder, device="cpu")
    expected = {"float32": torch.float32, "float16": torch.bfloat16}[most]
    assert {t.dtype for t in model.state_dict().values()} == {expected}


@pytest.mark.parametrize("dtype", ["int8", "float64", torch.int8, torch.float64, 16])
def test_a_dtype_tinyavl_does_not_run_in_is_refused(tiny_ckpt, dtype):
    """fp32, fp16 and bf16, by name or as torch dtypes; anything else is one line, not load_state_dict's error."""
    with pytest.raises(UserError, match="is not one tinyavl runs in"):
        tinyavl.load_pretrained(tiny_ckpt.folder("mha"), device="cpu", dtype=dtype)


def test_the_default_dtype_is_the_one_most_values_are_stored_in_not_most_tensors():
    """One 64 x 64 matrix in fp16 (4096 values) beside ten 64-vectors in fp32 (640 values, as norms a file may
    keep in fp32): the checkpoint is fp16, though most of its tensors are fp32."""
    f = Path("model.safetensors")
    stored = [StoredTensor(f, "w", "F16", (64, 64))] + [StoredTensor(f, f"norm{i}", "F32", (64,)) for i in range(10)]
    assert stored_dtype(stored) == torch.float16
    assert stored_dtype(stored[1:]) == torch.float32
    # An F64 checkpoint runs in float32, its values counted as float32's: one fp16 vector does not make it fp16.
    f64 = [StoredTensor(f, "w", "F64", (64, 64)), StoredTensor(f, "bias", "F16", (64,))]
    assert stored_dtype(f64) == torch.float32


def test_fp16_runs_as_fp16_on_cuda_and_only_as_bf16_on_a_cpu():
    """resolve_dtype's default: the stored dtype, except fp16 on a CPU (no CUDA needed to ask about cuda)."""
    assert resolve_dtype(None, torch.float16, torch.device("cuda")) == torch.float16
    assert resolve_dtype(None, torch.float16, torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype(None, torch.bfloat16, torch.device("cuda")) == torch.bfloat16


def test_an_fp64_checkpoint_loads_in_float32(tiny_ckpt):
    """F64 is a float dtype tinyavl reads (FLOAT_DTYPES) but does not run in: by default it runs in float32."""
    model, _ = tinyavl.load_pretrained(tiny_ckpt.folder("mha", dtype=torch.float64), device="cpu")
    ref = published_state_dict(tiny_ckpt.model("mha"))
    for key, tensor in model.state_dict().items():
        assert tensor.dtype == torch.float32, key
        assert torch.equal(tensor, ref[key].to(torch.float64).to(torch.float32)), key


@pytest.mark.parametrize("device", ["bogus", "meta", 3.5])
def test_a_device_tinyavl_does_not_run_on_is_refused(tiny_ckpt, device):
    with pytest.raises(UserError, match="device"):
        tinyavl.load_pretrained(tiny_ckpt.folder("mha"), device=device)


# ----------------------------------------------------------------------------------------- sparse configs
def test_sparse_config_takes_file_values_and_class_defaults(tiny_ckpt):
    folder = tiny_ckpt.folder("mha")
    raw = json.load(open(os.path.join(folder, "config.json")))
    # The file really is sparse: these all have to come from defaults.
    for absent in ("hidden_act", "rope_theta", "rope_parameters", "num_key_value_heads", "head_dim",
                   "bos_token_id", "eos_token_id"):
        assert absent not in raw["text_config"], absent
    assert "hidden_act" not in raw["vision_config"] and "layer_norm_eps" not in raw["vision_config"]

    model, _ = tinyavl.load_pretrained(folder, device="cpu")
    text, vision = model.config.text, model.config.vision
    assert text.rms_norm_eps == 1e-5  # from the file; Llama's class default is 1e-6
    assert (text.hidden_size, text.intermediate_size, text.num_hidden_layers) == (64, 128, 2)
    assert text.num_attention_heads == 4 and text.num_key_value_heads == 4  # absent: = heads
    assert text.head_dim == 16  # absent: hidden / heads
    assert text.vocab_size == tokenizer_info()["vocab_size"]
    assert text.hidden_act == "silu" and text.rope_theta == 10000.0
    assert text.tie_word_embeddings is False and (text.bos_token_id, text.eos_token_id) == (1, 2)
    assert (vision.hidden_size, vision.image_size, vision.patch_size) == (32, 56, 14)
    assert vision.hidden_act == "quick_gelu" and vision.layer_norm_eps == 1e-5
    assert model.config.image_token_id == tokenizer_info()["image_token_id"]
    assert model.config.num_image_tokens == 16
    assert model.config.projector_hidden_act == "gelu"


# Settings a config.json can give twice or in two places, each read as transformers' LlavaConfig reads it.
TWICE = {
    "rope_scaling beside rope_parameters": {"text_config": {
        "rope_scaling": {"rope_type": "default", "rope_theta": 1e6},
        "rope_parameters": {"rope_type": "default", "rope_theta": 100.0}}},
    "empty rope_scaling beside rope_parameters": {"text_config": {
        "rope_scaling": {}, "rope_parameters": {"rope_type": "default", "rope_theta": 100.0}}},
    "tie at the top only": {"tie_word_embeddings": True},
    "tie at the top, not in text_config": {"tie_word_embeddings": True, "text_config": {"tie_word_embeddings": False}},
    "tie in text_config only": {"text_config": {"tie_word_embeddings": True}},
    "both image token spellings": {"image_token_index": 70, "image_token_id": 71},
    "mistral with bias flags": {"text_config": {"model_type": "mistral", "sliding_window": None,
                                                "num_key_value_heads": 4, "attention_bias": True, "mlp_bias": True}},
}


@pytest.mark.parametrize("case", TWICE)
def test_settings_given_twice_are_read_as_transformers_reads_them(tiny_ckpt, case):
    from transformers import AutoModelForCausalLM, LlavaConfig as HFLlavaConfig
    raw = json.load(open(os.path.join(tiny_ckpt.folder("mha"), "config.json")))
    edit = TWICE[case]
    raw = {**raw, **{k: v for k, v in edit.items() if k != "text_config"},
           "text_config": {**raw["text_config"], **edit.get("text_config", {})}}
    ours, theirs = tinyavl.loading.parse_config(json.loads(json.dumps(raw))), HFLlavaConfig.from_dict(raw)
    hf_text = theirs.text_config
    assert ours.text.rope_theta == hf_text.rope_parameters["rope_theta"]
    assert ours.text.tie_word_embeddings == theirs.tie_word_embeddings
    assert ours.image_token_id == theirs.image_token_id
    # Biases: what transformers' decoder layer builds (Mistral's config keeps the flags, its layers ignore them).
    hf_layer = AutoModelForCausalLM.from_config(hf_text).model.layers[0]
    assert ours.text.attention_bias == (hf_layer.self_attn.q_proj.bias is not None)
    assert ours.text.mlp_bias == (hf_layer.mlp.gate_proj.bias is not None)


def test_rope_type_wins_over_type_as_in_transformers():
    """A rope_scaling with both spellings of its kind: transformers reads rope_type; "type" is the old alias."""
    from transformers import LlavaConfig as HFLlavaConfig
    raw = sparse_config(VARIANTS["mha"])
    raw["text_config"]["rope_scaling"] = {"rope_type": "linear", "type": "default", "factor": 2.0}
    theirs = HFLlavaConfig.from_dict(json.loads(json.dumps(raw))).text_config.rope_parameters
    assert theirs["rope_type"] == "linear" and theirs["factor"] == 2.0
    assert parse_config(json.loads(json.dumps(raw))).text.rope_linear_factor == 2.0


@pytest.mark.parametrize("top", [True, False, None], ids=["top true", "top false", "top absent"])
@pytest.mark.parametrize("inner", [True, False, None], ids=["text true", "text false", "text absent"])
def test_a_next_config_ties_as_transformers_reads_it(tiny_ckpt, top, inner):
    """LLaVA-1.6: LlavaNextConfig reads tie_word_embeddings at the top level only (LlavaConfig also takes
    text_config's, above): the 9 ways a file can say it or not."""
    from transformers import LlavaNextConfig
    raw = json.load(open(os.path.join(tiny_ckpt.folder("next_vicuna_mha"), "config.json")))
    raw.pop("tie_word_embeddings", None)
    raw["text_config"].pop("tie_word_embeddings", None)
    if top is not None:
        raw["tie_word_embeddings"] = top
    if inner is not None:
        raw["text_config"]["tie_word_embeddings"] = inner
    ours = tinyavl.loading.parse_config(json.loads(json.dumps(raw)))
    assert ours.text.tie_word_embeddings == LlavaNextConfig.from_dict(raw).tie_word_embeddings == bool(top)


def test_a_folder_with_one_file_and_an_index_loads_the_one_file(tiny_ckpt, tmp_path):
    """transformers looks for model.safetensors first: a stale index beside it (its shards still there) is
    not read."""
    folder = shutil.copytree(tiny_ckpt.folder("gqa_full", shards=2), tmp_path / "both")
    single = tiny_ckpt.folder("gqa_full", shards=1)
    shutil.copy(os.path.join(single, "model.safetensors"), folder / "model.safetensors")
    rewrite_weights(str(folder), lambda t: t.update({"multi_modal_projector.linear_2.bias":
                                                     t["multi_modal_projector.linear_2.bias"] + 1}))
    model, _ = tinyavl.load_pretrained(folder, device="cpu")
    key = "multi_modal_projector.linear_2.bias"
    reference = published_state_dict(tiny_ckpt.model("gqa_full"))[key]
    torch.testing.assert_close(model.state_dict()[key], reference + 1, atol=0, rtol=0)


def test_a_tied_checkpoint_may_keep_its_head_if_it_is_the_embedding(good_folder):
    config_path = os.path.join(good_folder, "config.json")
    config = json.load(open(config_path))
    config["tie_word_embeddings"] = True
    json.dump(config, open(config_path, "w"))
    head, embedding = "language_model.lm_head.weight", "language_model.model.embed_tokens.weight"
    rewrite_weights(good_folder, lambda t: t.update({head: t[embedding].clone()}))
    model, _ = tinyavl.load_pretrained(good_folder, device="cpu")
    assert model.language_model.lm_head.weight is model.language_model.model.embed_tokens.weight
    rewrite_weights(good_folder, lambda t: t.update({head: t[embedding] + 1}))
    # LLaVA-1.5 ties where either key says so: the remedy names both.
    assert "differs from it: set tie_word_embeddings to false (at the top level and in text_config)" in \
        load_error(good_folder)


def test_full_strategy_and_gqa_from_config(tiny_ckpt):
    model, _ = tinyavl.load_pretrained(tiny_ckpt.folder("gqa_full"), device="cpu")
    assert model.config.text.num_key_value_heads == 2
    assert model.config.num_image_tokens == 37  # 6 x 6 patches + CLS


@pytest.mark.parametrize("name", ["mqa_rope", "multilayer"])
def test_rope_theta_and_rope_parameters_spellings_give_the_same_model(tiny_ckpt, tmp_path, name):
    variant = VARIANTS[name]
    hf_model = tiny_ckpt.model(name)
    configs = {}
    base = sparse_config(variant)
    for key in ("rope_parameters", "rope_theta", "rope_scaling"):
        base["text_config"].pop(key, None)
    configs["rope_theta"] = json.loads(json.dumps(base))
    configs["rope_theta"]["text_config"].update(rope_theta=variant.rope_theta, rope_scaling=None)
    configs["rope_parameters"] = json.loads(json.dumps(base))
    configs["rope_parameters"]["text_config"]["rope_parameters"] = {"rope_theta": variant.rope_theta,
                                                                    "rope_type": "default"}
    ids = torch.tensor([[1] + list(range(300, 340))])  # 41 positions: RoPE differences show
    logits = {}
    for spelling, config in configs.items():
        folder = write_checkpoint(hf_model, str(tmp_path / spelling), config=config)
        model, _ = tinyavl.load_pretrained(folder, device="cpu")
        assert model.config.text.rope_theta == variant.rope_theta, spelling
        with torch.no_grad():
            logits[spelling] = model(ids)
    assert torch.equal(logits["rope_theta"], logits["rope_parameters"])
    with torch.no_grad():
        ref = hf_model(input_ids=ids).logits
    assert (logits["rope_theta"] - ref).abs().max() <= 1e-4
    # and the theta matters: the default 10000 would give other logits
    configs["rope_theta"]["text_config"]["rope_theta"] = 10000.0
    folder = write_checkpoint(hf_model, str(tmp_path / "default_theta"), config=configs["rope_theta"])
    model, _ = tinyavl.load_pretrained(folder, device="cpu")
    with torch.no_grad():
        assert (model(ids) - ref).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------- errors
def load_error(folder) -> str:
    """The UserError message of loading `folder`; it must be one line or a short list."""
    with pytest.raises(UserError) as info:
        tinyavl.load_pretrained(folder, device="cpu")
    message = str(info.value)
    assert message and len(message.splitlines()) <= 10 and len(message) <= 2000, message
    return message


@pytest.fixture
def good_folder(tiny_ckpt, tmp_path):
    """A private copy of a good published single-file checkpoint, free to break."""
    return shutil.copytree(tiny_ckpt.folder("mha"), tmp_path / "ckpt")


def rewrite_weights(folder, edit):
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_error_missing_folder(tmp_path):
    folder = tmp_path / "no-such-model"
    message = load_error(folder)
    assert "no-such-model" in message


def test_error_no_config_json(good_folder):
    os.remove(good_folder / "config.json")
    assert "config.json" in load_error(good_folder)


def test_error_config_json_is_not_json(good_folder):
    (good_folder / "config.json").write_text('{"model_type": "llava", "text_config": {')
    message = load_error(good_folder)
    assert "config.json" in message and "JSON" in message


def test_error_shard_listed_in_index_is_missing(tiny_ckpt, tmp_path):
    folder = shutil.copytree(tiny_ckpt.folder("mha", shards=3), tmp_path / "sharded")
    os.remove(folder / "model-00002-of-00003.safetensors")
    assert "model-00002-of-00003.safetensors" in load_error(folder)


@pytest.mark.parametrize("where", ["absolute", "parent", "inner parent", "subfolder"])
def test_error_shard_outside_the_folder(tiny_ckpt, tmp_path, where):
    """An index that names a shard outside the model's folder (an absolute path, or one through "..", here
    to the very file) is refused; one in a folder of its own loads."""
    folder = shutil.copytree(tiny_ckpt.folder("mha", shards=2), tmp_path / "sharded")
    shard = "model-00002-of-00002.safetensors"
    elsewhere = {"absolute": str(folder / shard), "parent": f"../sharded/{shard}",
                 "inner parent": f"sub/../../sharded/{shard}", "subfolder": f"sub/{shard}"}[where]
    (folder / "sub").mkdir()
    shutil.copy(folder / shard, folder / "sub" / shard)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"] = {key: elsewhere if name == shard else name for key, name in index["weight_map"].items()}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    if where == "subfolder":
        tinyavl.load_pretrained(folder, device="cpu")
        return
    message = load_error(folder)
    assert "names shards outside its folder" in message and elsewhere in message


@pytest.mark.parametrize("weight_map,says", [({}, "names no tensor"), ([], "is not a JSON object"),
                                              ({"a.weight": 1}, "is not a JSON object"),
                                              (None, "is not a JSON object")])
def test_error_index_without_a_map_of_shards(tiny_ckpt, tmp_path, weight_map, says):
    """An index whose weight_map is empty, not an object, names a shard by a number, or is absent, is refused in
    one line that names the index (an empty one would otherwise load no tensor and list every key as missing)."""
    folder = shutil.copytree(tiny_ckpt.folder("mha", shards=2), tmp_path / "sharded")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"] = weight_map
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    message = load_error(folder)
    assert "model.safetensors.index.json: its weight_map " + says in message and "\n" not in message, message


def test_error_missing_key_is_listed(good_folder):
    key = "language_model.model.layers.1.mlp.up_proj.weight"
    rewrite_weights(good_folder, lambda t: t.pop(key))
    message = load_error(good_folder)
    assert key in message and "missing" in message.lower()


def test_error_unexpected_key_is_listed(good_folder):
    key = "language_model.model.layers.0.mlp.extra_proj.weight"
    rewrite_weights(good_folder, lambda t: t.__setitem__(key, torch.zeros(4, 4)))
    message = load_error(good_folder)
    assert key in message and "unexpected" in message.lower()


def test_error_a_tensor_stored_under_two_layouts_keys_is_refused(tiny_ckpt, tmp_path):
    """A file holding one tensor under the published key and under transformers 4.52's: which copy is meant
    cannot be known, so neither is loaded silently."""
    folder = shutil.copytree(tiny_ckpt.folder("mha", layout="tf4.52"), tmp_path / "tf452")
    key = "model.language_model.layers.1.mlp.up_proj.weight"
    published = "language_model.model.layers.1.mlp.up_proj.weight"
    rewrite_weights(folder, lambda t: t.__setitem__(published, torch.zeros_like(t[key])))
    message = load_error(folder)
    assert "stores tensors twice (1)" in message and key in message and published in message, message


def test_shards_in_a_subfolder_load_from_where_the_index_names_them(tiny_ckpt, tmp_path):
    """The index may name a shard by a path inside the folder (transformers joins it to the folder too)."""
    folder = shutil.copytree(tiny_ckpt.folder("gqa_full", shards=2), tmp_path / "sub")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    (folder / "shards").mkdir()
    for name in set(index["weight_map"].values()):
        (folder / name).rename(folder / "shards" / name)
    index["weight_map"] = {key: f"shards/{name}" for key, name in index["weight_map"].items()}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    model, _ = tinyavl.load_pretrained(folder, device="cpu")
    reference = published_state_dict(tiny_ckpt.model("gqa_full"))
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, reference[key].to(tensor.dtype)), key


def test_error_a_key_in_two_shards_is_refused(tiny_ckpt, tmp_path):
    folder = shutil.copytree(tiny_ckpt.folder("mha", shards=2), tmp_path / "sharded")
    first, second = (folder / f"model-0000{i}-of-00002.safetensors" for i in (1, 2))
    key = next(iter(load_file(first)))
    tensors = load_file(second)
    tensors[key] = load_file(first)[key] + 1
    save_file(tensors, second)
    message = load_error(folder)
    assert f"stores tensors twice (1): {key} (in two files)" in message, message


def test_error_misshaped_tensor_is_listed_with_both_shapes(good_folder):
    key = "multi_modal_projector.linear_2.weight"  # [64, 64] in the model
    rewrite_weights(good_folder, lambda t: t.__setitem__(key, torch.zeros(64, 63)))
    message = load_error(good_folder)
    assert f"{key} [64, 63] (model expects [64, 64])" in message, message  # the file's shape, then the model's


def test_error_misshaped_tensor_in_another_layout_is_listed(tiny_ckpt, tmp_path):
    folder = shutil.copytree(tiny_ckpt.folder("mha", layout="tf4.52"), tmp_path / "tf452")
    key = "model.language_model.layers.0.self_attn.k_proj.weight"  # [64, 64] in the model
    rewrite_weights(folder, lambda t: t.__setitem__(key, torch.zeros(32, 64)))
    message = load_error(folder)
    assert f"{key} [32, 64] (model expects [64, 64])" in message, message  # named as the file names it


@pytest.mark.parametrize("where,model_type", [("text_config", "qwen2"), ("top", "llava_onevision")])
def test_error_unsupported_model_type(good_folder, where, model_type):
    config = json.load(open(good_folder / "config.json"))
    (config["text_config"] if where == "text_config" else config)["model_type"] = model_type
    (good_folder / "config.json").write_text(json.dumps(config))
    assert model_type in load_error(good_folder)


@pytest.mark.parametrize("layer", [-10, 5, [-1, 7]])
def test_error_vision_feature_layer_out_of_range(good_folder, layer):
    """The mha variant's vision tower has 2 layers, so 3 hidden states: indices -3 .. 2."""
    config = json.load(open(good_folder / "config.json"))
    config["vision_feature_layer"] = layer
    (good_folder / "config.json").write_text(json.dumps(config))
    assert "vision_feature_layer" in load_error(good_folder)


def test_error_pickle_only_folder_is_never_unpickled(good_folder, monkeypatch):
    """A folder with only pytorch_model.bin: refused with a message about safetensors, without unpickling."""
    state = load_file(good_folder / "model.safetensors")
    os.remove(good_folder / "model.safetensors")
    torch.save(state, good_folder / "pytorch_model.bin")

    def forbidden(*args, **kwargs):
        raise AssertionError("the loader tried to unpickle a .bin file")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    assert "safetensors" in load_error(good_folder)


def test_error_folder_with_config_but_no_weights(good_folder):
    os.remove(good_folder / "model.safetensors")
    assert "safetensors" in load_error(good_folder)


@pytest.mark.parametrize("text_type", ["llama", "mistral"])
def test_a_field_config_json_leaves_out_takes_transformers_class_default(text_type):
    """A config.json may leave out any field its class has a default for: each such text field, and a
    whole missing vision_config, reads as transformers' LlavaConfig reads it."""
    from transformers import LlavaConfig as HFLlavaConfig
    base = sparse_config(VARIANTS["mha"])
    base["text_config"].update(model_type=text_type, num_attention_heads=8)  # 8: divides Mistral's 8 KV heads
    if text_type == "mistral":
        base["text_config"]["sliding_window"] = None
    for field in ("rms_norm_eps", "intermediate_size", "max_position_embeddings", "hidden_act", "rope_theta",
                  "num_key_value_heads", "bos_token_id", "eos_token_id"):
        raw = copy.deepcopy(base)
        raw["text_config"].pop(field, None)
        ours, theirs = parse_config(copy.deepcopy(raw)).text, HFLlavaConfig.from_dict(raw).text_config
        expected = theirs.rope_parameters["rope_theta"] if field == "rope_theta" else getattr(theirs, field)
        assert getattr(ours, field) == expected, field
    raw = copy.deepcopy(base)
    raw["text_config"].pop("sliding_window", None)  # Mistral's default window; transformers' Llama has none
    expected = HFLlavaConfig.from_dict(raw).text_config.sliding_window if text_type == "mistral" else None
    assert parse_config(copy.deepcopy(raw)).text.sliding_window == expected
    raw["text_config"]["sliding_window"] = 64       # a Llama config.json may carry the key: its model never reads it
    assert parse_config(raw).text.sliding_window == (64 if text_type == "mistral" else None)
    raw = copy.deepcopy(base)
    raw.pop("vision_config")
    ours, theirs = parse_config(copy.deepcopy(raw)).vision, HFLlavaConfig.from_dict(raw).vision_config
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                  "patch_size", "hidden_act", "layer_norm_eps"):
        assert getattr(ours, field) == getattr(theirs, field), field


def test_buffers_older_transformers_saved_are_ignored(tiny_ckpt, good_folder):
    """Checkpoints saved by older transformers hold RoPE's inv_freq and CLIP's position_ids as tensors: they
    are buffers the model computes, not weights, and loading passes over them (the weights of the
    transformers model the folder was saved from)."""
    rewrite_weights(good_folder, lambda tensors: tensors.update({
        "language_model.model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8),
        "vision_tower.vision_model.embeddings.position_ids": torch.arange(17)[None].float()}))
    model, _ = tinyavl.load_pretrained(good_folder, device="cpu")
    assert_weights_equal(model, tiny_ckpt.model("mha"))


def test_read_config_takes_a_folder_as_a_path_or_a_string():
    """The module's usage line, read_config(folder), with the folder as a command line or a caller gives it."""
    model, _ = tinyavl.load_pretrained(TOY_WEIGHTS)
    assert read_config(str(TOY_WEIGHTS)) == read_config(TOY_WEIGHTS) == model.config


# ------------------------------------------------------------------------------------ generation_config.json
def greedy_answer(folder, max_new_tokens: int):
    """(tinyavl's greedy tokens with the folder's own stopping ids, transformers' from the same folder)."""
    from transformers import LlavaForConditionalGeneration as HFLlava

    model, processor = tinyavl.load_pretrained(folder, device="cpu")
    inputs = processor(processor.chat_prompt("What is there?"), make_image(40, 30, seed=3))
    ours, _ = tinyavl.generate(model, inputs["input_ids"], inputs["pixel_values"], max_new_tokens=max_new_tokens)
    hf_model = HFLlava.from_pretrained(folder).eval()
    out = hf_model.generate(input_ids=inputs["input_ids"], attention_mask=torch.ones_like(inputs["input_ids"]),
                            pixel_values=inputs["pixel_values"], do_sample=False,
                            max_new_tokens=max_new_tokens, pad_token_id=tokenizer_info()["pad_token_id"])
    return ours, out[0, inputs["input_ids"].shape[1]:].tolist()


def test_an_answer_ends_at_the_ids_generation_config_json_declares_as_in_transformers(good_folder):
    """A folder's generation_config.json names the ids that end an answer (a list of them, or null: none),
    and transformers' generate stops there; so does tinyavl's, whatever config.json's text_config says."""
    never = tokenizer_info()["vocab_size"] - 1
    (good_folder / "generation_config.json").write_text(json.dumps({"eos_token_id": None}))
    ours, theirs = greedy_answer(good_folder, 12)
    assert ours == theirs and len(ours) == 12
    # The first id that is not the first token: the answer must end right after it, and not before.
    k = next(i for i, token in enumerate(ours) if token not in ours[:i] and i > 0)
    assert never not in ours
    (good_folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [never, ours[k]]}))
    assert read_config(good_folder).text.eos_token_id == [never, ours[k]]
    stopped, theirs = greedy_answer(good_folder, 12)
    assert stopped == theirs == ours[:k + 1]


def test_without_generation_config_json_an_answer_ends_at_config_json_eos(good_folder):
    """Without the file, config.json's text_config.eos_token_id ends an answer, in transformers' generate (its
    generation config made from the model's) and in tinyavl's. Where the file leaves eos_token_id out,
    transformers stops at no id; tinyavl still stops at config.json's."""
    ours, _ = greedy_answer(good_folder, 12)
    k = next(i for i, token in enumerate(ours) if token not in ours[:i] and i > 0)
    config = json.loads((good_folder / "config.json").read_text())
    config["text_config"]["eos_token_id"] = ours[k]
    (good_folder / "config.json").write_text(json.dumps(config))
    assert read_config(good_folder).text.eos_token_id == ours[k]
    stopped, theirs = greedy_answer(good_folder, 12)
    assert stopped == theirs == ours[:k + 1]
    (good_folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "pad_token_id": 0}))
    assert read_config(good_folder).text.eos_token_id == ours[k]
    stopped, theirs = greedy_answer(good_folder, 12)
    assert stopped == ours[:k + 1] and len(theirs) == 12


@pytest.mark.parametrize("eos", [[], -1, "</s>", 2.0, True, [2, 10 ** 6]])
def test_error_generation_config_json_eos_that_is_no_token(good_folder, eos):
    (good_folder / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    message = load_error(good_folder)
    assert "generation_config.json: eos_token_id is" in message and "remove the key" in message, message


def test_error_generation_config_json_that_is_not_json(good_folder):
    (good_folder / "generation_config.json").write_text("{broken")
    assert "generation_config.json is not valid JSON" in load_error(good_folder)


def test_a_config_that_names_no_model_type_reads_as_transformers_llava_config_reads_it():
    """No model_type at the top: LLaVA-1.5 ("llava"); none in text_config: Llama, whose defaults keep this
    config's 4 KV heads (Mistral's would be 8)."""
    from transformers import LlavaConfig

    raw = sparse_config(VARIANTS["mha"])
    raw.pop("model_type")
    raw["text_config"].pop("model_type")
    theirs = LlavaConfig.from_dict(copy.deepcopy(raw))
    config = parse_config(copy.deepcopy(raw))
    assert (theirs.model_type, theirs.text_config.model_type) == ("llava", "llama")
    assert config.image_grid_pinpoints is None
    assert config.text.num_key_value_heads == theirs.text_config.num_key_value_heads
    assert config.text.sliding_window is None


@pytest.mark.parametrize("where,value,says", [("vision_config", ["clip"], "vision_config that is not a JSON object"),
                                              ("text_config.model_type", ["llama"], "text_config.model_type")])
def test_error_config_sections_of_the_wrong_json_kind(where, value, says):
    raw = sparse_config(VARIANTS["mha"])
    if where == "vision_config":
        raw["vision_config"] = value
    else:
        raw["text_config"]["model_type"] = value
    with pytest.raises(UserError, match=says):
        parse_config(raw)


def test_bf16_may_be_asked_for_by_its_short_name(tiny_ckpt):
    model, _ = tinyavl.load_pretrained(tiny_ckpt.folder("mha"), device="cpu", dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_an_fp16_tied_checkpoint_that_keeps_its_head_loads_in_bf16_on_a_cpu(tiny_ckpt, tmp_path):
    """The head kept beside the embedding is compared in the run dtype (fp16 stored, bf16 run here)."""
    folder = shutil.copytree(tiny_ckpt.folder("mha", dtype=torch.float16), tmp_path / "tied")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    rewrite_weights(folder, lambda t: t.update({"language_model.lm_head.weight":
                                                t["language_model.model.embed_tokens.weight"].clone()}))
    model, _ = tinyavl.load_pretrained(folder, device="cpu")
    assert model.language_model.lm_head.weight.dtype == torch.bfloat16
    assert model.language_model.lm_head.weight is model.language_model.model.embed_tokens.weight


def test_error_a_vision_layer_key_spelt_with_a_leading_zero_is_unexpected(good_folder):
    """layers.01 is no key PyTorch writes (it names layer 1 "1"): unexpected, even where layer 1 is one the
    tower never runs and its keys are ignored."""
    key = "vision_tower.vision_model.encoder.layers.01.mlp.fc1.weight"
    rewrite_weights(good_folder, lambda t: t.__setitem__(key, torch.zeros(2)))
    message = load_error(good_folder)
    assert "unexpected keys (1)" in message and key in message


def test_error_a_misshaped_tensor_is_not_also_called_missing(good_folder):
    rewrite_weights(good_folder, lambda t: t.__setitem__("multi_modal_projector.linear_2.weight", torch.zeros(64, 63)))
    message = load_error(good_folder)
    assert "mis-shaped" in message and "missing" not in message


def test_error_a_config_json_that_is_a_folder(good_folder):
    (good_folder / "config.json").unlink()
    (good_folder / "config.json").mkdir()
    assert "is not a file" in load_error(good_folder)


def test_error_a_folder_of_pickle_weights_alone_says_so(good_folder):
    os.remove(good_folder / "model.safetensors")
    (good_folder / "model.pt").write_bytes(b"not unpickled")
    assert "holds only pickle weights" in load_error(good_folder)
