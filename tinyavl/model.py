"""LLaVA-1.5 and LLaVA-1.6 in one file: CLIP vision tower + MLP projector + Llama decoder, in plain PyTorch.

Read top to bottom: the configs, the activations and attention every block shares, the CLIP blocks, the
projector, the Llama blocks, FlexAttention's high-resolution view, and the LLaVA wrapper that turns an
image into features and puts them where the image tokens are. LLaVA-1.5 shows the tower one 336 px crop of
the image; LLaVA-1.6 (LLaVA-NeXT, "anyres") shows it the whole image as one crop plus tiles of a larger
canvas, and lays the tiles' features out as a map with a newline token after every row (tinyavl/anyres.py
has the geometry). LLaVA-1.5 is the special case: one crop, no map, no newline. FlexAttention's
hierarchical attention (`HiresView`, off unless config.json has a hires_config) lets the current token
also read a few tokens of a high-resolution view of the image, chosen by tinyavl/hires.py. Reading a
llava-hf folder into this model is tinyavl/loading.py.

References
- Liu et al., "Improved Baselines with Visual Instruction Tuning" (LLaVA-1.5), arXiv 2310.03744.
- Liu et al., "LLaVA-NeXT: Improved reasoning, OCR, and world knowledge" (LLaVA-1.6), 2024.
- Radford et al., "Learning Transferable Visual Models From Natural Language Supervision" (CLIP).
- Li et al., "FlexAttention for Efficient High-Resolution Vision-Language Models", ECCV 2024, arXiv 2407.20228.
- Touvron et al., "Llama 2", arXiv 2307.09288. Mistral-7B (Jiang et al., arXiv 2310.06825), the decoder
  of llava-v1.6-mistral, is the same architecture here: its sliding window is off in that checkpoint.
- The checkpoint facts we match (key names, config defaults, forward details): transformers' source,
  src/transformers/models/{llava,llava_next,clip,llama}/modeling_*.py and configuration_*.py.

Module names mirror the llava-hf checkpoint keys (`language_model.model.layers.0.self_attn.q_proj`,
`vision_tower.vision_model.encoder.layers.0.mlp.fc1`, `image_newline`, ...), so loading is one loop over
the file's keys. The decoder's attention goes through an optional `cache` object (tinyavl/cache.py): that
is where every KV policy, from the dense reference to A-VL, decides what is kept and what is computed.
"""
import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinyavl import anyres, hires
from tinyavl.errors import UserError
from tinyavl.timing import best_seconds


# ---------------------------------------------------------------------------------------------------
# Configs. A published config.json is sparse: what it leaves out takes the transformers class default,
# so the defaults of TextConfig, VisionConfig and LlavaConfig below are those classes' (not the
# LLaVA-1.5-7B values, but for LlavaConfig's vision tower, CLIP ViT-L/14-336 in transformers too);
# HiresConfig's are its paper's settings.
# ---------------------------------------------------------------------------------------------------

# The checks every config runs on itself (`__post_init__`): what config.json may hold.

def is_token_id(value, vocab_size: int) -> bool:
    """An id the embedding table has a row for (a JSON integer: not true, not 2.0)."""
    return type(value) is int and 0 <= value < vocab_size


def is_eos_token_id(value, vocab_size: int) -> bool:
    """What a config file may give as the ids that end an answer (`eos_token_id_rule`)."""
    return (value is None or is_token_id(value, vocab_size)
            or (isinstance(value, list) and bool(value) and all(is_token_id(i, vocab_size) for i in value)))


def eos_token_id_rule(vocab_size: int) -> str:
    """`is_eos_token_id` in words, for the message that refuses a value."""
    return f"a token id (0 .. {vocab_size - 1}), a non-empty list of them, or null"


def _require(ok: bool, problem: str) -> None:
    """Refuse a config value that would build a broken model, or crash while building it."""
    if not ok:
        raise UserError(f"config.json: {problem}; fix the value, or download the checkpoint's config.json again")


def _require_kind(config, section: str, names, kind: type) -> None:
    """Each named field is a JSON string (kind str) or true / false (kind bool): the string "false" would be
    true to Python, and a list where a name belongs would fail later, far from the field."""
    for name in names:
        value = getattr(config, name)
        _require(type(value) is kind, f"{f'{section}.' if section else ''}{name} is {value!r}, but it must be "
                 + ("a string" if kind is str else "true or false"))


