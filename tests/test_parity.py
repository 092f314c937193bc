"""tinyavl against transformers: same tiny random checkpoints, same inputs, same logits and greedy tokens.

The oracle is `transformers.LlavaForConditionalGeneration` in fp32 with eager attention, holding the very
weights that were written to the folder tinyavl loads (tests/tiny_checkpoints.py). Inputs come from
tinyavl's own processor (prompt, tokens, pixel_values) and are fed unchanged to both models, so these
tests check the model and loader; tests/test_processing.py checks the processor against transformers.

Covered: MHA / GQA / MQA, "default" and "full" feature selection, feature layer -2, -1 and a list of two,
rope_theta 1e4 / 5e5 / 1e6 (both config spellings), linear RoPE scaling, the activations gelu_new (text) and
relu (vision), image sizes 28 / 42 / 56 with patches 7 / 14, three non-square source images, a text-only
prompt, and a bf16 run.
"""
import copy
import dataclasses

import pytest
import torch

import tinyavl
from tinyavl.errors import UserError
from tinyavl.loading import parse_config
from tinyavl.model import ACTIVATIONS, LlavaConfig, RMSNorm, TextConfig, VisionConfig, rope_cos_sin, rows_logits
from tiny_checkpoints import (VARIANTS, Variant, build_hf_model, hf_config, make_image, reinit_, sparse_config,
                              tokenizer_info, write_checkpoint)

LOGIT_ATOL = 1e-4  # fp32 vs fp32: only summation order differs (seen: 1.4e-5 at most)
GREEDY_STEPS = 8

# Source images (width, height): landscape, portrait, and one smaller than every crop (upscaled).
IMAGE_SIZES = {"landscape": (45, 30), "portrait": (31, 77), "small": (20, 13)}
QUESTION = "What colour is the circle on the left?"
TEXT_ONLY = "The sky is blue and the sun is"


@pytest.fixture(scope="module")
def loaded(tiny_ckpt):
    """variant name -> (tinyavl model, processor, HF model); loaded once per module."""
    cache = {}

    def get(name):
        if name not in cache:
            model, processor = tinyavl.load_pretrained(tiny_ckpt.folder(name), device="cpu")
            cache[name] = (model, processor, tiny_ckpt.model(name))
        return cache[name]

    return get


def inputs_for(processor, variant, case: str):
    """(input_ids [1, T], pixel_values [1, 3, S, S] or None) from tinyavl's processor."""
    if case == "text_only":
        out = processor(TEXT_ONLY)
        assert out["pixel_values"] is None
    else:
        w, h = IMAGE_SIZES[case]
        out = processor(processor.chat_prompt(QUESTION), make_image(w, h, seed=list(IMAGE_SIZES).index(case)))
        assert out["pixel_values"].shape == (1, 3, variant.image_size, variant.image_size)
    ids = out["input_ids"]
    # The image-token count the HF config implies (patches, + CLS for "full"), derived independently here.
    n_image = int((ids == tokenizer_info()["image_token_id"]).sum())
    assert n_image == (0 if case == "text_only" else variant.num_image_tokens)
    return ids, out["pixel_values"]


def hf_greedy(hf_model, ids, pixel_values, steps: int):
    """HF greedy tokens, never stopping early (EOS set to an id that cannot occur), and each step's
    top-1 minus top-2 logit gap (how decisive each greedy choice is)."""
    never = tokenizer_info()["vocab_size"] + 1000
    # (transformers 5.23's generate breaks on an explicit pixel_values=None: pass images only when present)
    images = {} if pixel_values is None else {"pixel_values": pixel_values}
    # A mask of ones, as tinyavl attends every prompt token: without one, generate would infer a mask that hides
    # any token equal to pad_token_id.
    out = hf_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **images, do_sample=False,
                            max_new_tokens=steps, min_new_tokens=0, eos_token_id=never,
                            pad_token_id=tokenizer_info()["pad_token_id"],
                            output_scores=True, return_dict_in_generate=True)
    tokens = out.sequences[0, ids.shape[1]:].tolist()
    gaps = [float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in out.scores]
    return tokens, gaps


