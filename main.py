"""Ask a LLaVA model about an image, with the KV policy of your choice.

    python main.py --image weights/toy/examples/scene-0.png                      # the toy LLaVA, a caption
    python main.py --image weights/toy/examples/scene-0.png --prompt "What colour is the square?" --policy avl
    python main.py --image photo.jpg --weights weights/llava-1.5-7b-hf --policy avl --S 0.5 --C 0.3
    python main.py --image photo.jpg --weights weights/llava-1.5-7b-hf --json --attention-map map.png

The answer is streamed to stdout; a short summary (timings, KV memory) goes to stderr. With --json a
single JSON object is printed instead. A mistake in the input exits with status 2 and a one-line error.
"""
import re
import sys

import tinyavl  # first: in a command, a Ctrl-C while its imports run is one line (tinyavl/startup.py)
from tinyavl import hires
from tinyavl.attention_map import map_layer, save_attention_map
from tinyavl.cli import (TOY_WEIGHTS, ArgumentParser, add_policy_arguments, check_filter_layer, check_stdout_open,
                         first_paragraph, flag, given_path, output_file, policy_cache, run_command)
from tinyavl.files import check_output_file
from tinyavl.generate import GENERATION_PARAMS, check_generation_args, prompt_layout
from tinyavl.processing import check_question, load_image

DEFAULT_WEIGHTS = TOY_WEIGHTS  # --weights when not given
BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")  # a byte-fallback token of a Llama tokenizer (tokenizers' ByteFallback)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=first_paragraph(__doc__))
    parser.add_argument("--image", type=given_path, required=True, help="image file (jpg, png, ...)")
    parser.add_argument("--prompt", default="Describe the image.", help="the question about the image")
    parser.add_argument("--weights", type=given_path, default=None,
                        help="llava-hf model folder (default: the toy LLaVA in weights/toy)")
    for param in GENERATION_PARAMS:  # --max-new-tokens, --temperature, --top-k, --top-p
        parser.add_argument(flag(param.name), type=type(param.default), default=param.default,
                            help=f"{param.help}; {param.allowed()}")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if present")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="default: the checkpoint's (fp16 runs as bf16 on a CPU)")
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling (default: a fresh draw each run)")
    add_policy_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    parser.add_argument("--attention-map", type=output_file, default=None, metavar="OUT.png",
                        help="draw which image tokens the policy kept, and where the model looked")
    parser.add_argument("--force", action="store_true", help="replace the --attention-map file if it exists")
    parser.add_argument("--map-layer", type=int, default=None,
                        help="decoder layer to draw with --attention-map (default: the last)")
    parser.add_argument("--hires-threshold", type=float, default=None, metavar="THRESHOLD",
                        help="with --attention-map, also frame the blocks FlexAttention's selection takes from that "
                        "layer's attention: normalised attention x 255 above THRESHOLD, from 0 to below 255 (its "
                        f"paper's code: {hires.THRESHOLD}); the model's hires_config blocks a side ({hires.BLOCKS} "
                        "without one)")
    return parser


def check_args(args):
    """(image, cache): everything the user gave that can be checked without the model's files; `run` checks
    the rest (--filter-layer's upper bound, --map-layer, the prompt's length, the image's size for the
    model's crops) with its small files, before the weights load (seconds to minutes for a 7B model). Fills in
    --weights' default."""
    check_stdout_open("answer", {"--attention-map": args.attention_map})
    image = load_image(args.image)
    check_question(args.prompt)
    check_generation_args(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed, named=flag)
    if args.temperature == 0:
        check_greedy_has_no_sampling_flags(args)
    cache = policy_cache(args)
    if args.weights is None:
        if not DEFAULT_WEIGHTS.is_dir():
            raise tinyavl.UserError(f"no model in {DEFAULT_WEIGHTS}: restore the committed toy model (git checkout "
                                    "weights/toy), retrain it (python -m tinyavl.toy.train), or pass --weights with "
                                    "a llava-hf folder (see weights/README.md)")
        args.weights = DEFAULT_WEIGHTS
    if args.attention_map is not None:
        check_output_file(args.attention_map, "--attention-map", inputs=[args.image, args.weights],
                          replace=args.force)
    else:
        for option, given in (("--map-layer", args.map_layer is not None),
                              ("--hires-threshold", args.hires_threshold is not None), ("--force", args.force)):
            if given:
                raise tinyavl.UserError(f"{option} is an option of --attention-map: give --attention-map OUT.png too")
    if args.hires_threshold is not None:
        hires.check_threshold(args.hires_threshold, "--hires-threshold")
    return image, cache


def check_greedy_has_no_sampling_flags(args) -> None:
    """A greedy answer (--temperature 0, the default) draws nothing, so a sampling setting given with it
    would be ignored: refused instead, as an --attention-map option without --attention-map is. A setting
    given at its default value changes nothing either way and passes."""
    defaults = {param.name: param.default for param in GENERATION_PARAMS}
    ignored = [flag(name) for name in ("top_k", "top_p") if getattr(args, name) != defaults[name]]
    if args.seed is not None:
        ignored.append("--seed")
    if ignored:
        raise tinyavl.UserError(f"{' and '.join(ignored)} {'shapes' if len(ignored) == 1 else 'shape'} sampling, and "
                                "--temperature 0 (the default) answers greedily: give --temperature above 0 too")