def _require_positive(config, section: str, names, kind: type, or_null: bool = False) -> None:
    """Each named field is a positive int (kind int) or a positive finite number (kind float); `or_null`:
    fields a file may also set to null (the message then says so)."""
    for name in names:
        value = getattr(config, name)
        # bool is an int in Python, but `"hidden_size": true` is a broken file, not 1.
        number = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
        _require(number and 0 < value < math.inf, f"{section}.{name} is {value!r}, but it must be a positive "
                 f"{'integer' if kind is int else 'number'}{' or null' if or_null else ''}")


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
        _require(type(self.num_channels) is int and self.num_channels == 3, f"{section}.num_channels is "
                 f"{self.num_channels!r}: the vision tower takes RGB images, the integer 3 (channels)")
        _require_kind(self, section, ("hidden_act",), str)
        _require(self.hidden_size % self.num_attention_heads == 0, f"{section}.hidden_size {self.hidden_size} "
                 f"is not divisible by num_attention_heads {self.num_attention_heads}")
        # Not divisible is fine (the patch convolution drops the border, as in transformers); smaller is 0 patches.
        _require(self.image_size >= self.patch_size, f"{section}.image_size {self.image_size} is smaller "
                 f"than patch_size {self.patch_size}")

    @property
    def patches_per_side(self) -> int:
        """Patches along each side of a crop, and so image tokens a side: 336 // 14 = 24 for CLIP ViT-L/14."""
        return self.image_size // self.patch_size


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
    # Mistral's sliding window: a token attends the last `sliding_window` tokens, itself included. tinyavl
    # attends every earlier token, the same thing while a sequence fits the window: a run ends there
    # (`context`). None: no window, as Llama's.
    sliding_window: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # Linear RoPE scaling (rope_scaling {"rope_type": "linear", "factor": f}, as in long-context Vicuna
    # fine-tunes): positions are divided by f before rotating. 1: plain RoPE.
    rope_linear_factor: float = 1.0
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    # The ids that end an answer (config.json may list several); read_config takes generation_config.json's
    # where the folder's file declares them, as transformers' generate does.
    eos_token_id: int | list[int] | None = 2

    def __post_init__(self):
        # Checked before the derived sizes below, which would divide by a zero head count.
        section = "text_config"
        _require_positive(self, section, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                          "num_attention_heads", "max_position_embeddings"), int)
        _require_positive(self, section, ("rms_norm_eps", "rope_theta", "rope_linear_factor"), float)
        _require_positive(self, section, [name for name in ("num_key_value_heads", "head_dim", "sliding_window")
                                          if getattr(self, name) is not None], int, or_null=True)
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        if self.head_dim is None:
            _require(self.hidden_size % self.num_attention_heads == 0, f"{section}.hidden_size {self.hidden_size} "
                     f"is not divisible by num_attention_heads {self.num_attention_heads} (and no head_dim is given)")
            self.head_dim = self.hidden_size // self.num_attention_heads
        _require(self.head_dim % 2 == 0, f"{section} gives an odd head size {self.head_dim}: RoPE rotates pairs")
        _require(self.num_attention_heads % self.num_key_value_heads == 0, f"{section}.num_key_value_heads "
                 f"{self.num_key_value_heads} does not divide num_attention_heads {self.num_attention_heads}")
        _require_kind(self, section, ("attention_bias", "mlp_bias", "tie_word_embeddings"), bool)
        _require_kind(self, section, ("hidden_act",), str)
        # null: none declared (an answer then ends at its length). Several ids may end an answer; one begins it.
        bos, eos = self.bos_token_id, self.eos_token_id
        a_token = f"a token id (0 .. {self.vocab_size - 1})"
        _require(bos is None or is_token_id(bos, self.vocab_size),
                 f"{section}.bos_token_id is {bos!r}, but it must be {a_token} or null")
        _require(is_eos_token_id(eos, self.vocab_size),
                 f"{section}.eos_token_id is {eos!r}, but it must be {eos_token_id_rule(self.vocab_size)}")

    @property
    def context(self) -> int:
        """The tokens a sequence may hold: the model's positions, and no more than its sliding window."""
        return min(self.max_position_embeddings, self.sliding_window or self.max_position_embeddings)