def test_every_activation_name_computes_what_transformers_does():
    """config.json names an activation; tinyavl must compute the function transformers' ACT2FN gives it."""
    from transformers.activations import ACT2FN

    x = torch.linspace(-8, 8, 4001)
    for name, act in ACTIVATIONS.items():
        torch.testing.assert_close(act(x), ACT2FN[name](x), rtol=0, atol=1e-6, msg=lambda message: f"{name}: {message}")


CASES = [(name, case) for name in VARIANTS for case in (*IMAGE_SIZES, "text_only")]


@pytest.mark.parametrize("name,case", CASES, ids=[f"{n}-{c}" for n, c in CASES])
def test_logits_and_greedy_match_transformers(loaded, name, case):
    variant = VARIANTS[name]
    model, processor, hf_model = loaded(name)
    ids, pixel_values = inputs_for(processor, variant, case)

    with torch.no_grad():
        ours = model(ids, pixel_values)
        ref = hf_model(input_ids=ids, pixel_values=pixel_values).logits
    assert ours.shape == ref.shape == (1, ids.shape[1], tokenizer_info()["vocab_size"])
    diff = (ours.float() - ref).abs()
    print(f"\n[parity] {name:10s} {case:9s} T={ids.shape[1]:3d} max|dlogit|={diff.max().item():.2e} "
          f"(logit std {ref.std().item():.2f})")
    assert diff.max().item() <= LOGIT_ATOL, (
        f"max |logit diff| {diff.max().item():.3e} at position {int(diff.amax(-1).argmax())} of {ids.shape[1]}")

    ref_tokens, gaps = hf_greedy(hf_model, ids, pixel_values, GREEDY_STEPS)
    # The comparison is only meaningful if every HF greedy choice is clear-cut at fp32 accuracy.
    assert len(ref_tokens) == GREEDY_STEPS and min(gaps) > 1e-3, (ref_tokens, gaps)
    our_tokens, _ = tinyavl.generate(model, ids, pixel_values, max_new_tokens=GREEDY_STEPS, temperature=0.0,
                                     eos_token_id=())
    print(f"[parity] greedy {ref_tokens} min top1-top2 gap {min(gaps):.2f}")
    assert list(our_tokens) == ref_tokens


