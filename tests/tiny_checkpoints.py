"""Tiny random LLaVA checkpoints, written the way the hub (and two transformers versions) write them.

The oracle of every parity test is `transformers.LlavaForConditionalGeneration` in fp32 with eager
attention. This module builds small random ones and writes them to disk *by hand* with safetensors, in
each key layout the hub and transformers' save_pretrained write, with a sparse llava-hf style config.json
(only what differs from the class defaults), the tiny tokenizer and a CLIP preprocessor_config.json, so the
folder looks like a real llava-hf download to `load_pretrained`. LLaVA-1.6 (NeXT) folders come from
`transformers.LlavaNextForConditionalGeneration` the same way, with their chat template
(`NEXT_VARIANTS`, `write_next_checkpoint`).

Why re-initialise: HF's default init (std 0.02) gives nearly flat logits, so greedy tokens would be decided
by rounding noise. `reinit_` draws seeded weights at ~1/sqrt(fan_in) scale (lm_head 4/sqrt(fan_in)) so the
top-1 / top-2 logit gap is typically ~1 and greedy comparisons mean something.

Used as a library (`build_hf_model`, `write_checkpoint`) and through the session fixture `tiny_ckpt`
(registered for every test module in tests/conftest.py).
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from functools import lru_cache

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from tiny_tokenizer import write_tiny_tokenizer

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

LAYOUTS = ("published", "tf4.52", "tf5")


# ---------------------------------------------------------------------------------------------- variants
@dataclass(frozen=True)
class Variant:
    """One tiny LLaVA shape. Text: hidden 64, 4 heads x 16, MLP 128. Vision: hidden 32, 4 heads x 8, MLP 64."""

    name: str
    image_size: int
    patch_size: int
    vision_layers: int
    text_layers: int
    kv_heads: int  # 4 = MHA, 2 = GQA, 1 = MQA
    feature_layer: int | tuple[int, ...] = -2
    strategy: str = "default"  # "default" drops CLS, "full" keeps it
    rope_theta: float = 10000.0
    rope_spelling: str = "rope_theta"  # how config.json spells a non-default theta: "rope_theta" | "rope_parameters"
    rope_linear_factor: float | None = None  # linear RoPE scaling, written as transformers 4.x did (rope_scaling)
    text_act: str = "silu"
    vision_act: str = "quick_gelu"
    rms_norm_eps: float = 1e-5
    seed: int = 0

    @property
    def num_image_tokens(self) -> int:
        patches = (self.image_size // self.patch_size) ** 2
        return patches + (1 if self.strategy == "full" else 0)


VARIANTS = {
    v.name: v
    for v in [
        # the LLaVA-1.5 recipe in miniature: layer -2, CLS dropped, MHA, published eps 1e-5
        Variant("mha", image_size=56, patch_size=14, vision_layers=2, text_layers=2, kv_heads=4, seed=1),
        # GQA 4 -> 2, CLS kept ("full"), 3 + 3 layers, 6x6 patch grid; a large RMSNorm eps, so using the
        # wrong eps moves the logits by ~1e-3, well past the parity tolerance
        Variant("gqa_full", image_size=42, patch_size=7, vision_layers=3, text_layers=3, kv_heads=2,
                strategy="full", rms_norm_eps=1e-3, seed=2),
        # MQA, last vision layer, non-default rope_theta written the transformers 5.x way
        Variant("mqa_rope", image_size=28, patch_size=7, vision_layers=3, text_layers=2, kv_heads=1,
                feature_layer=-1, rope_theta=500000.0, rope_spelling="rope_parameters", rms_norm_eps=1e-6, seed=3),
        # several vision layers concatenated (projector input 2 x 32), old rope_theta spelling
        Variant("multilayer", image_size=28, patch_size=14, vision_layers=3, text_layers=2, kv_heads=2,
                feature_layer=(-3, -1), rope_theta=1000000.0, rope_spelling="rope_theta", seed=4),
        # linear RoPE scaling (as long-context Vicuna fine-tunes have), and activations other than the
        # published ones, by names transformers' ACT2FN knows
        Variant("linear_rope", image_size=28, patch_size=14, vision_layers=2, text_layers=2, kv_heads=2,
                rope_linear_factor=4.0, text_act="gelu_new", vision_act="relu", seed=5),
    ]
}


def make_image(width: int, height: int, seed: int) -> Image.Image:
    """A seeded RGB test image: a smooth gradient (so resizing and cropping matter) plus noise."""
    g = torch.Generator().manual_seed(seed)
    ys = torch.linspace(0, 1, height)[:, None, None]
    xs = torch.linspace(0, 1, width)[None, :, None]
    base = torch.cat([xs.expand(height, width, 1), ys.expand(height, width, 1), (xs * ys).expand(height, width, 1)], -1)
    pixels = (200 * base + 55 * torch.rand(height, width, 3, generator=g)).clamp(0, 255).to(torch.uint8)
    return Image.frombytes("RGB", (width, height), bytes(pixels.flatten().tolist()))


@lru_cache(maxsize=1)
def tokenizer_info() -> dict:
    """vocab_size / image_token_id / pad_token_id / bos / eos of the tiny tokenizer (written once to a temp dir)."""
    with tempfile.TemporaryDirectory() as d:
        return dict(write_tiny_tokenizer(d))


# ------------------------------------------------------------------------------------------- HF model
def hf_config(variant: Variant):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    tok = tokenizer_info()
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=variant.vision_layers, num_attention_heads=4,
        image_size=variant.image_size, patch_size=variant.patch_size, hidden_act=variant.vision_act,
    )
    rope = {"rope_theta": variant.rope_theta, "rope_type": "default"}
    if variant.rope_linear_factor is not None:
        rope.update(rope_type="linear", factor=variant.rope_linear_factor)
    text = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=variant.text_layers, num_attention_heads=4,
        num_key_value_heads=variant.kv_heads, vocab_size=tok["vocab_size"], rms_norm_eps=variant.rms_norm_eps,
        rope_parameters=rope, hidden_act=variant.text_act, max_position_embeddings=4096, bos_token_id=tok["bos_token_id"], eos_token_id=tok["eos_token_id"],
    )
    fl = variant.feature_layer
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tok["image_token_id"],
        pad_token_id=tok["pad_token_id"], projector_hidden_act="gelu",
        vision_feature_layer=list(fl) if isinstance(fl, tuple) else fl,
        vision_feature_select_strategy=variant.strategy, image_seq_length=variant.num_image_tokens,
    )
    return config


def reinit_(model: torch.nn.Module, seed: int) -> None:
    """Seeded weights with O(1) activations and well separated logits (see module docstring)."""
    g = torch.Generator().manual_seed(seed)

    def randn(shape):
        return torch.randn(shape, generator=g, dtype=torch.float32)

    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("embed_tokens.weight") or name.endswith("class_embedding"):
                new = randn(p.shape)
            elif name.endswith("position_embedding.weight"):
                new = 0.5 * randn(p.shape)
            elif "norm" in name:  # layer_norm1/2, pre_layrnorm, post_layernorm, RMSNorms
                new = 1.0 + 0.1 * randn(p.shape) if name.endswith("weight") else 0.1 * randn(p.shape)
            elif p.ndim >= 2:  # Linear [out, in] and the patch Conv2d [out, 3, p, p]
                gain = 4.0 if name.endswith("lm_head.weight") else 1.0
                new = gain / math.sqrt(p[0].numel()) * randn(p.shape)
            else:  # Linear biases
                new = 0.1 * randn(p.shape)
            p.copy_(new)


def build_hf_model(variant: Variant | str):
    """A seeded fp32 `LlavaForConditionalGeneration` with eager attention, in eval mode."""
    from transformers import LlavaForConditionalGeneration

    variant = VARIANTS[variant] if isinstance(variant, str) else variant
    model = LlavaForConditionalGeneration(hf_config(variant))
    model.set_attn_implementation("eager")
    reinit_(model, variant.seed)
    return model.eval()


# ------------------------------------------------------------------------------------------- key layouts
def layout_key(hf_name: str, layout: str) -> str:
    """Map an in-memory transformers 5.23 parameter name to the file key of `layout`."""
    assert layout in LAYOUTS, layout
    rules = {
        #  in-memory prefix            published                      tf4.52 save_pretrained             tf5 save_pretrained
        "model.vision_tower.": ("vision_tower.vision_model.", "model.vision_tower.vision_model.", "vision_tower."),
        "model.multi_modal_projector.": ("multi_modal_projector.", "model.multi_modal_projector.", "multi_modal_projector."),
        "model.language_model.": ("language_model.model.", "model.language_model.", "language_model.model."),
        "lm_head.": ("language_model.lm_head.", "lm_head.", "language_model.lm_head."),
        "model.image_newline": ("image_newline", "model.image_newline", "image_newline"),  # LLaVA-1.6
    }
    for prefix, targets in rules.items():
        if hf_name.startswith(prefix):
            return targets[LAYOUTS.index(layout)] + hf_name[len(prefix):]
    raise KeyError(f"no layout rule for {hf_name}")


def published_state_dict(hf_model) -> dict[str, torch.Tensor]:
    """The HF model's weights under published key names (what `tinyavl`'s state_dict should equal)."""
    return {layout_key(k, "published"): v for k, v in hf_model.state_dict().items()}


# ------------------------------------------------------------------------------------------- config.json
def sparse_config(variant: Variant, layout: str = "published", dtype: torch.dtype = torch.float32) -> dict:
    """A llava-hf style config.json: only what differs from the class defaults, plus model_type keys (§3)."""
    tok = tokenizer_info()
    dtype_name = str(dtype).removeprefix("torch.")
    dtype_key = "dtype" if layout == "tf5" else "torch_dtype"  # transformers 5 renamed the field
    text = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 128,
        "max_position_embeddings": 4096,
        "model_type": "llama",
        "num_attention_heads": 4,
        "num_hidden_layers": variant.text_layers,
        "rms_norm_eps": variant.rms_norm_eps,
        dtype_key: dtype_name,
        "vocab_size": tok["vocab_size"],
    }
    if variant.kv_heads != 4:  # absent means num_key_value_heads = num_attention_heads
        text["num_key_value_heads"] = variant.kv_heads
    if variant.rope_theta != 10000.0 or variant.rope_spelling == "rope_parameters":
        if variant.rope_spelling == "rope_parameters":
            text["rope_parameters"] = {"rope_theta": variant.rope_theta, "rope_type": "default"}
        else:
            text["rope_theta"] = variant.rope_theta
            text["rope_scaling"] = None
    if variant.rope_linear_factor is not None:
        text["rope_scaling"] = {"type": "linear", "factor": variant.rope_linear_factor}
    if variant.text_act != "silu":  # absent means the class defaults: SiLU in Llama, quick GELU in CLIP
        text["hidden_act"] = variant.text_act
    vision = {
        "hidden_size": 32,
        "image_size": variant.image_size,
        "intermediate_size": 64,
        "model_type": "clip_vision_model",
        "num_attention_heads": 4,
        "num_hidden_layers": variant.vision_layers,
        "patch_size": variant.patch_size,
        "projection_dim": 16,
    }
    if variant.vision_act != "quick_gelu":
        vision["hidden_act"] = variant.vision_act
    fl = variant.feature_layer
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "ignore_index": -100,
        "image_token_index": tok["image_token_id"],
        "model_type": "llava",
        "pad_token_id": tok["pad_token_id"],
        "projector_hidden_act": "gelu",
        "text_config": text,
        "tie_word_embeddings": False,
        dtype_key: dtype_name,
        "transformers_version": "5.23.0" if layout == "tf5" else "4.36.0.dev0",
        "vision_config": vision,
        "vision_feature_layer": list(fl) if isinstance(fl, tuple) else fl,
        "vision_feature_select_strategy": variant.strategy,
        "vocab_size": tok["vocab_size"],
    }


def preprocessor_config(image_size: int) -> dict:
    """CLIPImageProcessor settings of llava-hf, with the tiny image size."""
    return {
        "crop_size": {"height": image_size, "width": image_size},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": CLIP_MEAN,
        "image_processor_type": "CLIPImageProcessor",
        "image_std": CLIP_STD,
        "processor_class": "LlavaProcessor",
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"shortest_edge": image_size},
    }


# ------------------------------------------------------------------------------------------- writing
def write_weights(tensors: dict[str, torch.Tensor], folder: str, shards: int = 1) -> None:
    """`model.safetensors`, or `shards` files `model-0000k-of-0000n.safetensors` + the index json."""
    os.makedirs(folder, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if shards == 1:
        save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        return
    keys = list(tensors)
    per = math.ceil(len(keys) / shards)
    weight_map, total = {}, 0
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[i * per:(i + 1) * per]}
        assert part, "more shards than keys"
        save_file(part, os.path.join(folder, fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
        total += sum(t.numel() * t.element_size() for t in part.values())
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def write_checkpoint(hf_model, folder: str, layout: str = "published", shards: int = 1,
                     dtype: torch.dtype = torch.float32, variant: Variant | str | None = None,
                     config: dict | None = None) -> str:
    """Write `hf_model` as a llava-hf folder: weights in `layout` and `dtype`, sparse config, tokenizer, preprocessor.

    `variant` (a Variant or its name: the one the model was built from) drives the sparse config.json;
    `config` replaces that config.json entirely (tests that change or break the config on purpose).
    """
    os.makedirs(folder, exist_ok=True)
    tensors = {layout_key(k, layout): v.detach().to(dtype) for k, v in hf_model.state_dict().items()}
    write_weights(tensors, folder, shards)
    if config is None:
        variant = VARIANTS[variant] if isinstance(variant, str) else variant
        assert variant is not None, "pass the Variant the model was built from"
        config = sparse_config(variant, layout, dtype)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    image_size = config["vision_config"]["image_size"]
    with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
        json.dump(preprocessor_config(image_size), f, indent=2)
    info = write_tiny_tokenizer(folder)
    assert info["vocab_size"] == tokenizer_info()["vocab_size"]
    return folder


# ------------------------------------------------------------------------------------------- LLaVA-1.6 (NeXT)
TEMPLATES = os.path.join(os.path.dirname(__file__), "chat_templates")
NEXT_TILE, NEXT_PATCH = 28, 7  # a 4 x 4 patch grid: 16 tokens per crop
# The published canvases of llava-v1.6 (336 px tiles), scaled to 28 px tiles: 1x2, 2x1, 2x2, 3x1, 1x3.
NEXT_PINPOINTS = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]


@dataclass(frozen=True)
class NextVariant:
    """One tiny LLaVA-1.6: the Variant sizes, a Vicuna (llama) or Mistral decoder, and its folder's chat template."""

    name: str
    text_model: str  # "llama" (llava-v1.6-vicuna) or "mistral" (llava-v1.6-mistral)
    kv_heads: int    # 4 = MHA, 2 = GQA
    template: str    # the file under tests/chat_templates: the published template of that llava-hf folder
    seed: int


