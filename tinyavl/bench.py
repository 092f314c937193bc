"""Every KV policy side by side on a random model with LLaVA-1.5-7B layer shapes.

    python -m tinyavl.bench                       # 4 decoder layers, image blocks of 576 and 2928 tokens
    python -m tinyavl.bench --layers 8 --new-tokens 64 --image-tokens 576

The decoder layers have the real shapes (hidden 4096, 32 heads x 128, MLP 11008, vocab 32064); only
their number is cut so that the model fits a small machine. 4 is the fewest at which every default
applies (both filters drop after layer filter_layer - 1: FastV's 1, A-VL's prefill filter's 2). The image
block is random features of the given length standing in for CLIP's output: LLaVA-1.5 has 576, a
LLaVA-1.6 672x672 image 2928. The policies act on the decoder, which is what is measured.

For each policy, in one run on the same prompt: KV bytes held (peak, relative to `full`), rows attended
per decode step (summed over layers), prefill time, and decode step time relative to `full`. With
transformers installed, its LLaVA runs the same weights and prompt (the first image block) with full
attention, and tinyavl's decode speed is printed relative to it. Absolute times on a shared CPU are noise; ratios are the result.
"""
import argparse
import platform
import time

import torch

from tinyavl.generate import generate
from tinyavl.model import LlavaConfig, LlavaForConditionalGeneration, TextConfig, VisionConfig

POLICIES = [("full", {}), ("avl", {}), ("h2o", {}), ("streaming", {}), ("fastv", {})]
N_SYS, N_TEXT = 5, 40  # "<s> USER: " and a question plus "ASSISTANT:" of typical length


def llava_7b_config(n_layers: int) -> LlavaConfig:
    text = TextConfig(vocab_size=32064, num_hidden_layers=n_layers, max_position_embeddings=4096, rms_norm_eps=1e-5)
    # A token vision tower: the benchmark feeds the image block directly (see `image_block`).
    vision = VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          image_size=28, patch_size=14)
    return LlavaConfig(text=text, vision=vision)


def random_model(config: LlavaConfig, dtype, seed: int = 0) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)  # PyTorch's default init: random but well scaled
    return model.to(dtype).eval().requires_grad_(False)


def image_block(model, n_img: int, seed: int = 1):
    """Make the model's image features a fixed random block of n_img rows (any length, unlike a ViT)."""
    generator = torch.Generator().manual_seed(seed)
    width, dtype = model.config.text.hidden_size, model.language_model.lm_head.weight.dtype
    features = torch.randn(1, n_img, width, generator=generator).to(dtype)   # (1, N_img, C)
    model.image_features = lambda pixel_values: features
    return torch.zeros(1, 3, 28, 28)  # placeholder pixel_values: the patched method ignores them


def prompt_ids(config: LlavaConfig, n_img: int, seed: int = 2):
    generator = torch.Generator().manual_seed(seed)
    sys_ids = torch.randint(3, 32000, (N_SYS - 1,), generator=generator)
    text_ids = torch.randint(3, 32000, (N_TEXT,), generator=generator)
    image_ids = torch.full((n_img,), config.image_token_id)
    return torch.cat([torch.tensor([1]), sys_ids, image_ids, text_ids])[None]  # (1, T)