@dataclass
class HiresConfig:
    """FlexAttention (Li et al., ECCV 2024; tinyavl/hires.py): the image also seen at scale x its size, as
    scale x scale crops through the same tower and projector, kept beside the sequence; from first_layer
    on, the current token also attends to the high-resolution tokens in the blocks that the layer before
    selects for it (threshold, blocks a side). Not in any llava-hf config: a "hires_config" object."""
    scale: int = 3            # 1008 px for LLaVA-1.5's 336: a 72 x 72 map
    first_layer: int = 9      # its paper's LLaVA-1.5-7B setting, a 0-based layer_idx; layer first_layer - 1
                              # makes the first selection
    threshold: float = hires.THRESHOLD  # of 255
    blocks: int = hires.BLOCKS          # blocks a side

    def __post_init__(self):
        section = "hires_config"
        _require_positive(self, section, ("scale", "first_layer", "blocks"), int)
        _require(hires.is_threshold(self.threshold),
                 f"{section}.threshold {self.threshold!r} must be {hires.THRESHOLD_RANGE}")


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
    # LLaVA-1.6 (model_type llava_next): the (height, width) canvases an image may be tiled on, in pixels.
    # None is LLaVA-1.5: one crop per image.
    image_grid_pinpoints: list[tuple[int, int]] | None = None
    hires: HiresConfig | None = None  # FlexAttention's high-resolution view and its projections; None: off

    @property
    def is_next(self) -> bool:
        """LLaVA-1.6 (LLaVA-NeXT, model_type llava_next): an image is tiled on one of the canvases."""
        return self.image_grid_pinpoints is not None

    @property
    def feature_layers(self) -> list[int]:
        """The vision hidden-state indices the projector reads, from 0 (0 = the pre_layrnorm output, k =
        the output of the k-th layer, encoder.layers[k - 1]); a negative vision_feature_layer counts from the
        last, as in transformers, and one out of range is refused rather than wrapped around."""
        layers = self.vision_feature_layer
        layers = layers if isinstance(layers, list) and layers else [layers]  # an empty list is refused below
        n_states = self.vision.num_hidden_layers + 1  # the pre_layrnorm output and one per layer
        for layer in layers:
            if type(layer) is not int or not -n_states <= layer < n_states:
                raise UserError(f"vision_feature_layer {layer!r} does not exist: the vision tower has "
                                f"{n_states} hidden states (-{n_states} .. {n_states - 1})")
        return [layer % n_states for layer in layers]

    @property
    def num_image_tokens(self) -> int:
        """How many positions one crop takes in the prompt: one per patch (+ CLS for "full"). A LLaVA-1.5
        image is one crop; a LLaVA-1.6 image takes anyres.image_token_count, which depends on its size."""
        patches = self.vision.patches_per_side ** 2
        return patches + (1 if self.vision_feature_select_strategy == "full" else 0)

    def validate(self) -> None:
        """Checks across the sections (text_config and vision_config check their own fields when built).

        Called by loading.parse_config, not on construction: the bare defaults, like transformers', put
        image token 32000 outside the 32000-word vocabulary."""
        _ = self.feature_layers  # the property refuses a layer the tower does not have
        _require_kind(self, "", ("projector_hidden_act", "vision_feature_select_strategy"), str)  # top-level fields
        _require_kind(self, "", ("multimodal_projector_bias",), bool)
        strategy = self.vision_feature_select_strategy
        _require(strategy in ("default", "full"),
                 f"vision_feature_select_strategy is {strategy!r}, but it must be \"default\" or \"full\"")
        for act in (self.text.hidden_act, self.vision.hidden_act, self.projector_hidden_act):
            _require(act in ACTIVATIONS, f"the activation {act!r} is not one tinyavl implements "
                     f"({', '.join(sorted(ACTIVATIONS))})")
        if self.is_next:
            self._validate_pinpoints()
        if self.hires is not None:
            self._validate_hires()
        vocab = self.text.vocab_size
        _require(type(self.image_token_id) is int, f"image_token_index {self.image_token_id!r} is not an integer")
        _require(0 <= self.image_token_id < vocab,
                 f"image_token_index {self.image_token_id!r} is outside the vocabulary (0 .. {vocab - 1})")

    def _validate_hires(self) -> None:
        """FlexAttention's view fits the model: a LLaVA-1.5 grid of patches, blocks that tile both maps (the
        section's own fields check themselves: HiresConfig)."""
        h, section = self.hires, "hires_config"
        side = self.vision.patches_per_side
        _require(not self.is_next and self.vision_feature_select_strategy == "default", f"{section}: "
                 "FlexAttention's view is built for LLaVA-1.5's one crop of patch tokens (no anyres, no CLS)")
        _require(h.first_layer < self.text.num_hidden_layers, f"{section}.first_layer {h.first_layer} is not a "
                 f"layer after the first of the decoder's {self.text.num_hidden_layers}")
        _require(h.blocks <= side and (side * h.scale) % h.blocks == 0, f"{section}.blocks {h.blocks} must be at "
                 f"most the {side} tokens a side and divide the {side * h.scale} high-resolution tokens a side")

    def _validate_pinpoints(self) -> None:
        """LLaVA-1.6's canvases are well formed (then held as (height, width) tuples), and its tiles' grids
        can be laid out (no CLS)."""
        tile = self.vision.image_size
        pinpoints = self.image_grid_pinpoints
        # Canvases are cut into whole tiles of the tower's size; anything else would drop image rows.
        well_formed = isinstance(pinpoints, list) and pinpoints and all(
            isinstance(p, (list, tuple)) and len(p) == 2 and all(type(v) is int and v > 0 and v % tile == 0
                                                                 for v in p) for p in pinpoints)
        _require(well_formed, f"image_grid_pinpoints is {pinpoints!r}, but LLaVA-1.6 needs a non-empty list of "
                 f"[height, width] canvases in pixels, each a positive multiple of the vision tower's {tile} px")
        self.image_grid_pinpoints = [tuple(p) for p in pinpoints]
        _require(self.vision_feature_select_strategy == "default", "vision_feature_select_strategy is "
                 f"{self.vision_feature_select_strategy!r}: LLaVA-1.6 lays each tile's patch features out as a "
                 "grid, which needs the CLS token dropped (\"default\")")
        # A feature row of the tile map is then exactly patch_size pixel rows of the canvas.
        _require(tile % self.vision.patch_size == 0, f"vision_config.image_size {tile} is not a multiple of "
                 f"patch_size {self.vision.patch_size}: LLaVA-1.6's tiles must be whole patches")


# ---------------------------------------------------------------------------------------------------
# Activations and attention, shared by the vision tower, the decoder and the KV caches (tinyavl/cache.py).
# ---------------------------------------------------------------------------------------------------

def quick_gelu(x):
    # CLIP's cheap GELU approximation: x * sigmoid(1.702 x).
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {
    "gelu": F.gelu,  # exact (erf) GELU: LLaVA's projector
    "quick_gelu": quick_gelu,
    "silu": F.silu,  # Llama's MLP gate
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),  # the same tanh approximation, an older name
    "relu": F.relu,
    "swish": F.silu,  # another name of SiLU
}