NEXT_VARIANTS = {
    v.name: v
    for v in [
        NextVariant("next_vicuna_mha", "llama", kv_heads=4, template="llava-v1.6-vicuna-7b-hf.jinja", seed=11),
        NextVariant("next_vicuna_gqa", "llama", kv_heads=2, template="llava-v1.6-vicuna-7b-hf.jinja", seed=12),
        NextVariant("next_mistral_gqa", "mistral", kv_heads=2, template="llava-v1.6-mistral-7b-hf.jinja", seed=13),
        NextVariant("next_mistral_mha", "mistral", kv_heads=4, template="llava-v1.6-mistral-7b-hf.jinja", seed=14),
    ]
}


def chat_template(variant: NextVariant) -> str:
    with open(os.path.join(TEMPLATES, variant.template), encoding="utf-8") as f:
        return f.read()


def next_text_config(variant: NextVariant) -> dict:
    """The sparse text_config of a llava-v1.6 config.json, at the tiny sizes."""
    tok = tokenizer_info()
    text = {"architectures": ["MistralForCausalLM" if variant.text_model == "mistral" else "LlamaForCausalLM"],
            "hidden_size": 64, "intermediate_size": 128, "max_position_embeddings": 4096,
            "model_type": variant.text_model, "num_attention_heads": 4, "num_hidden_layers": 2,
            "num_key_value_heads": variant.kv_heads, "rms_norm_eps": 1e-5, "vocab_size": tok["vocab_size"]}
    if variant.text_model == "mistral":
        text.update(rope_theta=1000000.0, sliding_window=None)  # as llava-v1.6-mistral-7b-hf's file
    return text