def transformers_decode_rate(model, input_ids, pixel_values, new_tokens: int, expected_tokens: list[int]):
    """Decode tokens/s of transformers' LLaVA (sdpa attention, DynamicCache) on the same weights and
    the same merged embeddings; None when transformers is not installed."""
    try:
        import transformers
    except ImportError:
        return None
    text, vision = model.config.text, model.config.vision
    hf_config = transformers.LlavaConfig(
        text_config=dict(model_type="llama", vocab_size=text.vocab_size, hidden_size=text.hidden_size,
                         intermediate_size=text.intermediate_size, num_hidden_layers=text.num_hidden_layers,
                         num_attention_heads=text.num_attention_heads, rms_norm_eps=text.rms_norm_eps,
                         max_position_embeddings=text.max_position_embeddings),
        vision_config=dict(hidden_size=vision.hidden_size, intermediate_size=vision.intermediate_size,
                           num_hidden_layers=vision.num_hidden_layers, num_attention_heads=vision.num_attention_heads,
                           image_size=vision.image_size, patch_size=vision.patch_size),
        image_token_index=model.config.image_token_id)
    hf = transformers.LlavaForConditionalGeneration(hf_config).to(model.language_model.lm_head.weight.dtype)
    # Published key names -> transformers' in-memory names (the decoder is all that runs here).
    state = {key.replace("language_model.model.", "model.language_model.").replace("language_model.lm_head.", "lm_head."): t
             for key, t in model.language_model.state_dict(prefix="language_model.").items()}
    hf.load_state_dict(state, strict=False)
    hf.config._attn_implementation = "sdpa"
    hf.eval()
    with torch.inference_mode():
        embeds = model.embed(input_ids, pixel_values)                      # (1, T, C), image block merged
        out = hf(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)
        tokens = [int(out.logits[0, -1].argmax())]
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            out = hf(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
            tokens.append(int(out.logits[0, -1].argmax()))
        seconds = time.perf_counter() - start
    if tokens != expected_tokens:
        print(f"  note: transformers' greedy tokens differ from tinyavl's full attention ({tokens[:8]}...)")
    return (new_tokens - 1) / seconds


def run_case(model, n_img: int, new_tokens: int, compare_transformers: bool):
    pixel_values = image_block(model, n_img)
    input_ids = prompt_ids(model.config, n_img)
    print(f"\nimage block {n_img} tokens, prompt {input_ids.shape[1]} tokens, {new_tokens} new tokens")
    results = {}
    for name, params in POLICIES:
        # eos_token_id=(): every policy decodes the same number of steps, whatever the tokens
        tokens, stats = generate(model, input_ids, pixel_values, max_new_tokens=new_tokens, eos_token_id=(),
                                 policy=name, **params)
        results[name] = (tokens, stats)
    full = results["full"][1]
    full_step = full.decode_seconds / (full.new_tokens - 1)
    header = (f"{'policy':10s} {'KV peak':>10s} {'vs full':>8s} {'attended/step':>14s} {'vs full':>8s} "
              f"{'prefill s':>10s} {'decode ms/step':>15s} {'vs full':>8s}  same tokens as full")
    print(header)
    print("-" * len(header))
    for name, (tokens, stats) in results.items():
        step = stats.decode_seconds / (stats.new_tokens - 1)
        same = sum(a == b for a, b in zip(tokens, results["full"][0]))
        print(f"{name:10s} {stats.kv_cache_bytes / 2**20:8.1f}Mi {stats.kv_cache_bytes / full.kv_cache_bytes:8.2f} "
              f"{stats.attended_tokens_per_step:14.0f} {stats.attended_tokens_per_step / full.attended_tokens_per_step:8.2f} "
              f"{stats.prefill_seconds:10.2f} {step * 1e3:15.1f} {step / full_step:8.2f}  {same}/{len(tokens)}")
    if compare_transformers:
        rate = transformers_decode_rate(model, input_ids, pixel_values, new_tokens, results["full"][0])
        if rate is None:
            print("transformers is not installed: no comparison")
        else:
            print(f"tinyavl full decode {full.decode_tokens_per_second:.2f} tok/s, transformers {rate:.2f} tok/s: "
                  f"ratio {full.decode_tokens_per_second / rate:.2f}")
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description="Every KV policy side by side at LLaVA-1.5-7B layer shapes.")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (real 7B shapes each)")
    parser.add_argument("--image-tokens", type=int, nargs="+", default=[576, 2928])
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--no-transformers", action="store_true", help="skip the transformers comparison")
    args = parser.parse_args(argv)

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or platform.machine()
    print(f"tinyavl bench: {args.layers} decoder layers of LLaVA-1.5-7B shape, {args.dtype}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {device}")
    print("policies at their defaults: " + ", ".join(name for name, _ in POLICIES))
    model = random_model(llava_7b_config(args.layers), getattr(torch, args.dtype))
    for i, n_img in enumerate(args.image_tokens):
        # transformers runs on the first case only: its prefill of a long block adds minutes, not insight.
        run_case(model, n_img, args.new_tokens, compare_transformers=i == 0 and not args.no_transformers)


if __name__ == "__main__":
    main()