@pytest.mark.parametrize("name", ["mha", "gqa_full"])
def test_bfloat16_close_to_fp32_transformers(tiny_ckpt, name):
    """bf16 tinyavl vs the fp32 oracle. Tolerance, flash-attention style: at most twice the error that
    transformers itself makes in bf16 (same weights rounded to bf16, same inputs) against its fp32 run.
    bf16 keeps 8 significant bits (relative rounding 2^-9 ~ 2e-3); over a few layers with logits of std ~4
    that is errors of order 1e-2..1e-1, which is why a fixed absolute tolerance would be a guess."""
    variant = VARIANTS[name]
    model, processor = tinyavl.load_pretrained(tiny_ckpt.folder(name), device="cpu", dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    hf32 = tiny_ckpt.model(name)
    hf16 = copy.deepcopy(hf32).to(torch.bfloat16)
    ids, pixel_values = inputs_for(processor, variant, "landscape")  # fp32 pixel_values, as the processor gives

    with torch.no_grad():
        ref = hf32(input_ids=ids, pixel_values=pixel_values).logits
        hf_bf16 = hf16(input_ids=ids, pixel_values=pixel_values.to(torch.bfloat16)).logits.float()
        ours = model(ids, pixel_values)
    assert ours.dtype == torch.float32  # the logits come out in fp32, for sampling, whatever the weights' dtype
    err_ours, err_hf = (ours - ref).abs(), (hf_bf16 - ref).abs()
    print(f"\n[bf16] {name}: tinyavl max {err_ours.max():.3f} mean {err_ours.mean():.4f}; "
          f"transformers-bf16 max {err_hf.max():.3f} mean {err_hf.mean():.4f} (logit std {ref.std():.2f})")
    assert err_ours.max() <= 2 * err_hf.max()
    assert err_ours.mean() <= 2 * err_hf.mean()


def test_batch_of_two_images(loaded):
    """[B=2, T] with two different images: each row must match transformers (the merge fills rows in order)."""
    variant = VARIANTS["gqa_full"]
    model, processor, hf_model = loaded("gqa_full")
    ids_a, px_a = inputs_for(processor, variant, "landscape")
    ids_b, px_b = inputs_for(processor, variant, "portrait")
    assert torch.equal(ids_a, ids_b)  # same prompt, so the rows line up
    ids, pixel_values = torch.cat([ids_a, ids_b]), torch.cat([px_a, px_b])
    with torch.no_grad():
        ours = model(ids, pixel_values)
        ref = hf_model(input_ids=ids, pixel_values=pixel_values).logits
    diff = (ours.float() - ref).abs().max().item()
    print(f"\n[parity] gqa_full batch of 2 max|dlogit|={diff:.2e}")
    assert diff <= LOGIT_ATOL
    assert (ref[0] - ref[1]).abs().max() > 1e-2  # the two images really give different logits


@pytest.mark.parametrize("name", ["mha", "gqa_full"])
def test_attention_mask_matches_transformers(loaded, name):
    """attention_mask (transformers' meaning: 0 = no query sees this token) hides a random half of row
    0's image tokens and two question tokens of row 1; every position's logits match transformers', and
    hiding changes them (the mask is really applied)."""
    variant = VARIANTS[name]
    model, processor, hf_model = loaded(name)
    ids_a, px_a = inputs_for(processor, variant, "landscape")
    ids_b, px_b = inputs_for(processor, variant, "portrait")
    ids, pixel_values = torch.cat([ids_a, ids_b]), torch.cat([px_a, px_b])
    mask = torch.ones_like(ids)
    image_positions = (ids[0] == tokenizer_info()["image_token_id"]).nonzero().flatten()
    generator = torch.Generator().manual_seed(0)
    hidden = image_positions[torch.randperm(len(image_positions), generator=generator)[:len(image_positions) // 2]]
    mask[0, hidden] = 0
    mask[1, -4:-2] = 0  # two question tokens
    with torch.no_grad():
        ours = model(ids, pixel_values, attention_mask=mask)
        ref = hf_model(input_ids=ids, pixel_values=pixel_values, attention_mask=mask).logits
        unmasked = model(ids, pixel_values)
    diff = (ours - ref).abs().max().item()
    print(f"\n[parity] {name} attention_mask max|dlogit|={diff:.2e}")
    assert diff <= LOGIT_ATOL
    assert (ours[:, -1] - unmasked[:, -1]).abs().amax(-1).min() > 1e-3  # both rows' last logits moved


def test_attention_mask_with_a_cache_is_refused(loaded):
    model, processor, _ = loaded("mha")
    ids, pixel_values = inputs_for(processor, VARIANTS["mha"], "landscape")
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, pixel_values, cache=tinyavl.make_cache("full"), attention_mask=torch.ones_like(ids))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("theta,factor", [(1e4, 1.0), (1e6, 1.0), (1e4, 4.0)])
def test_rope_tables_equal_transformers_at_long_positions(dtype, theta, factor):
    """cos and sin at positions 0..8191 (a LLaVA-1.6 prompt passes 2000) are transformers' bit for bit in
    every dtype a model runs in: the angles in fp32, rounded only as cos and sin. (Angles rounded to bf16
    put cos and sin off by up to 2 at position 4095; the tests' prompts of 40 tokens do not show it.)"""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    rope = {"rope_type": "default", "rope_theta": theta}
    if factor != 1.0:
        rope.update(rope_type="linear", factor=factor)
    theirs = LlamaRotaryEmbedding(LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_parameters=rope,
                                              max_position_embeddings=8192))
    positions = torch.arange(8192)
    cos_hf, sin_hf = theirs(torch.zeros(1, 1, dtype=dtype), positions[None])                 # (1, 8192, 128)
    config = TextConfig(hidden_size=4096, num_attention_heads=32, rope_theta=theta, rope_linear_factor=factor)
    cos, sin = rope_cos_sin(positions, config, dtype)                                         # (8192, 128)
    assert torch.equal(cos, cos_hf[0]) and torch.equal(sin, sin_hf[0])


def test_rmsnorm_is_transformers_bit_for_bit_in_bfloat16():
    """RMSNorm in bf16 normalises in fp32, rounds to bf16, then scales by the bf16 weight, as transformers'
    LlamaRMSNorm does (scaling before rounding differs by one bf16 step in a quarter of the values)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    g = torch.Generator().manual_seed(0)
    ours, theirs = RMSNorm(512, 1e-5), LlamaRMSNorm(512, eps=1e-5)
    weight = 1 + 0.3 * torch.randn(512, generator=g)
    x = (3 * torch.randn(64, 512, generator=g)).to(torch.bfloat16)
    with torch.no_grad():
        ours.weight.copy_(weight)
        theirs.weight.copy_(weight)
        assert torch.equal(ours.to(torch.bfloat16)(x), theirs.to(torch.bfloat16)(x))


# Options a config.json may set that no published llava-hf checkpoint does: (text_config, vision_config, top
# level) entries, each read as transformers reads it.
CONFIG_OPTIONS = {"vision layer_norm_eps 0.1": ({}, {"layer_norm_eps": 0.1}, {}),
                  "head_dim 8": ({"head_dim": 8}, {}, {}),
                  "attention_bias": ({"attention_bias": True}, {}, {}),
                  "mlp_bias": ({"mlp_bias": True}, {}, {}),
                  "no projector bias": ({}, {}, {"multimodal_projector_bias": False})}


@pytest.mark.parametrize("option", CONFIG_OPTIONS)
def test_config_options_no_published_checkpoint_sets_match_transformers(option, tmp_path):
    from transformers import LlavaForConditionalGeneration
    text, vision, top = CONFIG_OPTIONS[option]
    variant = VARIANTS["mha"]
    config = hf_config(variant)
    for section, values in ((config.text_config, text), (config.vision_config, vision), (config, top)):
        for key, value in values.items():
            setattr(section, key, value)
    hf_model = LlavaForConditionalGeneration(config)
    hf_model.set_attn_implementation("eager")
    reinit_(hf_model, variant.seed)
    hf_model.eval()
    raw = sparse_config(variant)
    raw["text_config"].update(text)
    raw["vision_config"].update(vision)
    raw.update(top)
    model, processor = tinyavl.load_pretrained(write_checkpoint(hf_model, str(tmp_path), config=raw), device="cpu")
    inputs = processor(processor.chat_prompt("What is it?"), make_image(45, 30, seed=0))
    with torch.no_grad():
        ours = model(inputs["input_ids"], inputs["pixel_values"])
        theirs = hf_model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"]).logits
    assert (ours - theirs).abs().max() <= LOGIT_ATOL


def test_a_two_token_prompt_is_causal_as_in_transformers(tiny_ckpt):
    model, _ = tinyavl.load_pretrained(tiny_ckpt.folder("mha"), device="cpu")
    ids = torch.tensor([[tokenizer_info()["bos_token_id"], 17]])
    with torch.no_grad():
        logits, theirs = model(ids), tiny_ckpt.model("mha")(input_ids=ids).logits
    assert (logits - theirs).abs().max() <= 1e-4


def test_the_first_hidden_state_is_the_pre_layernorms_output_as_in_transformers(tmp_path):
    """vision_feature_layer -3 of 2 vision layers: the hidden state before any layer, after pre_layrnorm.
    (transformers 5.23 fails on the same state asked as 0: it reads the 0 as "no layers".)"""
    variant = Variant("first_state", image_size=28, patch_size=14, vision_layers=2, text_layers=1, kv_heads=2,
                      feature_layer=-3, seed=7)
    hf = build_hf_model(variant)
    model, processor = tinyavl.load_pretrained(write_checkpoint(hf, str(tmp_path), variant=variant), device="cpu")
    inputs = processor(processor.chat_prompt("What is it?"), make_image(45, 30, seed=0))
    with torch.no_grad():
        logits = model(inputs["input_ids"], inputs["pixel_values"])
        theirs = hf(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"]).logits
    assert (logits - theirs).abs().max() <= 1e-4


def test_config_defaults_are_transformers_class_defaults():
    """A sparse config.json takes tinyavl's defaults where transformers takes its classes': the same."""
    from transformers import CLIPVisionConfig, LlamaConfig
    from transformers import LlavaConfig as TransformersLlavaConfig

    text, theirs = TextConfig(), LlamaConfig()
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
                 "attention_bias", "mlp_bias", "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert getattr(text, name) == getattr(theirs, name), name
    assert text.rope_theta == theirs.rope_parameters["rope_theta"]
    vision, theirs = VisionConfig(), CLIPVisionConfig()
    for name in (field.name for field in dataclasses.fields(VisionConfig)):
        assert getattr(vision, name) == getattr(theirs, name), name
    llava, theirs = LlavaConfig(), TransformersLlavaConfig()
    assert llava.image_token_id == theirs.image_token_index
    for name in ("projector_hidden_act", "multimodal_projector_bias", "vision_feature_layer",
                 "vision_feature_select_strategy"):
        assert getattr(llava, name) == getattr(theirs, name), name


def test_config_values_at_the_edges_of_what_transformers_takes():
    """One patch per image is a tower (CLIPVisionConfig takes it); a null bos id and image token id 0 are
    taken; a bool as a count, a string as a flag and an eos or bos id past the vocabulary are refused."""
    VisionConfig(image_size=14, patch_size=14)
    raw = sparse_config(VARIANTS["mha"])
    vocab = raw["text_config"]["vocab_size"]
    for field, value in (("num_hidden_layers", True), ("mlp_bias", "false"), ("eos_token_id", vocab),
                         ("bos_token_id", vocab)):
        bad = copy.deepcopy(raw)
        bad["text_config"][field] = value
        with pytest.raises(UserError, match=f"{field} is {value!r}"):
            parse_config(bad)
    taken = copy.deepcopy(raw)
    taken["text_config"]["bos_token_id"] = None
    taken["image_token_index"] = 0
    config = parse_config(taken)
    assert config.text.bos_token_id is None and config.image_token_id == 0
    with pytest.raises(UserError, match="rope_linear_factor"):
        TextConfig(rope_linear_factor=0.0)
    with pytest.raises(UserError, match="tie_word_embeddings"):
        TextConfig(tie_word_embeddings="false")


def test_a_tied_model_shares_its_head_with_the_embedding_from_construction():
    """As transformers' LlamaForCausalLM ties them when built, before any weight is loaded."""
    text = TextConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    vision = VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                          image_size=16, patch_size=4)
    model = tinyavl.LlavaForConditionalGeneration(LlavaConfig(text=text, vision=vision, image_token_id=39))
    assert model.language_model.lm_head.weight is model.language_model.model.embed_tokens.weight


def test_bf16_logits_are_scaled_once_in_fp32():
    """Small integers make the bf16 product exact; the scale 8^-0.5 is no power of two, so scaling in bf16
    and converting would round a second time. The logits are the exact products times 8^-0.5 in fp32."""
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-4, 5, (1, 2, 3, 8), generator=g).to(torch.bfloat16)              # (B, H, rows, hs)
    k = torch.randint(-4, 5, (1, 1, 40, 8), generator=g).to(torch.bfloat16)             # (B, Hkv, n, hs)
    exact = (q.double() @ k.double().transpose(-1, -2)) * 8 ** -0.5                     # (B, H, rows, n)
    torch.testing.assert_close(rows_logits(q, k).double(), exact, rtol=1e-7, atol=0)