def attention(q, k, v, causal: bool, visible=None):
    """softmax(q k^T / sqrt(d)) v for q (B, H, Tq, d) and k, v (B, Hkv, Tk, d) -> (B, H, Tq, d).

    With GQA (H > Hkv) query head h reads KV head h // (H / Hkv). `causal`: the queries are the keys'
    own tokens (Tq = Tk), and query i sees keys 0 .. i. `visible` (B, Tk) bool, if given, hides the keys
    where it is False from every query (transformers' attention_mask).
    """
    Tq, Tk = q.shape[2], k.shape[2]
    causal = causal and Tq > 1  # one query row has no later key to hide
    gqa = q.shape[1] != k.shape[1]
    if visible is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
    mask = visible[:, None, None, :].to(device=q.device, dtype=torch.bool)           # (B, 1, 1, Tk)
    if causal:
        mask = mask & torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril()  # (B, 1, Tq, Tk)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def rows_logits(q, k):
    """Scaled logits of query rows q (B, H, R, hs) over keys k (B, Hkv, n, hs): (B, H, R, n) fp32. Query head
    h reads KV head h // (H / Hkv). For the few rows a policy or FlexAttention scores, and for every
    decode step's query (tinyavl/cache.py, `decode_attention`), so the prompt's path stays on SDPA."""
    B, H, R, hs = q.shape
    Hkv, n = k.shape[1], k.shape[2]
    grouped = q.reshape(B, Hkv, H // Hkv * R, hs)                  # (B, Hkv, G R, hs): a GQA group per KV head
    if keys_first(k.device.type, k.dtype):
        logits = (k @ grouped.transpose(-1, -2)).transpose(-1, -2).contiguous()  # (B, Hkv, G R, n)
    else:
        logits = grouped @ k.transpose(-1, -2)                       # (B, Hkv, G R, n)
    return (logits.float() * hs ** -0.5).reshape(B, H, R, n)


def keys_first(device_type: str, dtype: torch.dtype) -> bool:
    """Whether `rows_logits` multiplies k q^T (True) or q k^T on this kind of device and dtype.

    The two are the same products (up to rounding), but a CPU's BLAS runs a different matrix-vector kernel
    for each, and which one reads K at the memory's rate depends on the processor and the dtype (either can
    be several times faster: tutorial chapter 8, "Shapes matter too"). A decode step's attention is mostly
    this read, so on a CPU the faster is taken (`faster_keys_first`). Elsewhere (CUDA) q k^T. The two round
    differently, so two CPU runs that chose differently may differ in the last bits of their logits: under
    deterministic algorithms (the toys' training, `tinyavl.toy.train.deterministic_algorithms`) a CPU takes
    k q^T whatever a timing finds, the form the committed toys were trained with, so that a training gives the
    same weights on every machine.
    """
    if device_type != "cpu":
        return False
    if torch.are_deterministic_algorithms_enabled():
        return True
    return faster_keys_first(dtype)


@functools.cache
def faster_keys_first(dtype: torch.dtype) -> bool:
    """Whether k q^T runs faster than q k^T on this CPU in this dtype: both timed once, on LLaVA-7B's shape
    (32 heads of 2048 rows of 128)."""
    k = torch.ones(1, 32, 2048, 128, dtype=dtype)   # (B, Hkv, n, hs): 32 heads of 2048 rows (the values do not
    q = torch.ones(1, 32, 1, 128, dtype=dtype)      # matter to the time, and ones leave the random seed alone)
    return best_seconds(lambda: k @ q.transpose(-1, -2), 3) < best_seconds(lambda: q @ k.transpose(-1, -2), 3)


# ---------------------------------------------------------------------------------------------------
# CLIP vision tower (pre-LN ViT). Only the layers up to the feature layer are built and run.
# ---------------------------------------------------------------------------------------------------

class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        num_patches = config.patches_per_side ** 2
        # zeros, not torch.empty: a fresh model must not start from whatever memory held (training re-inits it)
        self.class_embedding = nn.Parameter(torch.zeros(config.hidden_size))
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, config.patch_size,
                                         stride=config.patch_size, bias=False)
        self.position_embedding = nn.Embedding(num_patches + 1, config.hidden_size)  # CLS + one per patch

    def forward(self, pixel_values):  # (B, 3, H, W)
        patches = self.patch_embedding(pixel_values)                  # (B, C, H/p, W/p)
        patches = patches.flatten(2).transpose(1, 2)                  # (B, P, C), row-major patch grid
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)    # (B, 1, C)
        x = torch.cat([cls, patches], dim=1)                          # (B, 1 + P, C)
        # transformers adds position_embedding(arange(1 + P)): every row of the table, in order (the image
        # size is fixed, so the table is never interpolated).
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
    """Only a level of the checkpoint's keys (vision_model.encoder.layers.N): CLIPVisionTransformer runs the layers."""

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
        """Every hidden state: [pre_layrnorm output, after layers[0], ..., after the last built layer]."""
        x = self.pre_layrnorm(self.embeddings(pixel_values))  # (B, 1 + P, C)
        states = [x]
        for layer in self.encoder.layers:
            x = layer(x)
            states.append(x)
        return states


class CLIPVisionModel(nn.Module):
    """Only a level of the checkpoint's keys (vision_tower.vision_model)."""

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


def rope_cos_sin(positions, config: TextConfig, dtype):
    """cos and sin tables (T, head_dim) for the given (logical) positions (T,)."""
    head_dim = config.head_dim
    exponents = torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim
    # Linear scaling divides the frequencies, as transformers does (the same angles as dividing the positions).
    inv_freq = 1.0 / config.rope_theta ** exponents / config.rope_linear_factor          # (head_dim / 2,)
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
    def __init__(self, config: TextConfig, layer_idx: int, hires_projections: bool = False):
        super().__init__()
        self.layer_idx = layer_idx  # the cache keeps one entry per layer
        self.n_heads, self.n_kv_heads, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                        config.head_dim)
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=bias)
        if hires_projections:  # FlexAttention: keys and values of the high-resolution tokens (tinyavl/hires.py)
            self.k_proj_hd = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
            self.v_proj_hd = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)

    def forward(self, x, cos, sin, positions, cache=None, visible=None, view=None, norm=None):
        """x (B, T, C) at positions (T,); view: FlexAttention's `HiresView`, if any; norm: the layer's input
        norm, which FlexAttention's high-resolution features also go through."""
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
        if view is not None and view.acts_in(self.layer_idx):  # FlexAttention: the current token also reads
            # high-resolution tokens the layer before chose for it
            if cache is None:
                # No cache: the keys are this pass's own tokens, at the queries' positions in every head.
                y = view.serve(self, norm, q, k, y, positions, positions.expand(B, self.n_kv_heads, T), visible)
            else:  # the keys the policy let this step attend, set aside by cache.attend before it evicted
                keys, key_positions = cache.hires_keys
                y = view.serve(self, norm, q, keys, y, positions, key_positions)
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
    def __init__(self, config: TextConfig, layer_idx: int, hires_projections: bool = False):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, layer_idx, hires_projections)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, x, cos, sin, positions, cache=None, visible=None, view=None):
        norm = self.input_layernorm
        x = x + self.self_attn(norm(x), cos, sin, positions, cache, visible, view, norm)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: TextConfig, hires_first_layer: int | None = None):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        # FlexAttention's projections (k_proj_hd, v_proj_hd) in the layers from hires_first_layer on.
        reads_hires = [hires_first_layer is not None and i >= hires_first_layer for i in range(config.num_hidden_layers)]
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i, reads) for i, reads in enumerate(reads_hires))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cache=None, visible=None, view=None):  # x (B, T, C): embeddings, image features merged in
        T = x.shape[1]
        start = cache.next_pos if cache is not None else 0
        window = self.config.sliding_window
        if window is not None and start + T > window:  # Mistral's tokens would no longer see the earliest ones
            raise UserError(f"the sequence reaches {start + T} tokens, past the decoder's sliding window of "
                            f"{window}: tinyavl attends every earlier token, which is Mistral's attention only "
                            "within the window")
        # Logical positions: with a cache that has dropped rows, the new token is still at prompt + steps.
        positions = torch.arange(start, start + T, device=x.device)
        cos, sin = rope_cos_sin(positions, self.config, x.dtype)  # (T, hs)
        for layer in self.layers:
            x = layer(x, cos, sin, positions, cache, visible, view)
            # Token dropping inside the decoder (FastV, A-VL's prefill filter): the policy may ask later
            # layers to run on fewer rows. Kept rows keep their original positions.
            keep = cache.hidden_rows_to_keep() if cache is not None else None
            if keep is not None:  # (T',) ascending row indices, one list for the whole batch
                x, positions, cos, sin = x[:, keep], positions[keep], cos[keep], sin[keep]
        if cache is not None:
            cache.advance(T)  # T, not the rows kept: logical positions count the tokens fed
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    """`language_model`: the decoder (`.model`) and the output projection (`.lm_head`)."""

    def __init__(self, config: TextConfig, hires_first_layer: int | None = None):
        super().__init__()
        self.model = LlamaModel(config, hires_first_layer)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, x, cache=None, last_only=False, visible=None, view=None):
        x = self.model(x, cache, visible, view)
        if last_only:  # generation needs only the next-token logits: skip a (T, vocab) matrix
            x = x[:, -1:]
        return self.lm_head(x).float()  # (B, T, vocab), or (B, 1, vocab) with last_only; fp32 for sampling