def next_sparse_config(variant: NextVariant) -> dict:
    tok = tokenizer_info()
    return {
        "architectures": ["LlavaNextForConditionalGeneration"],
        "ignore_index": -100,
        "image_grid_pinpoints": NEXT_PINPOINTS,
        "image_token_index": tok["image_token_id"],
        "model_type": "llava_next",
        "pad_token_id": tok["pad_token_id"],
        "projector_hidden_act": "gelu",
        "text_config": next_text_config(variant),
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.39.0.dev0",
        "use_image_newline_parameter": True,
        "vision_config": {"hidden_size": 32, "image_size": NEXT_TILE, "intermediate_size": 64,
                          "model_type": "clip_vision_model", "num_attention_heads": 4, "num_hidden_layers": 2,
                          "patch_size": NEXT_PATCH, "projection_dim": 16},
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "vocab_size": tok["vocab_size"],
    }


def build_hf_next_model(variant: NextVariant | str):
    """A seeded fp32 `LlavaNextForConditionalGeneration` with eager attention, in eval mode."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    variant = NEXT_VARIANTS[variant] if isinstance(variant, str) else variant
    raw = next_sparse_config(variant)
    config = LlavaNextConfig(**{k: v for k, v in raw.items() if k not in ("architectures", "transformers_version")})
    model = LlavaNextForConditionalGeneration(config)
    model.set_attn_implementation("eager")
    reinit_(model, variant.seed)
    with torch.no_grad():  # reinit_ draws it as a bias (0.1 randn): give the newline an embedding's scale
        model.model.image_newline.copy_(torch.randn(64, generator=torch.Generator().manual_seed(variant.seed)))
    return model.eval()


def next_preprocessor_config() -> dict:
    """LlavaNextImageProcessor settings of llava-hf's v1.6 folders, at the tiny tile size."""
    return {**preprocessor_config(NEXT_TILE), "aspect_ratio_setting": "anyres", "do_pad": True,
            "image_grid_pinpoints": NEXT_PINPOINTS, "image_processor_type": "LlavaNextImageProcessor",
            "processor_class": "LlavaNextProcessor"}


