"""FlexAttention on the toy: what the high-resolution view is worth on fine details, and what it costs.

    python -m tinyavl.toy.evaluate_hires --in-sequence-toy weights/toy-tiles --plot tutorial/figures/hires.png --force

The FlexAttention toy (weights/toy-hires, trained by tinyavl/toy/train_hires.py) answers every prompt of
the held-out fine scenes of a seed (tinyavl/toy/scenes.py: the digits are 9 x 15 px in a 384 px image, a
blur at the 96 px the sequence sees), reading of the high-resolution view (`HIRES_MODES`):
- nothing ("low-res": the 96 px view alone, the model without its view),
- the blocks its selection chooses ("selection": FlexAttention as trained),
- every block ("every block": the current token reads all 2304 high-resolution tokens),
each with the dense cache and with A-VL's modality-split cache on the low-resolution sequence (where a
decode step's selection reads the attention A-VL computed: its core image tokens).

Cost is counted by the accounting formula: an answer's attention computes some (query, key) pairs
(`evaluate.attention_pairs`: the prefill's causal rows, every decode step's rows, the high-resolution
keys), each 4 x n_heads x head_dim FLOPs. Beside them, the cost of "all high-resolution tokens in the
sequence" for the same prompts and answer lengths (`in_sequence_pairs`): the toy as LLaVA-1.6 tiles the
384 px image, whose 2496 image tokens are the base crop's 144, the 48 x 48 map and a newline closing each
of its rows (`train_hires.with_tiles_in_sequence`, trained by `train_hires --in-sequence`: the committed
weights/toy-tiles). Given that toy (`--in-sequence-toy FOLDER`, as in the command above, which draws the
table and figure of tutorial/07), its answers are measured like the others' and its rows join the table;
without it, that row has the cost alone.
"""
import sys
from pathlib import Path

from tinyavl import anyres, load_pretrained
from tinyavl.cli import (HIRES_TOY_WEIGHTS, ArgumentParser, check_model_folder, check_stdout_open, first_paragraph,
                         given_path, output_file, run_command)
from tinyavl.errors import UserError
from tinyavl.files import check_output_file
from tinyavl.toy.evaluate import HIRES_MODES, evaluate, format_interval, held_out_set, markdown_table
from tinyavl.toy.plot import save_line_plot
from tinyavl.toy.scenes import PROMPT_KINDS
from tinyavl.toy.train_hires import FINE_CANVAS

POLICIES = ("full", "avl")   # the dense cache, and A-VL at its defaults
FINE_KIND = "digit"          # the question type that asks for a fine detail
IN_SEQUENCE = "all high-res tokens in the sequence"  # the mode of a toy trained by train_hires --in-sequence


