"""Score the toy LLaVA on held-out scenes under a KV policy: accuracy, KV bytes and attended tokens.

    python -m tinyavl.evaluate --policy avl --seed 1 --n 50            # one policy
    python -m tinyavl.evaluate --policy h2o --heavy 0.25 --json         # one JSON object
    python -m tinyavl.evaluate --table --seed 1 --n 50                  # every policy + the A-VL sweep

Each held-out scene (tinyavl/scenes.py, split "eval": no seed replays the training stream) is asked
one question of every type plus "Describe the image.", each as a fresh single-turn prompt, decoded
greedily. A short answer is right when it equals the truth exactly; a caption is right only when it
names every object with its colour, place and digit, and nothing else. `accuracy` is the mean over all
prompts (each type weighs the same, since every scene gets one of each).

Memory and compute are measured, not nominal: kv_ratio is the peak K/V bytes the policy held over
what the dense cache holds for the same sequence, summed over all prompts; attended_ratio is the
rows attended per decode step (summed over layers) over the dense count.
"""
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tinyavl import load_pretrained
from tinyavl.attention_map import save_attention_map
from tinyavl.cache import make_cache
from tinyavl.cli import TOY_WEIGHTS, ArgumentParser, add_policy_arguments, policy_params, run_command
from tinyavl.errors import UserError
from tinyavl.generate import generate
from tinyavl.scenes import PROMPT_KINDS, Scene, parse_caption, scene_stream

# Every policy at about half of the dense KV bytes on the toy model (the measured kv_ratio is printed
# beside each row), then A-VL's own knobs one at a time around its defaults.
POLICY_TABLE = [
    ("full", {}),
    ("avl", {}),
    ("h2o", {}),
    ("streaming", {}),
    ("fastv", {"K": 1, "R": 0.75}),
]
AVL_SWEEP = [
    {"S": 0.3, "C": 0.1}, {"S": 0.3, "C": 0.3}, {"S": 0.5, "C": 0.1}, {"S": 0.5, "C": 0.5},
    {"S": 0.5, "C": 0.3, "K": 1}, {"S": 0.5, "C": 0.3, "K": 6}, {"P": 1.0}, {"S": 0.2, "C": 0.1, "P": 0.2},
]


@dataclass(frozen=True)
class Question:
    scene_index: int
    kind: str       # one of PROMPT_KINDS
    text: str
    answer: str
    scene: Scene


def held_out_set(seed: int, n_scenes: int) -> list[Question]:
    """n_scenes scenes from the evaluation stream of `seed`, each with one question of every kind."""
    questions, stream = [], scene_stream("eval", seed)
    for index in range(n_scenes):
        scene, rng = next(stream)
        for kind in PROMPT_KINDS:
            text, answer = scene.ask(kind, rng)
            questions.append(Question(index, kind, text, answer, scene))
    return questions


def caption_objects_right(prediction: str, scene: Scene) -> int:
    """How many of the scene's objects the caption names exactly (colour, shape, place, digit)."""
    return len(parse_caption(prediction) & {obj.describe() for obj in scene.objects})


def is_correct(question: Question, prediction: str) -> bool:
    if question.kind == "caption":
        return parse_caption(prediction) == parse_caption(question.answer)
    return prediction.strip() == question.answer


