"""LLaVA-1.5 in one file: CLIP vision tower + MLP projector + Llama decoder, in plain PyTorch.

Read top to bottom: configs built from config.json, the CLIP blocks, the projector, the Llama blocks,
the LLaVA wrapper that puts image features where the image tokens are, and weight loading.

References
- Liu et al., "Improved Baselines with Visual Instruction Tuning" (LLaVA-1.5), arXiv 2310.03744.
- Radford et al., "Learning Transferable Visual Models From Natural Language Supervision" (CLIP).
- Touvron et al., "Llama 2", arXiv 2307.09288.
- The checkpoint facts we match (key names, config defaults, forward details): transformers' source,
  src/transformers/models/{llava,clip,llama}/modeling_*.py and configuration_*.py.

Module names mirror the llava-hf checkpoint keys (`language_model.model.layers.0.self_attn.q_proj`,
`vision_tower.vision_model.encoder.layers.0.mlp.fc1`, ...), so loading is one loop over the file's keys.
The decoder's attention goes through an optional `cache` object (tinyavl/cache.py): that is where every
KV policy, from the dense reference to A-VL, decides what is kept and what is computed.
"""
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open

from tinyavl.errors import UserError


# ---------------------------------------------------------------------------------------------------
# Configs. A published config.json is sparse: what it leaves out takes the transformers class default,
# so each dataclass default below is that class default (not the LLaVA-1.5-7B value).
# ---------------------------------------------------------------------------------------------------

@dataclass
class VisionConfig:
    """CLIPVisionConfig's defaults (ViT-B/32); llava-1.5 configs override them with ViT-L/14 at 336 px."""
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        section = "vision_config"
        _require_positive(self, section, ("hidden_size", "intermediate_size", "num_hidden_layers",
                                          "num_attention_heads", "image_size", "patch_size"), int)
        _require_positive(self, section, ("layer_norm_eps",), float)
        _require(self.num_channels == 3, f"{section}.num_channels is {self.num_channels!r}: the vision tower "
                                         "takes RGB images, 3 channels")
        _require(self.hidden_size % self.num_attention_heads == 0, f"{section}.hidden_size {self.hidden_size} "
                 f"is not divisible by num_attention_heads {self.num_attention_heads}")
        # Not divisible is fine (the patch convolution drops the border, as in transformers); smaller is 0 patches.
        _require(self.image_size >= self.patch_size, f"{section}.image_size {self.image_size} is smaller "
                 f"than patch_size {self.patch_size}")


@dataclass
class TextConfig:
    """LlamaConfig's defaults (Llama-2-7B); note rms_norm_eps is 1e-6 here but 1e-5 in llava-1.5's file."""
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: plain multi-head attention (= num_attention_heads)
    head_dim: int | None = None             # None: hidden_size // num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2

    def __post_init__(self):
        # Checked before the derived sizes below, which would divide by a zero head count.
        section = "text_config"
        _require_positive(self, section, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                          "num_attention_heads", "max_position_embeddings"), int)
        _require_positive(self, section, ("rms_norm_eps", "rope_theta"), float)
        _require_positive(self, section, [name for name in ("num_key_value_heads", "head_dim")
                                          if getattr(self, name) is not None], int)
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        if self.head_dim is None:
            _require(self.hidden_size % self.num_attention_heads == 0, f"{section}.hidden_size {self.hidden_size} "
                     f"is not divisible by num_attention_heads {self.num_attention_heads} (and no head_dim is given)")
            self.head_dim = self.hidden_size // self.num_attention_heads
        _require(self.head_dim % 2 == 0, f"{section} gives an odd head size {self.head_dim}: RoPE rotates pairs")
        _require(self.num_attention_heads % self.num_key_value_heads == 0, f"{section}.num_key_value_heads "
                 f"{self.num_key_value_heads} does not divide num_attention_heads {self.num_attention_heads}")