def in_sequence_pairs(prompt_tokens: int, n_img: int, n_tiled: int, decode_steps: int, n_layers: int) -> int:
    """The attention pairs of the same answer by a model whose prompt holds the n_tiled image tokens of
    the image tiled in the sequence in place of the n_img low-resolution ones: a causal prefill over the
    longer prompt in every layer, then each decode step's query over everything before it."""
    n = prompt_tokens - n_img + n_tiled
    return n_layers * (n * (n + 1) // 2 + sum(n + step + 1 for step in range(decode_steps)))


def attention_mflops(pairs: float, model) -> float:
    """The accounting formula: 4 x n_heads x head_dim FLOPs per (query, key) pair, in MFLOPs."""
    text = model.config.text
    return pairs * 4 * text.num_attention_heads * text.head_dim / 1e6


def compare(model, processor, questions, log=None) -> list[dict]:
    """One report (tinyavl.toy.evaluate's) per policy and mode, each with "mode", "attention_mflops" (an
    answer's, from its attention_pairs) and "in_sequence_mflops" (the same for `in_sequence_pairs`, the
    mean over the same prompts and answer lengths)."""
    text, vision = model.config.text, model.config.vision
    n_tiled = anyres.image_token_count(FINE_CANVAS, [FINE_CANVAS], vision.image_size, vision.patch_size)
    reports = []
    for policy in POLICIES:
        for mode in HIRES_MODES:
            pairs_in_sequence = []  # per answer: the pairs the in-sequence toy would compute for it

            def on_answer(question, prediction, cache, inputs):
                prompt_tokens = inputs["input_ids"].shape[1]
                decode_steps = cache.next_pos - prompt_tokens  # next_pos: prompt + decode steps
                pairs_in_sequence.append(in_sequence_pairs(prompt_tokens, cache.n_img, n_tiled, decode_steps,
                                                           text.num_hidden_layers))

            report = evaluate(model, processor, questions, policy, on_answer=on_answer, hires_mode=mode)
            report.update(mode=mode, attention_mflops=attention_mflops(report["attention_pairs"], model),
                          in_sequence_mflops=attention_mflops(sum(pairs_in_sequence) / len(pairs_in_sequence), model))
            reports.append(report)
            log_report(log, report)
    return reports


def log_report(log, report: dict) -> None:
    """One line of progress for a report of `compare` or `compare_in_sequence` (nothing without log)."""
    if log:
        log(f"{report['policy']} {report['mode']}: {FINE_KIND} {report['accuracy_by_type'][FINE_KIND]:.3f}, all "
            f"{report['accuracy']:.3f}, {report['attention_mflops']:.1f} attention MFLOPs an answer "
            f"({report['seconds']:.0f} s)")


def compare_in_sequence(model, processor, questions, log=None) -> list[dict]:
    """One report per policy for a toy with every high-resolution token in the sequence (train_hires
    --in-sequence), its "mode" IN_SEQUENCE and its "attention_mflops" counted as the others' are."""
    reports = []
    for policy in POLICIES:
        report = evaluate(model, processor, questions, policy)
        report.update(mode=IN_SEQUENCE, attention_mflops=attention_mflops(report["attention_pairs"], model))
        reports.append(report)
        log_report(log, report)
    return reports


def format_table(reports: list[dict], in_sequence_reports: list[dict] | None = None) -> str:
    """Markdown: per policy and mode, the fine-detail accuracy and the other types' (95% intervals), the
    high-resolution keys read and the attention MFLOPs an answer, as a share of "every block" (same
    policy) and of all high-resolution tokens in the sequence for the same answers (`in_sequence_pairs`).
    Then the in-sequence toy's rows (`compare_in_sequence`; their share is of its own dense cache's), or
    without one a row with that cost alone."""
    every = {r["policy"]: r["attention_mflops"] for r in reports if r["mode"] == "every block"}
    head = (["cache", "reads", FINE_KIND] + [kind for kind in PROMPT_KINDS if kind != FINE_KIND]
            + ["KV bytes", "high-res keys an answer", "attention MFLOPs", "of every block", "of in-sequence"])

    def cells(r, keys, of_every, of_in_sequence):
        return ([r["policy"], r["mode"],
                 format_interval(r["accuracy_by_type"][FINE_KIND], r["accuracy_by_type_ci"][FINE_KIND])]
                + [format_interval(r["accuracy_by_type"][kind], r["accuracy_by_type_ci"][kind])
                   for kind in PROMPT_KINDS if kind != FINE_KIND]
                + [f"{r['kv_ratio']:.2f}", keys, f"{r['attention_mflops']:.1f}", of_every, of_in_sequence])

    rows = [cells(r, f"{r['hires_tokens_read']:.0f}", f"{r['attention_mflops'] / every[r['policy']]:.2f}",
                  f"{r['attention_mflops'] / r['in_sequence_mflops']:.3f}") for r in reports]
    if in_sequence_reports:
        dense = next(r["attention_mflops"] for r in in_sequence_reports if r["policy"] == "full")
        rows += [cells(r, "-", "-", f"{r['attention_mflops'] / dense:.3f}") for r in in_sequence_reports]
    else:
        # full reading nothing: its answers' lengths price the in-sequence row.
        full_low_res = next(r for r in reports if r["policy"] == "full" and r["mode"] == "low-res")
        rows.append(["full", f"{IN_SEQUENCE} (no --in-sequence-toy given: cost only)"] + ["-"] * (len(head) - 5) +
                    [f"{full_low_res['in_sequence_mflops']:.1f}", "-", "1.000"])
    return "\n".join(markdown_table(head, rows))


def plot(reports: list[dict], path: Path, title: str, in_sequence_reports: list[dict] | None = None,
         replace: bool = False) -> None:
    """Fine-detail accuracy (95% interval) against the attention MFLOPs an answer, a line per policy
    through its modes; with the in-sequence toy's reports, a point per policy beside them, in the
    policy's colour, and the MFLOPs on a log axis (the sequence costs over 150 times more)."""
    series, colour_of, dashed = {}, {}, []
    for r in reports + (in_sequence_reports or []):
        name = r["policy"]
        if r["mode"] == IN_SEQUENCE:
            name = f"{r['policy']}, in sequence"
            dashed.append(name)
        colour_of[name] = r["policy"]
        interval = r["accuracy_by_type_ci"][FINE_KIND]
        series.setdefault(name, []).append((r["attention_mflops"], r["accuracy_by_type"][FINE_KIND], *interval))
    save_line_plot(path, series, x_label="attention MFLOPs an answer (accounting formula)",
                   y_label=f"{FINE_KIND} accuracy", title=title, y_range=(0, 1), colour_of=colour_of,
                   dashed=tuple(dashed), log_x=bool(in_sequence_reports), replace=replace)


def parse_args(argv):
    parser = ArgumentParser(description=first_paragraph(__doc__))
    parser.add_argument("--weights", type=given_path, default=HIRES_TOY_WEIGHTS, help="a FlexAttention toy folder")
    parser.add_argument("--seed", type=int, default=1, help="which held-out set (any integer)")
    parser.add_argument("--n", type=int, default=100, help=f"scenes (each gets {len(PROMPT_KINDS)} prompts)")
    parser.add_argument("--plot", type=output_file, default=None, metavar="OUT.png",
                        help="draw the fine-detail accuracy against attention MFLOPs")
    parser.add_argument("--force", action="store_true", help="replace the --plot file if it exists")
    parser.add_argument("--in-sequence-toy", type=given_path, default=None, metavar="FOLDER",
                        help="also measure a toy with every high-res token in the sequence (train_hires --in-sequence)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser.parse_args(argv)


def run(args) -> dict:
    check_stdout_open("results", {"--plot": args.plot})
    if args.n < 1:
        raise UserError(f"--n must be at least 1, got {args.n}")
    if args.force and args.plot is None:
        raise UserError("--force replaces the --plot file: give --plot too")
    if args.plot is not None:
        inputs = [folder for folder in (args.weights, args.in_sequence_toy) if folder is not None]
        check_output_file(args.plot, "--plot", inputs=inputs, suffixes=(".png",), replace=args.force)
    check_model_folder(args.weights, "--weights", "tinyavl.toy.train_hires")
    model, processor = load_pretrained(args.weights, device="cpu", dtype="float32")
    if model.config.hires is None:
        raise UserError(f"{args.weights} has no hires_config: train a FlexAttention toy with "
                        "python -m tinyavl.toy.train_hires")
    in_sequence_model = in_sequence_processor = None
    if args.in_sequence_toy is not None:
        check_model_folder(args.in_sequence_toy, "--in-sequence-toy", "tinyavl.toy.train_hires --in-sequence")
        in_sequence_model, in_sequence_processor = load_pretrained(args.in_sequence_toy, device="cpu", dtype="float32")
        if not in_sequence_model.config.is_next:
            raise UserError(f"--in-sequence-toy: {args.in_sequence_toy} keeps its image at low resolution: train "
                            "one with python -m tinyavl.toy.train_hires --in-sequence")
    log = None if args.json else (lambda line: print(line, file=sys.stderr, flush=True))
    questions = held_out_set(args.seed, args.n, fine=True)
    reports = compare(model, processor, questions, log)
    in_sequence_reports = (None if in_sequence_model is None
                           else compare_in_sequence(in_sequence_model, in_sequence_processor, questions, log))
    if args.plot is not None:
        plot(reports, args.plot, f"FlexAttention toy, {args.n} fine scenes (seed {args.seed}) x "
                                 f"{len(PROMPT_KINDS)} prompts",
             in_sequence_reports, replace=args.force)
        if log:
            log(f"wrote {args.plot}")
    return {"seed": args.seed, "n_scenes": args.n, "rows": reports, "in_sequence_rows": in_sequence_reports}


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_command(run, args, show=lambda result: print(format_table(result["rows"], result["in_sequence_rows"])))


if __name__ == "__main__":
    sys.exit(main())