def write_next_checkpoint(hf_model, folder: str, variant: NextVariant | str, layout: str = "published",
                          shards: int = 1, dtype: torch.dtype = torch.float32) -> str:
    """A llava-v1.6 style folder: weights in `layout` and `dtype`, sparse config.json, tokenizer,
    preprocessor and processor configs, and the variant's chat_template.json."""
    variant = NEXT_VARIANTS[variant] if isinstance(variant, str) else variant
    os.makedirs(folder, exist_ok=True)
    write_weights({layout_key(k, layout): v.detach().to(dtype) for k, v in hf_model.state_dict().items()}, folder,
                  shards)
    files = {"config.json": next_sparse_config(variant),
             "preprocessor_config.json": next_preprocessor_config(),
             "processor_config.json": {"num_additional_image_tokens": 1, "patch_size": NEXT_PATCH,
                                       "processor_class": "LlavaNextProcessor",
                                       "vision_feature_select_strategy": "default"},
             "chat_template.json": {"chat_template": chat_template(variant)},
             # What a llava-hf folder declares: transformers hands these to a chat template as variables.
             "tokenizer_config.json": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                                       "pad_token": "<pad>"}}
    for name, content in files.items():
        with open(os.path.join(folder, name), "w") as f:
            json.dump(content, f, indent=2)
    write_tiny_tokenizer(folder)
    return folder