def _require(ok: bool, problem: str) -> None:
    """Refuse a config value that would build a broken model, or crash while building it."""
    if not ok:
        raise UserError(f"config.json: {problem}; fix the value, or download the checkpoint's config.json again")


def _require_positive(config, section: str, names, kind: type) -> None:
    """Each named field is a positive int (kind int) or a positive finite number (kind float)."""
    for name in names:
        value = getattr(config, name)
        # bool is an int in Python, but `"hidden_size": true` is a broken file, not 1.
        number = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
        _require(number and 0 < value < math.inf, f"{section}.{name} is {value!r}, but it must be a positive "
                 f"{'integer' if kind is int else 'number'}")


# What LlavaConfig uses when config.json has no vision_config at all: CLIP ViT-L/14 at 336 px.
LLAVA_DEFAULT_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                            num_attention_heads=16, image_size=336, patch_size=14)


@dataclass
class LlavaConfig:
    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=lambda: VisionConfig(**LLAVA_DEFAULT_VISION))
    image_token_id: int = 32000
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = True
    vision_feature_layer: int | list[int] = -2      # a list concatenates several layers' features
    vision_feature_select_strategy: str = "default"  # "default" drops the CLS token, "full" keeps it

    @property
    def feature_layers(self) -> list[int]:
        """The vision hidden-state indices the projector reads (0 = pre_layrnorm output)."""
        layers = self.vision_feature_layer
        layers = layers if isinstance(layers, list) else [layers]
        n_states = self.vision.num_hidden_layers + 1
        return [layer % n_states for layer in layers]

    @property
    def num_image_tokens(self) -> int:
        """How many positions one image takes in the prompt: one per patch (+ CLS for "full")."""
        patches = (self.vision.image_size // self.vision.patch_size) ** 2
        return patches + (1 if self.vision_feature_select_strategy == "full" else 0)

    @classmethod
    def from_dict(cls, raw: dict) -> "LlavaConfig":
        if raw.get("model_type", "llava") != "llava":
            raise UserError(f"config.json has model_type {raw['model_type']!r}: tinyavl runs LLaVA-1.5 "
                            "checkpoints (model_type 'llava', e.g. llava-hf/llava-1.5-7b-hf)")
        # Without text_config, transformers would build a Llama-2-7B decoder: never what a llava-hf folder holds.
        if not isinstance(raw.get("text_config"), dict):
            raise UserError("config.json has no text_config object: a llava-hf config.json describes the Llama "
                            "decoder there (hidden_size, num_hidden_layers, vocab_size, ...); download it again")
        text_raw, vision_raw = dict(raw["text_config"]), raw.get("vision_config")
        if vision_raw is not None and not isinstance(vision_raw, dict):
            raise UserError("config.json has a vision_config that is not a JSON object: download it again")
        if text_raw.get("model_type", "llama") != "llama":
            raise UserError(f"text_config.model_type is {text_raw['model_type']!r}: tinyavl implements the "
                            "Llama decoder of LLaVA-1.5 only")
        if vision_raw is not None and vision_raw.get("model_type", "clip_vision_model") != "clip_vision_model":
            raise UserError(f"vision_config.model_type is {vision_raw['model_type']!r}: tinyavl implements "
                            "the CLIP vision tower of LLaVA-1.5 only")
        # RoPE: transformers 5.x writes rope_parameters, older versions rope_theta (+ rope_scaling).
        rope = text_raw.get("rope_parameters") or text_raw.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise UserError(f"RoPE scaling {rope!r} is not supported: tinyavl implements plain RoPE")
        if "rope_theta" in rope:
            text_raw["rope_theta"] = rope["rope_theta"]
        # Tying may be declared at the top level (LlavaConfig) or in text_config.
        text_raw.setdefault("tie_word_embeddings", raw.get("tie_word_embeddings", False))
        config = cls(
            text=_dataclass_from(TextConfig, text_raw),
            vision=_dataclass_from(VisionConfig, vision_raw) if vision_raw is not None
            else VisionConfig(**LLAVA_DEFAULT_VISION),
            **{key: raw[key] for key in ("projector_hidden_act", "multimodal_projector_bias",
                                         "vision_feature_layer", "vision_feature_select_strategy")
               if key in raw},
        )
        config.image_token_id = raw.get("image_token_index", raw.get("image_token_id", config.image_token_id))
        config.validate()
        return config

    def validate(self) -> None:
        """Checks across the sections (text_config and vision_config check their own fields when built).

        Called by from_dict, not on construction: the bare defaults, like transformers', put image token
        32000 outside the 32000-word vocabulary."""
        layers = self.vision_feature_layer
        layers = layers if isinstance(layers, list) and layers else [layers]  # an empty list is refused below
        n_states = self.vision.num_hidden_layers + 1  # the embedding output and one per layer
        for layer in layers:
            if type(layer) is not int or not -n_states <= layer < n_states:
                raise UserError(f"vision_feature_layer {layer!r} does not exist: the vision tower has "
                                f"{n_states} hidden states (-{n_states} .. {n_states - 1})")
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise UserError(f"unknown vision_feature_select_strategy {self.vision_feature_select_strategy!r}")
        for act in (self.text.hidden_act, self.vision.hidden_act, self.projector_hidden_act):
            if act not in ACTIVATIONS:
                raise UserError(f"unsupported activation {act!r} in config.json (known: {sorted(ACTIVATIONS)})")
        vocab = self.text.vocab_size
        _require(type(self.image_token_id) is int and 0 <= self.image_token_id < vocab,
                 f"image_token_index {self.image_token_id!r} is outside the vocabulary (0 .. {vocab - 1})")


def _dataclass_from(cls, raw: dict):
    """Build a config dataclass from the keys it knows; config.json holds many more (dropout, ids...)."""
    known = {f.name for f in fields(cls)}
    return cls(**{key: value for key, value in raw.items() if key in known})


def quick_gelu(x):
    # CLIP's cheap GELU approximation: x * sigmoid(1.702 x).
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {
    "gelu": F.gelu,  # exact (erf) GELU: LLaVA's projector
    "quick_gelu": quick_gelu,
    "silu": F.silu,  # Llama's MLP gate
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def attention(q, k, v, causal: bool, visible=None):
    """softmax(q k^T / sqrt(d)) v for q (B, H, Tq, d) and k, v (B, Hkv, Tk, d) -> (B, H, Tq, d).

    With GQA (H > Hkv) query head h reads KV head h // (H / Hkv). `causal` aligns the queries with
    the *last* Tq keys (a prompt appended to a cache sees everything before it). `visible` (B, Tk)
    bool, if given, hides the keys where it is False from every query (transformers' attention_mask).
    """
    Tq, Tk = q.shape[2], k.shape[2]
    mask = None
    if causal and Tq > 1 and (Tq != Tk or visible is not None):
        # (Tq, Tk) True where query i may see key j: j <= i + (Tk - Tq).
        mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)
    if visible is not None:
        keys = visible[:, None, None, :].to(device=q.device, dtype=torch.bool)  # (B, 1, 1, Tk)
        mask = keys if mask is None else mask & keys                           # (B, 1, Tq, Tk)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and Tq > 1 and mask is None,
                                          enable_gqa=q.shape[1] != k.shape[1])