def evaluate(model, processor, questions: list[Question], policy: str = "full", params: dict | None = None,
             max_new_tokens: int = 64, on_answer=None) -> dict:
    """Run every question under a policy; the report as a dict (see the module docstring).

    on_answer(question, prediction, cache, inputs) is called after each answer (for pictures)."""
    params = params or {}
    right = {kind: 0 for kind in PROMPT_KINDS}
    asked = {kind: 0 for kind in PROMPT_KINDS}
    objects_right = objects_total = 0
    kv_bytes = kv_dense = attended = attended_dense = 0
    start = time.perf_counter()
    for question in questions:
        cache = make_cache(policy, **params)
        inputs = processor(processor.chat_prompt(question.text), image=question.scene.image())
        token_ids, stats = generate(model, inputs["input_ids"], inputs["pixel_values"],
                                    max_new_tokens=max_new_tokens, eos_token_id=processor.eos_token_id, policy=cache)
        prediction = processor.decode(token_ids)
        asked[question.kind] += 1
        right[question.kind] += is_correct(question, prediction)
        if question.kind == "caption":
            objects_right += caption_objects_right(prediction, question.scene)
            objects_total += len(question.scene.objects)
        kv_bytes += stats.kv_cache_bytes
        kv_dense += stats.kv_cache_bytes_dense
        steps = len(stats.attended_per_layer)
        if steps:
            attended += stats.attended_tokens_per_step * steps
            attended_dense += stats.attended_tokens_per_step_dense * steps
        if on_answer:
            on_answer(question, prediction, cache, inputs)
    by_kind = {kind: right[kind] / asked[kind] for kind in PROMPT_KINDS if asked[kind]}
    return {
        "policy": policy, "policy_params": cache.params(),
        "n_questions": len(questions),
        "accuracy": sum(right.values()) / len(questions),
        "accuracy_by_type": by_kind,
        "caption_objects": objects_right / objects_total if objects_total else None,
        "kv_ratio": kv_bytes / kv_dense,
        "attended_ratio": attended / attended_dense if attended_dense else None,
        "seconds": time.perf_counter() - start,
    }


def format_table(reports: list[dict]) -> str:
    """A Markdown table: one row per report, accuracy per type and the measured ratios."""
    head = ["policy", "params", "overall"] + list(PROMPT_KINDS) + ["caption objects", "KV bytes", "attended"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in reports:
        params = " ".join(f"{k}={v}" for k, v in r["policy_params"].items())
        cells = [r["policy"], params or "-", f"{r['accuracy']:.3f}"]
        cells += [f"{r['accuracy_by_type'][kind]:.2f}" for kind in PROMPT_KINDS]
        cells += [f"{r['caption_objects']:.3f}", f"{r['kv_ratio']:.2f}",
                  "-" if r["attended_ratio"] is None else f"{r['attended_ratio']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv):
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", type=Path, default=TOY_WEIGHTS, help="the toy model folder")
    parser.add_argument("--seed", type=int, default=1, help="which held-out set (any integer)")
    parser.add_argument("--n", type=int, default=50, help="scenes (each gets 6 prompts)")
    add_policy_arguments(parser)
    parser.add_argument("--table", action="store_true", help="every policy at ~50%% KV, then the A-VL sweep")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--attention-maps", type=Path, default=None,
                        help="folder: draw the attention picture of the first scene's prompts")
    return parser.parse_args(argv)


def run(args) -> dict:
    if args.n < 1:
        raise UserError(f"--n must be at least 1, got {args.n}")
    if args.table and (args.policy != "full" or policy_params(args) or args.attention_maps):
        raise UserError("--table runs its own list of policies: leave out --policy, its parameters "
                                "and --attention-maps")
    make_cache(args.policy, **policy_params(args))  # bad policy parameters fail here, before any work
    if not args.weights.is_dir():
        raise UserError(f"no model folder at {args.weights}: train one with python -m tinyavl.train_toy")
    model, processor = load_pretrained(args.weights, device="cpu", dtype="float32")
    questions = held_out_set(args.seed, args.n)

    if args.table:
        reports = []
        for policy, params in POLICY_TABLE + [("avl", params) for params in AVL_SWEEP]:
            reports.append(evaluate(model, processor, questions, policy, params))
            if not args.json:
                print(f"{policy} {params}: accuracy {reports[-1]['accuracy']:.3f} "
                      f"({reports[-1]['seconds']:.0f} s)", file=sys.stderr)
        return {"seed": args.seed, "n_scenes": args.n, "rows": reports}

    on_answer = None
    if args.attention_maps is not None:
        if args.attention_maps.exists() and not args.attention_maps.is_dir():
            raise UserError(f"--attention-maps {args.attention_maps} is a file: give a folder")
        args.attention_maps.mkdir(parents=True, exist_ok=True)

        def on_answer(question, prediction, cache, inputs):
            if question.scene_index == 0:
                save_attention_map(args.attention_maps / f"{question.kind}.png", model, processor, inputs, cache)

    report = evaluate(model, processor, questions, args.policy, policy_params(args), on_answer=on_answer)
    return {"seed": args.seed, "n_scenes": args.n, **report}


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_command(run, args, show=lambda result: print(format_table(result["rows"] if args.table else [result])))


if __name__ == "__main__":
    sys.exit(main())