class AnswerPrinter:
    """Prints the answer on stdout as it is generated. A reader that closes stdout early (`| head`) ends the
    printing, not the run: an --attention-map is still written."""

    def __init__(self, processor):
        self.processor = processor
        self.ids, self.printed, self.reader_gone = [], "", False

    def say(self, text: str, end: str = "") -> None:
        if not self.reader_gone:
            try:
                print(text, end=end, flush=True)
            except BrokenPipeError:
                self.reader_gone = True

    def stream(self, token_id: int) -> None:
        # Decode everything so far and print what is new, once it can no longer change: the text must not end
        # in U+FFFD (a byte-level tokenizer's character split across tokens, its first bytes alone), and the
        # newest token must be a word, not a byte token (<0x..>: a Llama tokenizer's byte fallback joins the
        # byte tokens beside it into one character, or into U+FFFD each where together they are no UTF-8, so
        # the text of a run of them, a skipped <pad> inside it too, may change until a word ends the run).
        self.ids.append(token_id)
        if BYTE_TOKEN.fullmatch(self.processor.tokenizer.id_to_token(token_id) or "") or \
                not self.processor.decode([token_id]):
            return
        text = self.processor.decode(self.ids)
        if not text.endswith("\ufffd"):
            self.say(text[len(self.printed):])
            self.printed = text

    def finish(self, text: str) -> None:
        """The rest of the whole answer's text, and the end of the line."""
        self.say(text[len(self.printed):], end="\n")


def run(args) -> dict:
    toy_by_default = args.weights is None
    image, cache = check_args(args)
    config, processor = tinyavl.load_processor(args.weights)
    if args.attention_map is not None:
        layer = map_layer(config, args.map_layer)
    inputs = processor(processor.chat_prompt(args.prompt), image=image)
    prompt_layout(inputs["input_ids"], inputs["pixel_values"], config)  # a prompt past the context
    filter_note = check_filter_layer(args, config, cache)
    model = tinyavl.load_model(args.weights, device=args.device, dtype=args.dtype, config=config)
    # The notes once the model has loaded: a mistake is one line, the error, with no note before it.
    if filter_note:
        print(filter_note, file=sys.stderr)
    if toy_by_default:
        print(f"no --weights given: running the toy LLaVA in {DEFAULT_WEIGHTS} (synthetic scenes only)",
              file=sys.stderr)
    if args.hires_threshold is not None and config.hires is None:
        print("this model has no FlexAttention projections (no hires_config): it does not read the blocks; "
              "the map shows where it would", file=sys.stderr)
    printer = None if args.json else AnswerPrinter(processor)
    token_ids, stats = tinyavl.generate(model, **inputs,
                                        max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                        top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                                        stream=None if printer is None else printer.stream, policy=cache)
    text = processor.decode(token_ids)
    if printer is not None:
        printer.finish(text)
    if args.attention_map is not None:
        save_attention_map(args.attention_map, model, processor, inputs, cache, layer, question=args.prompt,
                           hires_threshold=args.hires_threshold, replace=args.force)
        print(f"wrote the attention map to {args.attention_map}", file=sys.stderr)
    return {
        "text": text, "token_ids": token_ids, "finish_reason": stats.finish_reason,
        "policy": stats.policy, "policy_params": stats.policy_params,
        "prompt_tokens": stats.prompt_tokens, "new_tokens": stats.new_tokens,
        "prefill_seconds": stats.prefill_seconds, "decode_tokens_per_second": stats.decode_tokens_per_second,
        "kv_cache_bytes_peak": stats.kv_cache_bytes_peak,
        "kv_cache_bytes_after_prefill": stats.kv_cache_bytes_after_prefill,
        "kv_cache_bytes_dense": stats.kv_cache_bytes_dense,
        "kv_cache_bytes_peak_by_modality": stats.modality_bytes_peak,
        "attended_tokens_per_step": stats.attended_tokens_per_step,
        "attended_tokens_per_step_dense": stats.attended_tokens_per_step_dense,
    }


FINISH = {"eos": "the model ended its answer", "length": "stopped at --max-new-tokens: the answer may be cut",
          "context": "stopped at the end of the model's context: the answer may be cut"}


def summary(result: dict) -> str:
    mib = 2 ** 20
    n = result["new_tokens"]
    lines = [f"{n} token{'' if n == 1 else 's'}: {FINISH[result['finish_reason']]}",
             f"policy {result['policy']} {result['policy_params'] or ''}".rstrip(),
             f"prompt {result['prompt_tokens']} tokens, prefill {result['prefill_seconds']:.2f} s"]
    if result["decode_tokens_per_second"] is not None:
        lines.append(f"decode {result['decode_tokens_per_second']:.1f} tokens/s, attended "
                     f"{result['attended_tokens_per_step']:.0f} of {result['attended_tokens_per_step_dense']:.0f} "
                     "token-layers per step")
    lines.append(f"KV cache peak {result['kv_cache_bytes_peak'] / mib:.2f} MiB "
                 f"({result['kv_cache_bytes_peak'] / result['kv_cache_bytes_dense']:.0%} of dense "
                 f"{result['kv_cache_bytes_dense'] / mib:.2f} MiB)")
    return "\n".join(lines)


def main(argv=None) -> int:
    return run_command(run, build_parser().parse_args(argv),
                       show=lambda result: print(summary(result), file=sys.stderr))


if __name__ == "__main__":
    sys.exit(main())
