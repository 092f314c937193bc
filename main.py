"""Ask a LLaVA model about an image, with the KV policy of your choice.

    python main.py --image photo.jpg --prompt "What is in the picture?"
    python main.py --image photo.jpg --weights weights/llava-1.5-7b-hf --policy avl --S 0.5 --C 0.3
    python main.py --image photo.jpg --json

The answer is streamed to stdout; a short summary (timings, KV memory) goes to stderr. With --json a
single JSON object is printed instead. A mistake in the input exits with status 2 and a one-line error.
"""
import argparse
import json
import sys
from pathlib import Path

DEFAULT_WEIGHTS = Path(__file__).parent / "weights" / "toy"
# Policy parameters, named as in the papers; each policy takes its own subset (tinyavl/cache.py).
POLICY_OPTIONS = {
    "S": (float, "avl: fraction of image tokens stored (secondary)"),
    "C": (float, "avl: fraction of image tokens computed (core)"),
    "K": (int, "avl: core update interval in steps; fastv: layer after which image tokens are dropped"),
    "P": (float, "avl: fraction of image tokens the prefill filter keeps (1 = no filter)"),
    "filter_layer": (int, "avl: first layer that runs on the filtered sequence"),
    "T": (float, "avl: fraction of text tokens kept"),
    "R": (float, "fastv: fraction of image tokens dropped"),
    "heavy": (float, "h2o: heavy-hitter fraction of the sequence"),
    "recent": (float, "h2o, streaming: recent-window fraction of the sequence"),
    "sinks": (int, "streaming: attention-sink tokens kept at the start"),
    "kernel": (str, "avl: 'auto' (Triton on CUDA), 'triton' or 'torch' for the sparse decode attention"),
}


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        # One line like every other user mistake (argparse would print the whole usage first).
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def parse_args(argv):
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image", required=True, help="image file (jpg, png, ...)")
    parser.add_argument("--prompt", default="Describe the image.", help="the question about the image")
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS, help="llava-hf model folder")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if present")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="default: the checkpoint's (fp16 runs as bf16 on a CPU)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling")
    parser.add_argument("--policy", default="full", help="KV policy: full, avl, h2o, streaming, fastv")
    for name, (kind, help_text) in POLICY_OPTIONS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, default=None, help=help_text)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    return parser.parse_args(argv)


def run(args) -> dict:
    import tinyavl

    if args.weights == DEFAULT_WEIGHTS and not args.weights.is_dir():
        raise tinyavl.UserError(f"no model in {args.weights}: put a llava-hf model folder in weights/ "
                                "(see weights/README.md) and pass --weights weights/<folder>")
    model, processor = tinyavl.load_pretrained(args.weights, device=args.device, dtype=args.dtype)
    inputs = processor(processor.chat_prompt(args.prompt), image=args.image)
    policy_params = {name: getattr(args, name) for name in POLICY_OPTIONS if getattr(args, name) is not None}
    cache = tinyavl.make_cache(args.policy, **policy_params)
    printed = ""
    ids = []

    def stream(token_id):
        # Decode everything so far and print what is new: a token can complete a multi-byte character.
        nonlocal printed
        ids.append(token_id)
        text = processor.decode(ids)
        if not text.endswith("\ufffd"):
            print(text[len(printed):], end="", flush=True)
            printed = text

    token_ids, stats = tinyavl.generate(model, inputs["input_ids"], inputs["pixel_values"],
                                        max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                        top_p=args.top_p, seed=args.seed, eos_token_id=processor.eos_token_id,
                                        stream=None if args.json else stream, policy=cache)
    text = processor.decode(token_ids)
    if not args.json:
        print(text[len(printed):])
    return {
        "text": text, "token_ids": token_ids, "policy": stats.policy, "policy_params": stats.policy_params,
        "prompt_tokens": stats.prompt_tokens, "new_tokens": stats.new_tokens,
        "prefill_seconds": stats.prefill_seconds, "decode_tokens_per_second": stats.decode_tokens_per_second,
        "kv_cache_bytes": stats.kv_cache_bytes, "kv_cache_bytes_after_prefill": stats.kv_cache_bytes_after_prefill,
        "kv_cache_bytes_dense": stats.kv_cache_bytes_dense,
        "kv_cache_bytes_by_modality": stats.modality_bytes_peak,
        "attended_tokens_per_step": stats.attended_tokens_per_step,
        "attended_tokens_per_step_dense": stats.attended_tokens_per_step_dense,
    }


def summary(result: dict) -> str:
    mib = 2 ** 20
    lines = [f"policy {result['policy']} {result['policy_params'] or ''}".rstrip(),
             f"prompt {result['prompt_tokens']} tokens, prefill {result['prefill_seconds']:.2f} s"]
    if result["decode_tokens_per_second"] is not None:
        lines.append(f"decode {result['decode_tokens_per_second']:.1f} tokens/s, attended "
                     f"{result['attended_tokens_per_step']:.0f} of {result['attended_tokens_per_step_dense']:.0f} "
                     "token-layers per step")
    lines.append(f"KV cache peak {result['kv_cache_bytes'] / mib:.2f} MiB "
                 f"({result['kv_cache_bytes'] / result['kv_cache_bytes_dense']:.0%} of dense "
                 f"{result['kv_cache_bytes_dense'] / mib:.2f} MiB)")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    from tinyavl.errors import UserError

    try:
        result = run(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        print(summary(result), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