# ---------------------------------------------------------------------------------------------------
# FlexAttention's hierarchical attention: the served rows also read chosen high-resolution tokens.
# ---------------------------------------------------------------------------------------------------

@dataclass
class HiresView:
    """A batch's high-resolution view (FlexAttention; tinyavl/hires.py), for the rows it serves.

    features (B, N_hd, C): the projector's features of the square high-resolution map, in reading order;
    cos, sin (N_hd, hs): their RoPE tables at hires.hires_positions; image_start: the position of the
    first low-resolution image token; lowres_side: the low-resolution image tokens a side; first_served: the
    position of the first row served, in generation the prompt's last token (the current token of the
    first step; every later token is the current token of its own step), in training the first after the
    image. Which layers choose blocks and which read them: `acts_in`; a reading row attends to its keys and
    to its chosen high-resolution tokens in one softmax (`serve`).
    The features enter a layer's k_proj_hd and v_proj_hd through the layer's input norm, as every token of
    the sequence enters k_proj and v_proj (tinyavl's choice, not one the paper describes: tutorial chapter
    7 says why); they are recomputed each step, never cached."""
    config: HiresConfig
    features: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    image_start: int
    lowres_side: int
    first_served: int
    alpha: float = 1.0                  # the blend of the hierarchical output: 0 = the plain model
    top: int | None = None              # choose this many best-scored blocks, not the threshold's (blocks^2: all)
    tokens_read: int = 0                # high-resolution keys read, summed over the batch, served rows, layers
    # (B, R, N_hd) bool for the served rows of this pass, set layer by layer. After a pass it holds the last
    # layer's choice, which no layer reads (the next pass chooses again from layer first_layer - 1): kept as
    # what the pass would read next, for a reader or a test to look at.
    chosen: torch.Tensor | None = None
    chosen_positions: torch.Tensor | None = None  # (R,) the logical positions of chosen's rows

    def acts_in(self, layer_idx: int) -> bool:
        """Whether a layer takes part: layer first_layer - 1 chooses for the next, and every layer after it
        reads what the one before chose and chooses in turn. The layers before do neither."""
        return layer_idx >= self.config.first_layer - 1

    def serve(self, attn: "LlamaAttention", norm, q, keys, y, q_positions, key_positions, visible=None):
        """y (B, H, T, hs), a layer's attention output, with its served rows merged with their chosen
        high-resolution tokens and blended by alpha; and the next layer's choice made. q (B, H, T, hs) at
        logical positions q_positions (T,); keys (B, Hkv, n, hs) at key_positions (B, Hkv, n), each head's
        own (a KV policy may keep different rows in each head); visible (B, n) bool, the cache-free
        forward's attention_mask (None: every key)."""
        rows = (q_positions >= self.first_served).nonzero().flatten()                  # (R,) served rows of q
        if len(rows) == 0:
            return y
        served_positions = q_positions[rows]                                            # (R,)
        H = q.shape[1]
        key_positions = key_positions.repeat_interleave(H // key_positions.shape[1], dim=1)  # (B, H, n) per query head
        logits = rows_logits(q[:, :, rows], keys)                                       # (B, H, R, n)
        logits = logits.masked_fill(key_positions[:, :, None, :] > served_positions[:, None], float("-inf"))  # causal
        if visible is not None:  # keys hidden from every query (the toy's image-token dropout) choose nothing
            logits = logits.masked_fill(~visible[:, None, None, :], float("-inf"))
        # Layer first_layer - 1 only chooses (it has no _hd projections): a choice set when it runs is the
        # previous pass's. Every later layer reads the one its layer before set in this pass.
        if attn.layer_idx >= self.config.first_layer:
            if len(self.chosen_positions) != len(served_positions):
                # A KV policy's filter (FastV, A-VL's P) dropped served rows since the layer that chose: the
                # rows left keep their positions, and each reads the choice made at its own.
                kept = torch.isin(self.chosen_positions, served_positions)              # (R before,) bool
                self.chosen, self.chosen_positions = self.chosen[:, kept], self.chosen_positions[kept]
            y = self.merge(attn, norm, q[:, :, rows], y, rows, logits.logsumexp(-1))
        self.choose(logits.softmax(-1), key_positions, served_positions)
        return y

    def choose(self, probs, key_positions, positions):
        """Set `chosen` (B, R, N_hd), the choice of the served rows at `positions` (R,) (`chosen_positions`),
        from their attention probs (B, H, R, n) over keys at key_positions (B, H, n), summed over heads. An image
        token the row did not attend (a KV policy evicted it, or did not compute it this step) has attention 0
        on the grid."""
        B, H, R, n = probs.shape
        slot = key_positions - self.image_start                                         # (B, H, n): place on the grid
        is_image = (slot >= 0) & (slot < self.lowres_side ** 2)
        # Each head's probabilities go to the places of its own keys: H2O, for one, keeps different rows per head.
        per_head = probs.new_zeros(B, H, R, self.lowres_side ** 2)                      # (B, H, R, lowres_side^2)
        # Keys outside the image land on a valid slot (clamp) with their probabilities zeroed.
        per_head.scatter_add_(-1, slot.clamp(0, self.lowres_side ** 2 - 1)[:, :, None, :].expand(B, H, R, n),
                              probs.masked_fill(~is_image[:, :, None, :], 0.0))
        image = per_head.sum(1)                                                         # (B, R, lowres_side^2)
        scores = hires.block_scores(image.view(B * R, -1), (self.lowres_side,) * 2, self.config.blocks)
        chosen_blocks = (hires.threshold_blocks(scores, self.config.threshold) if self.top is None
                         else hires.top_blocks(scores, self.top))                       # (B R, blocks, blocks)
        tokens = hires.block_tokens(chosen_blocks, math.isqrt(self.features.shape[1]))  # (B R, N_hd)
        self.chosen, self.chosen_positions = tokens.view(B, R, -1), positions

    def merge(self, attn: "LlamaAttention", norm, q_rows, y, rows, lse):
        """One softmax over each served row's keys (its output in y, its log-sum-exp lse (B, H, R)) and its
        chosen high-resolution tokens. Only tokens some row chose are projected, after the layer's input
        norm (`norm`), as every token of the sequence is before k_proj and v_proj."""
        index = self.chosen.any(1).any(0).nonzero().flatten()                          # (m,) in any row's choice
        if len(index) == 0:
            return y
        B, m = q_rows.shape[0], len(index)
        self.tokens_read += int(self.chosen.sum())
        feats = norm(self.features[:, index])                                           # (B, m, C)
        k_hd = attn.k_proj_hd(feats).view(B, m, attn.n_kv_heads, attn.head_dim).transpose(1, 2)  # (B, Hkv, m, hs)
        v_hd = attn.v_proj_hd(feats).view(B, m, attn.n_kv_heads, attn.head_dim).transpose(1, 2)  # (B, Hkv, m, hs)
        k_hd = apply_rope(k_hd, self.cos[index], self.sin[index])                       # (B, Hkv, m, hs)
        row_chose = self.chosen[:, None, :, index]                                      # (B, 1, R, m)
        logits_hd = rows_logits(q_rows, k_hd).masked_fill(~row_chose, float("-inf"))    # (B, H, R, m)
        lse_hd = logits_hd.logsumexp(-1)                                                # (B, H, R); -inf: none chosen
        probs = torch.where(row_chose, (logits_hd - lse_hd[..., None]).exp(), 0.0)     # (B, H, R, m)
        H, R = q_rows.shape[1], q_rows.shape[2]
        out_hd = (probs.to(v_hd.dtype).view(B, attn.n_kv_heads, H // attn.n_kv_heads, R, m)
                  @ v_hd[:, :, None]).reshape(B, H, R, -1)                              # (B, H, R, hs)
        served = y[:, :, rows]                                                          # (B, H, R, hs)
        merged, _ = hires.merge_attention(served, lse, out_hd, lse_hd)                  # (B, H, R, hs)
        y = y.clone()  # not in place: SDPA saved y for its backward (the toy's training)
        y[:, :, rows] = (1 - self.alpha) * served + self.alpha * merged
        return y


# ---------------------------------------------------------------------------------------------------
# LLaVA: image features replace the image-token embeddings, then the decoder runs as usual.
# ---------------------------------------------------------------------------------------------------

def stitch_tiles(tiles, rows: int, columns: int):
    """(rows * columns, side * side, C) features (or pixels) of tiles in reading order -> (rows side,
    columns side, C): one map of the picture they cut."""
    side, C = math.isqrt(tiles.shape[1]), tiles.shape[2]
    grid = tiles.view(rows, columns, side, side, C)              # (tile row, tile column, y, x, C)
    # Each tile's line y beside its right neighbours' line y: (tile row, y, tile column, x, C).
    return grid.permute(0, 2, 1, 3, 4).reshape(rows * side, columns * side, C)


def crops_in_one_list(pixel_values, sizes: list, n_crops: list[int]) -> torch.Tensor:
    """LLaVA-1.6's crops of every image, one after another, none padding: (sum n_crops, 3, S, S). pixel_values is
    (B, n_crops, 3, S, S), crops past an image's own count padding the batch, or already that list; sizes the
    images' [(h, w)], n_crops each image's count. A UserError where the counts disagree: zip stops at the
    shorter, so a crop or an image too few would drop features without a word."""
    flat = pixel_values.dim() == 4                                         # every image's crops in one list
    if flat:
        crops = pixel_values                                               # (sum n_crops, 3, S, S)
        held = f"{len(crops)} crops in all"
    else:
        # each image's own crops, not those padding the batch: (sum n_crops, 3, S, S)
        crops = torch.cat([image_crops[:n] for image_crops, n in zip(pixel_values, n_crops)])
        held = f"{len(pixel_values)} images of up to {pixel_values.shape[1]} crops"
    if len(crops) != sum(n_crops) or (not flat and len(pixel_values) != len(sizes)):
        raise UserError(f"image_sizes {sizes} make {n_crops} crops (a base crop and the tiles of each canvas), "
                        f"but pixel_values holds {held}: pass the processor's pixel_values for these images")
    return crops


class LlavaForConditionalGeneration(nn.Module):
    def __init__(self, config: LlavaConfig):
        super().__init__()
        self.config = config
        # Hidden state k is the k-th layer's output (0: the pre_layrnorm output), so the deepest feature layer is
        # how many layers to build: with the usual -2 the last CLIP layer never runs, so it is not even built.
        self.vision_tower = CLIPVisionModel(config.vision, n_layers=max(config.feature_layers))
        self.multi_modal_projector = LlavaMultiModalProjector(config)
        self.language_model = LlamaForCausalLM(config.text, None if config.hires is None else config.hires.first_layer)
        if config.is_next:
            # LLaVA-1.6: a learned token that ends every row of the tile map. zeros, as for
            # class_embedding: the checkpoint always holds it.
            self.image_newline = nn.Parameter(torch.zeros(config.text.hidden_size))

    def crop_features(self, crops):  # (N, 3, S, S) -> (N, P, C_text), 1 + P with "full": every crop, one batch
        return self.multi_modal_projector(self.vision_features(crops))

    def vision_features(self, crops):  # (N, 3, S, S) -> (N, P, k C_vision): what the projector reads
        """The tower's tokens at the feature layers (k of them, concatenated), CLS dropped with "default"."""
        size = self.config.vision.image_size
        if crops.shape[-2:] != (size, size):
            raise ValueError(f"pixel_values are {tuple(crops.shape[-2:])}, the vision tower takes {size}x{size}")
        if crops.dim() != 4 or crops.shape[1] != 3:  # one image without its batch, or LLaVA-1.6's crops on a 1.5
            raise ValueError(f"pixel_values are {tuple(crops.shape)}, the vision tower takes (N, 3, {size}, {size}): "
                             "a batch of RGB images, as the processor returns them")
        dtype = self.vision_tower.vision_model.pre_layrnorm.weight.dtype
        states = self.vision_tower.vision_model(crops.to(dtype))  # list of (N, 1 + P, C_vision)
        features = [states[i] for i in self.config.feature_layers]                # k x (N, 1 + P, C_vision)
        if self.config.vision_feature_select_strategy == "default":
            features = [f[:, 1:] for f in features]  # drop CLS: one token per patch
        return torch.cat(features, dim=-1)                                            # (N, P, k C_vision)

    def image_features(self, pixel_values, image_sizes=None) -> list[torch.Tensor]:
        """One (N_img, C_text) tensor per image, in the order its tokens take in the prompt.

        LLaVA-1.5: pixel_values (B, 3, S, S), one crop per image. LLaVA-1.6: (B, n_crops, 3, S, S) with
        image_sizes (B, 2), each image's original (height, width), a tensor or as nested lists (transformers
        takes both): crop 0 is the whole image, crops 1.. the tiles of its canvas in reading order; crops past
        an image's own count pad the batch. Or, as transformers also takes them, (sum of the images' n_crops,
        3, S, S): each image's crops after the one before's, none padding.
        """
        if not self.config.is_next:
            return list(self.crop_features(pixel_values))
        if image_sizes is None or pixel_values.dim() not in (4, 5):  # the map is cut by each image's size
            raise UserError("LLaVA-1.6 takes pixel_values (B, n_crops, 3, S, S), or (sum of the images' crops, 3, S, "
                            "S), with image_sizes (B, 2), as its processor returns them: pass both")
        tile = self.config.vision.image_size
        sizes = torch.as_tensor(image_sizes).tolist()                          # [(h, w)] per image
        if not all(isinstance(hw, list) and len(hw) == 2 for hw in sizes):      # one image's (h, w), unbatched
            raise UserError(f"image_sizes {sizes} must be (B, 2), each image's (height, width), as the processor "
                            "returns them")
        # each image's canvas as (rows, columns) of tiles
        tile_grids = [anyres.tile_grid(hw, self.config.image_grid_pinpoints, tile) for hw in sizes]
        n_crops = [1 + rows * columns for rows, columns in tile_grids]
        per_image = self.crop_features(crops_in_one_list(pixel_values, sizes, n_crops)).split(n_crops)  # (n, P, C)
        return [self.tile_map(features, tile_grid, hw) for features, tile_grid, hw in zip(per_image, tile_grids, sizes)]

    def tile_map(self, features, tile_grid: tuple[int, int], image_hw) -> torch.Tensor:
        """LLaVA-1.6: (1 + rows * columns, P, C) crop features -> (N_img, C): the base crop's P features,
        then the tiles' features as one map of the canvas, padding cut away, a newline after every row.
        tile_grid: the canvas's (rows, columns) of tiles."""
        base, tiles = features[0], features[1:]                          # (P, C), (rows * columns, P, C)
        canvas = stitch_tiles(tiles, *tile_grid)                          # (map rows, map columns, C)
        C = base.shape[1]
        kept_rows, kept_columns = anyres.unpadded_region(image_hw, canvas.shape[:2])
        canvas = canvas[kept_rows, kept_columns]                          # (r, c, C): the image's part
        newline = self.image_newline.to(canvas.dtype).expand(canvas.shape[0], 1, C)  # (r, 1, C)
        with_newlines = torch.cat([canvas, newline], dim=1)               # (r, c + 1, C)
        return torch.cat([base, with_newlines.flatten(0, 1)])             # (P + r (c + 1), C)

    def embed(self, input_ids, pixel_values=None, image_sizes=None):  # (B, T) -> (B, T, C)
        """Token embeddings, with the image positions overwritten (in order) by the image features."""
        x = self.language_model.model.embed_tokens(input_ids)       # (B, T, C)
        if pixel_values is None:
            # Decode steps (and text-only prompts): plain embeddings, even for a generated <image> id.
            return x
        is_image = input_ids == self.config.image_token_id         # (B, T)
        n_image_positions = int(is_image.sum())
        features = torch.cat(self.image_features(pixel_values, image_sizes))  # (all images' N_img, C)
        if n_image_positions != features.shape[0]:  # a prompt and pixels that were not processed together
            raise UserError(f"the prompt has {n_image_positions} image tokens, but its images make "
                            f"{features.shape[0]} features: make the prompt and the pixels with one processor call")
        # masked_scatter fills the image positions in row-major order, sample 0's first: the order of `features`.
        return x.masked_scatter(is_image[..., None], features.to(x.dtype))

    def make_hires_view(self, input_ids, hires_pixel_values, alpha: float = 1.0, first_served: int | None = None,
                        top: int | None = None) -> HiresView:
        """FlexAttention's view of a prompt's image: hires_pixel_values (B, 3, scale size, scale size), cut
        into scale x scale crops of the tower's size (size: vision.image_size), each through the tower and
        projector, stitched into one map of (scale side)^2 features, with RoPE at positions interpolated
        from the low-resolution grid.
        first_served: the first position it serves (default the last of input_ids: the current token); alpha:
        the blend of the hierarchical output (0: the plain model; FlexAttention's training ramps it up); top:
        a fixed number of blocks instead of the threshold's (blocks^2: the whole high-resolution map)."""
        if self.config.hires is None:
            raise UserError("this model has no FlexAttention projections (no hires_config in config.json): "
                            "its hierarchical attention stays off; --hires-threshold draws the selection only")
        h, size = self.config.hires, self.config.vision.image_size
        if top is not None:
            hires.check_block_count(top, h.blocks)  # before the view is built, not in the forward pass
        B = hires_pixel_values.shape[0]
        if hires_pixel_values.shape[1:] != (3, h.scale * size, h.scale * size) or B != input_ids.shape[0]:
            raise ValueError(f"hires_pixel_values are {tuple(hires_pixel_values.shape)}, the high-resolution view "
                             f"takes (B, 3, {h.scale * size}, {h.scale * size}), one image for each of the "
                             f"{input_ids.shape[0]} prompts of input_ids")
        # (B, scale, scale, 3, size, size): the crops in reading order
        crops = hires_pixel_values.view(B, 3, h.scale, size, h.scale, size).permute(0, 2, 4, 1, 3, 5)
        features = self.crop_features(crops.reshape(B * h.scale ** 2, 3, size, size))   # (B scale^2, P, C)
        hires_map = torch.stack([stitch_tiles(tiles, h.scale, h.scale).flatten(0, 1)
                                 for tiles in features.split(h.scale ** 2)])             # (B, N_hd, C)
        # One position for the batch: its prompts must hold their image at the same place.
        is_image = input_ids == self.config.image_token_id                              # (B, T)
        if not is_image.any(1).all():
            raise ValueError("make_hires_view serves a prompt's image: every prompt needs its image tokens")
        starts = is_image.int().argmax(1)                                               # (B,) first image token
        if (starts != starts[0]).any():
            raise ValueError("make_hires_view serves a batch whose prompts hold their image at one position; "
                             f"these start at {starts.tolist()}")
        image_start = int(starts[0])
        lowres_side = self.config.vision.patches_per_side
        positions = hires.hires_positions(image_start, lowres_side, h.scale).to(hires_pixel_values.device)  # (N_hd,)
        cos, sin = rope_cos_sin(positions, self.config.text, features.dtype)   # (N_hd, hs)
        first_served = input_ids.shape[1] - 1 if first_served is None else first_served
        return HiresView(h, hires_map, cos, sin, image_start, lowres_side, first_served, alpha, top)

    def forward(self, input_ids, pixel_values=None, cache=None, last_only=False, attention_mask=None,
                image_sizes=None, hires_view: HiresView | None = None):
        """Logits (B, T, vocab) for input_ids (B, T) that already hold the expanded image tokens ((B, 1,
        vocab) with last_only; fewer than T rows where a policy drops hidden rows, `KVCache.hidden_rows_to_keep`).

        Without a cache this is the plain causal forward over the whole sequence; attention_mask (B, T),
        as in transformers, is 1 where a token may be attended and 0 where no query sees it (padding,
        or the image tokens the toy's training hides). With a cache the tokens continue the cached
        sequence, and the cache's policy decides what attention sees.

        FlexAttention (config.hires): hires_view, the view of the prompt's image (`make_hires_view`, from
        the processor's hires_pixel_values), given with the prompt: the rows it serves also attend to the
        blocks chosen for them. With a cache the view stays for the decode steps.
        """
        if attention_mask is not None and cache is not None:
            raise ValueError("attention_mask is for the cache-free forward; with a cache the policy decides")
        if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"attention_mask is {tuple(attention_mask.shape)}: it must be (B, T), the shape of "
                             f"input_ids, {tuple(input_ids.shape)}")
        visible = None if attention_mask is None else attention_mask.bool()  # (B, T)
        # FlexAttention: the view is made at the prefill and kept by the cache for the decode steps.
        if hires_view is not None and cache is not None:
            cache.hires_view = hires_view
        view = hires_view if cache is None else cache.hires_view
        return self.language_model(self.embed(input_ids, pixel_values, image_sizes), cache, last_only, visible, view)