# ---------------------------------------------------------------------------------------------------
# CLIP vision tower (pre-LN ViT). Only the layers up to the feature layer are built and run.
# ---------------------------------------------------------------------------------------------------

class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.num_patches = (config.image_size // config.patch_size) ** 2
        # zeros, not torch.empty: a fresh model must not start from whatever memory held (training re-inits it)
        self.class_embedding = nn.Parameter(torch.zeros(config.hidden_size))
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, config.patch_size,
                                         stride=config.patch_size, bias=False)
        self.position_embedding = nn.Embedding(self.num_patches + 1, config.hidden_size)

    def forward(self, pixel_values):  # (B, 3, H, W)
        patches = self.patch_embedding(pixel_values)                  # (B, C, H/p, W/p)
        patches = patches.flatten(2).transpose(1, 2)                  # (B, P, C), row-major patch grid
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)    # (B, 1, C)
        x = torch.cat([cls, patches], dim=1)                          # (B, 1 + P, C)
        return x + self.position_embedding.weight                     # (B, 1 + P, C)


class CLIPAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x):  # (B, N, C)
        B, N, C = x.shape
        q, k, v = (proj(x).view(B, N, self.n_heads, C // self.n_heads).transpose(1, 2)  # (B, nh, N, hs)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        y = attention(q, k, v, causal=False)             # bidirectional: every patch sees every patch
        return self.out_proj(y.transpose(1, 2).reshape(B, N, C))


class CLIPMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.act = ACTIVATIONS[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = CLIPAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, config: VisionConfig, n_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(n_layers))


class CLIPVisionTransformer(nn.Module):
    """`vision_tower.vision_model`. `post_layernorm` is in the checkpoint but LLaVA never applies it."""

    def __init__(self, config: VisionConfig, n_layers: int):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # sic: CLIP's key
        self.encoder = CLIPEncoder(config, n_layers)

    def forward(self, pixel_values) -> list[torch.Tensor]:
        """Every hidden state: [pre_layrnorm output, after layer 1, ..., after the last built layer]."""
        x = self.pre_layrnorm(self.embeddings(pixel_values))  # (B, 1 + P, C)
        states = [x]
        for layer in self.encoder.layers:
            x = layer(x)
            states.append(x)
        return states


class CLIPVisionModel(nn.Module):
    def __init__(self, config: VisionConfig, n_layers: int):
        super().__init__()
        self.vision_model = CLIPVisionTransformer(config, n_layers)


class LlavaMultiModalProjector(nn.Module):
    """Two-layer MLP from (concatenated) CLIP features to the decoder's embedding width."""

    def __init__(self, config: LlavaConfig):
        super().__init__()
        in_features = config.vision.hidden_size * len(config.feature_layers)
        bias = config.multimodal_projector_bias
        self.linear_1 = nn.Linear(in_features, config.text.hidden_size, bias=bias)
        self.act = ACTIVATIONS[config.projector_hidden_act]
        self.linear_2 = nn.Linear(config.text.hidden_size, config.text.hidden_size, bias=bias)

    def forward(self, features):  # (B, N_img, C_vision * n_feature_layers)
        return self.linear_2(self.act(self.linear_1(features)))  # (B, N_img, C_text)


# ---------------------------------------------------------------------------------------------------
# Llama decoder
# ---------------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32 (bf16 squares lose precision), cast back, then scale: as transformers does.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(positions, head_dim: int, theta: float, dtype):
    """cos and sin tables (T, head_dim) for the given (logical) positions (T,)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    angles = positions.float()[:, None] * inv_freq[None, :]     # (T, head_dim / 2), in fp32
    emb = torch.cat([angles, angles], dim=-1)                    # (T, head_dim): half-split layout
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x):
    # (x1, x2) -> (-x2, x1) on the two halves of the head dimension (not interleaved pairs).
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x, cos, sin):  # x (B, nh, T, hs); cos, sin (T, hs)
    return x * cos + rotate_half(x) * sin


class LlamaAttention(nn.Module):
    def __init__(self, config: TextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx  # the cache keeps one entry per layer
        self.n_heads, self.n_kv_heads, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                        config.head_dim)
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(self, x, cos, sin, positions, cache=None, visible=None):  # x (B, T, C); positions (T,) logical
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)     # (B, H, T, hs)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hs)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hs)
        # Keys are rotated before they are cached, so cached rows can be dropped or reordered freely.
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            y = attention(q, k, v, causal=True, visible=visible)
        else:
            y = cache.attend(self.layer_idx, q, k, v, positions)  # the policy stores k, v, picks what to attend
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class LlamaMLP(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        bias = config.mlp_bias
        self.act = ACTIVATIONS[config.hidden_act]
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: TextConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, x, cos, sin, positions, cache=None, visible=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, positions, cache, visible)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cache=None, visible=None):  # x (B, T, C): token embeddings with the image features merged in
        T = x.shape[1]
        start = cache.next_pos if cache is not None else 0
        # Logical positions: with a cache that has dropped rows, the new token is still at prompt + steps.
        positions = torch.arange(start, start + T, device=x.device)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)  # (T, hs)
        for layer in self.layers:
            x = layer(x, cos, sin, positions, cache, visible)
            # Token dropping inside the decoder (FastV, A-VL's prefill filter): the policy may ask later
            # layers to run on fewer rows. Kept rows keep their original positions.
            keep = cache.rows_to_keep(layer.self_attn.layer_idx) if cache is not None else None
            if keep is not None:
                x, positions, cos, sin = x[:, keep], positions[keep], cos[keep], sin[keep]
        if cache is not None:
            cache.advance(T)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    """`language_model`: the decoder (`.model`) and the output projection (`.lm_head`)."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, x, cache=None, last_only=False, visible=None):
        x = self.model(x, cache, visible)
        if last_only:  # generation needs only the next-token logits: skip a (T, vocab) matrix
            x = x[:, -1:]
        return self.lm_head(x).float()  # (B, T, vocab), fp32 for sampling


# ---------------------------------------------------------------------------------------------------
# LLaVA: image features replace the image-token embeddings, then the decoder runs as usual.
# ---------------------------------------------------------------------------------------------------

class LlavaForConditionalGeneration(nn.Module):
    def __init__(self, config: LlavaConfig):
        super().__init__()
        self.config = config
        # The feature layer is usually -2: the last CLIP layer never runs, so it is not even built.
        self.vision_tower = CLIPVisionModel(config.vision, n_layers=max(config.feature_layers))
        self.multi_modal_projector = LlavaMultiModalProjector(config)
        self.language_model = LlamaForCausalLM(config.text)

    def image_features(self, pixel_values):  # (B, 3, H, W) -> (B, N_img, C_text)
        size = self.config.vision.image_size
        if pixel_values.shape[-2:] != (size, size):
            raise ValueError(f"pixel_values are {tuple(pixel_values.shape[-2:])}, the vision tower takes {size}x{size}")
        dtype = self.vision_tower.vision_model.pre_layrnorm.weight.dtype
        states = self.vision_tower.vision_model(pixel_values.to(dtype))  # list of (B, 1 + P, C_vision)
        features = [states[i] for i in self.config.feature_layers]
        if self.config.vision_feature_select_strategy == "default":
            features = [f[:, 1:] for f in features]  # drop CLS: one token per patch
        return self.multi_modal_projector(torch.cat(features, dim=-1))

    def embed(self, input_ids, pixel_values=None):  # (B, T) -> (B, T, C)
        """Token embeddings, with the image positions overwritten (in order) by the image features."""
        x = self.language_model.model.embed_tokens(input_ids)       # (B, T, C)
        if pixel_values is None:
            # Decode steps (and text-only prompts): plain embeddings, even for a generated <image> id.
            return x
        is_image = input_ids == self.config.image_token_id         # (B, T)
        n_image_positions = int(is_image.sum())
        features = self.image_features(pixel_values)                 # (B, N_img, C)
        if n_image_positions != features.shape[0] * features.shape[1]:
            raise ValueError(f"input_ids hold {n_image_positions} image tokens, the images give "
                             f"{features.shape[0] * features.shape[1]} features")
        return x.masked_scatter(is_image[..., None], features.to(x.dtype))

    def forward(self, input_ids, pixel_values=None, cache=None, last_only=False, attention_mask=None):
        """Logits (B, T, vocab) for input_ids (B, T) that already hold the expanded image tokens.

        Without a cache this is the plain causal forward over the whole sequence; attention_mask (B, T),
        as in transformers, is 1 where a token may be attended and 0 where no query sees it (padding,
        or the image tokens the toy's training hides). With a cache the tokens continue the cached
        sequence, and the cache's policy decides what attention sees.
        """
        if attention_mask is not None and cache is not None:
            raise ValueError("attention_mask is for the cache-free forward; with a cache the policy decides")
        visible = None if attention_mask is None else attention_mask.bool()  # (B, T)
        return self.language_model(self.embed(input_ids, pixel_values), cache, last_only, visible)

    def ignores_checkpoint_key(self, key: str) -> bool:
        """Keys the forward never reads: post_layernorm, CLIP layers after the feature layer, and the
        position-id / rotary buffers older transformers versions saved (we derive them). A layer past
        vision_config.num_hidden_layers is not ignored: config.json and the file disagree."""
        if key.startswith("vision_tower.vision_model.post_layernorm."):
            return True
        if key.endswith((".position_ids", ".rotary_emb.inv_freq")):
            return True
        prefix = "vision_tower.vision_model.encoder.layers."
        return key.startswith(prefix) and len(self.vision_tower.vision_model.encoder.layers) <= int(
            key[len(prefix):].split(".")[0]) < self.config.vision.num_hidden_layers


# ---------------------------------------------------------------------------------------------------
# Loading a llava-hf folder: config.json + safetensors (one file, or shards with an index).
# ---------------------------------------------------------------------------------------------------

# transformers' own save layouts, rewritten onto the published hub layout (llava.md §2). Order matters:
# the 4.52-4.57 prefixes first, then 5.x's vision tower without `vision_model.`.
KEY_REWRITES = [
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.image_newline", "image_newline"),
]


def published_key(key: str) -> str:
    """The published-layout name of a checkpoint key written by any supported transformers version."""
    for old, new in KEY_REWRITES:
        if key.startswith(old):
            key = new + key[len(old):]
            break
    if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
        key = "vision_tower.vision_model." + key[len("vision_tower."):]
    return key


def read_config(folder: Path) -> LlavaConfig:
    if folder.exists() and not folder.is_dir():
        raise UserError(f"weights {str(folder)!r} is a file: give the llava-hf model folder that holds it")
    if not folder.is_dir():
        raise UserError(f"weights folder {str(folder)!r} does not exist: put a llava-hf model folder there "
                        "(see weights/README.md)")
    path = folder / "config.json"
    if not path.is_file():
        raise UserError(f"{path} is missing: a llava-hf model folder holds config.json beside its safetensors")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path} must hold a JSON object")
    try:
        return LlavaConfig.from_dict(raw)
    except TypeError as err:  # a field of the wrong type, e.g. a string where a number belongs
        raise UserError(f"{path} has an invalid field: {err}") from None


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder: the shards an index names, or the single model.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise UserError(f"{index} is not a valid safetensors index ({err!r})") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise UserError(f"{index.name} lists shards that are missing from {folder}: {', '.join(missing)}")
        return files
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
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
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("CUDA was asked for but this machine has no CUDA device: use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"unsupported device {str(device)!r}: use cpu or cuda")
    return device


def resolve_dtype(dtype, stored: torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPE_NAMES:
            raise UserError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPE_NAMES)}")
        dtype = DTYPE_NAMES[dtype]
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


def first_few(items: list[str], shown: int = 3) -> str:
    """The count and the first few items: a config for another model size mismatches every key."""
    more = f" ... and {len(items) - shown} more" if len(items) > shown else ""
    return f"({len(items)}): {', '.join(items[:shown])}{more}"


def all_finite(t: torch.Tensor) -> bool:
    # min and max propagate NaN and show inf; one reduction is ~50x faster than isfinite(t).all() on a CPU.
    return bool(torch.isfinite(torch.stack(torch.aminmax(t))).all())


def load_weights(model: LlavaForConditionalGeneration, files: list[Path], dtype, device) -> None:
    """Check every key, shape and dtype against the model, then stream tensors in one at a time.

    The model was built on the meta device (no memory); each tensor is read from the memory-mapped
    file, converted to the run dtype on the run device, and assigned as the parameter itself, so a
    7B model never exists twice in memory.
    """
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}  # shapes only (meta)
    tied = model.config.text.tie_word_embeddings
    if tied:  # the head shares the embedding matrix; checkpoints usually omit it
        expected.pop("language_model.lm_head.weight")
    found, unexpected, misshaped, not_float = {}, [], {}, []
    for path in files:
        with open_safetensors(path) as f:
            for key in f.keys():
                name = published_key(key)
                if name in found or model.ignores_checkpoint_key(name):
                    continue
                header = f.get_slice(key)
                if header.get_dtype() not in FLOAT_DTYPES:  # e.g. int8: a cast would give nonsense weights
                    not_float.append(f"{key} ({header.get_dtype()})")
                shape = tuple(header.get_shape())
                if name not in expected:
                    unexpected.append(key)
                elif shape != expected[name]:
                    misshaped[name] = f"{key} {list(shape)} (model expects {list(expected[name])})"
                else:
                    found[name] = (path, key)
    if not_float:
        raise UserError(f"checkpoint has non-float tensors {first_few(not_float)}; tinyavl loads float weights "
                        "(F32, F16, BF16) only, not quantised checkpoints: use the original llava-hf files")
    missing = sorted(set(expected) - set(found) - set(misshaped))
    problems = [f"{label} {first_few(items)}" for label, items in
                (("missing keys", missing), ("unexpected keys", sorted(unexpected)),
                 ("mis-shaped tensors", list(misshaped.values()))) if items]
    if problems:
        hint = (". Sizes config.json leaves out take transformers' defaults: Llama-2-7B in text_config, CLIP "
                "ViT-L/14-336 without a vision_config" if misshaped else "")
        raise UserError("checkpoint does not match config.json; " + "; ".join(problems) + hint)

    state = {}
    for name, (path, key) in found.items():
        # One mapping per tensor: pages of a file that stays mapped count towards the process's memory
        # until it is closed, so holding a whole 5 GB shard open would add 5 GB to the peak.
        with open_safetensors(path) as f:
            stored = f.get_tensor(key)
            state[name] = stored.to(device=device, dtype=dtype)
        # One NaN or inf, even in a norm weight, makes every logit NaN: the answer would be <unk> repeated.
        # Checked after the conversion, so a value the run dtype cannot hold (fp32 -> fp16) is caught too.
        if not all_finite(state[name]):
            if all_finite(stored):
                raise UserError(f"tensor {key} overflows {str(dtype).removeprefix('torch.')}: load the model "
                                "in bfloat16 or float32 (--dtype)")
            raise UserError(f"tensor {key} in {path.name} holds NaN or inf values: the file is damaged, "
                            "download it again")
    if tied:
        state["language_model.lm_head.weight"] = state["language_model.model.embed_tokens.weight"]
    model.load_state_dict(state, assign=True)
    if tied:  # assign=True replaced both parameters: tie them again
        model.language_model.lm_head.weight = model.language_model.model.embed_tokens.weight


def stored_dtype(files: list[Path]) -> torch.dtype:
    """The floating dtype the checkpoint was saved in (fp16 for the published llava-hf files)."""
    with open_safetensors(files[0]) as f:
        for key in f.keys():
            dtype = STORED_DTYPES.get(f.get_slice(key).get_dtype())
            if dtype is not None:
                return dtype
    return torch.float32


def load_model(path, device=None, dtype=None) -> LlavaForConditionalGeneration:
    folder = Path(path)
    config = read_config(folder)
    files = checkpoint_files(folder)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, stored_dtype(files), device)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    load_weights(model, files, dtype, device)
    return model.eval().requires_grad_(False)