# ------------------------------------------------------------------------------------------- fixtures
class TinyCheckpoints:
    """Session cache: one HF model per variant, one folder per (variant, layout, shards, dtype)."""

    def __init__(self, root):
        self.root = root
        self._models = {}
        self._folders = {}

    def model(self, variant: str):
        if variant not in self._models:
            self._models[variant] = (build_hf_next_model(variant) if variant in NEXT_VARIANTS
                                     else build_hf_model(VARIANTS[variant]))
        return self._models[variant]

    def folder(self, variant: str, layout: str = "published", shards: int = 1,
               dtype: torch.dtype = torch.float32) -> str:
        key = (variant, layout, shards, dtype)
        name = f"{variant}-{layout}-{shards}-{str(dtype).removeprefix('torch.')}"
        if key not in self._folders and variant in NEXT_VARIANTS:
            self._folders[key] = write_next_checkpoint(self.model(variant), os.path.join(self.root, name), variant,
                                                       layout, shards, dtype)
        if key not in self._folders:
            self._folders[key] = write_checkpoint(self.model(variant), os.path.join(self.root, name),
                                                  layout=layout, shards=shards, dtype=dtype, variant=variant)
        return self._folders[key]


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> TinyCheckpoints:
    return TinyCheckpoints(str(tmp_path_factory.mktemp("tiny_ckpt")))
