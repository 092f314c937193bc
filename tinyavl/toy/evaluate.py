"""Score the toy LLaVA on held-out scenes under a KV policy: accuracy with 95% intervals, KV bytes,
attended tokens; and every policy side by side at the KV budgets `random` measured.

    python -m tinyavl.toy.evaluate --policy avl                       # one policy, 100 scenes of seed 1
    python -m tinyavl.toy.evaluate --policy random --S 0.25 --json    # one JSON object
    python -m tinyavl.toy.evaluate --table --plot sweep.png           # the budget sweep, every policy

Each held-out scene (tinyavl/toy/scenes.py, split "eval": no seed replays the training stream) is asked
one question of every type plus "Describe the image.", each as a fresh single-turn prompt, decoded
greedily. A short answer is right when it equals the truth exactly; a caption is right only when it
names every object once with its colour, place and digit, and nothing else. `accuracy` is the mean over all
prompts (each type weighs the same, since every scene gets one of each); beside every accuracy is its
95% Wilson score interval (`wilson_interval`, tinyavl/toy/intervals.py). A type's prompts are about
different scenes, one each; the overall accuracy's interval takes a scene's prompts as one cluster, since
they are about one image (`clustered_wilson_interval`).

Memory and compute are measured, not nominal: kv_ratio is the peak K/V bytes the policy held over
what the dense cache holds for the same sequence, summed over all prompts; attended_ratio is the
rows attended per decode step (summed over layers) over the dense count. attention_pairs counts the
(query, key) pairs an answer's attention computed (`attention_pairs`), hires_tokens_read the
high-resolution keys a FlexAttention toy's view read (tinyavl/toy/evaluate_hires.py), both per answer.

The table (`budget_sweep`): for each share of image tokens kept (BUDGETS), `random` runs first and its
measured kv_ratio is the budget, kind of prompt by kind of prompt (kv_ratio_by_type); A-VL keeps the same
share of image tokens (and, as it also evicts text, fewer bytes on captions), and the other peers get the
knobs that hold the same bytes on each kind as far as their knobs reach (`budget_params`; where they stop
short of a budget, the row holds more: FastV's R at FASTV_MAX_R at a quarter of the image, one image token in
each layer after its filter; a policy whose knobs reach no lower gets no row at the smaller budgets). Rows
show each policy's measured ratio, so a reader sees how close each came; nothing is tuned on accuracy. The
budgets are matched at the peak, the end of an answer; kv_ratio_after_prefill(_by_type) is the same ratio when
the prompt has just been cached, where a policy whose budget is a share of the sequence so far (H2O,
StreamingLLM) holds more than `random`.
"""
import functools
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tinyavl import load_pretrained
from tinyavl.attention_map import save_attention_map
from tinyavl.cache import AVLCache, KVCache, StreamingCache, as_decimal, make_cache
from tinyavl.cli import (TOY_WEIGHTS, ArgumentParser, add_policy_arguments, check_filter_layer, check_model_folder,
                         check_stdout_open, first_paragraph, given_path, given_policy_params, output_file, policy_cache,
                         run_command)
from tinyavl.errors import UserError
from tinyavl.files import check_output_file, check_picture_folder
from tinyavl.generate import generate
from tinyavl.toy.intervals import clustered_wilson_interval, paired_ratio_interval, wilson_interval
from tinyavl.toy.plot import save_line_plot
from tinyavl.toy.scenes import PROMPT_KINDS, Scene, SceneStream, caption_parts, parse_caption

BUDGETS = (0.5, 0.25, 0.1)   # shares of the image tokens kept, A-VL's S; 0.5 is A-VL's default
FASTV_MAX_R = 0.99           # FastV must keep at least one of the toy's 144 image tokens
SWEEP_POLICIES = ("avl", "h2o", "streaming", "fastv")  # each at the budget `random` set (budget_params)
# After the sweep, two rows that isolate a cause (budget, policy, params, the line they join in the plot):
# A-VL's choice of image tokens alone (everything it stores computed at every step, no prefill filter, no
# text eviction) against `random` at the same S; and `random` evicting only 5% of the image.
AVL_CHOICE_ONLY = {"S": 0.5, "C": 0.5, "K": 1, "P": 1.0, "T": 1.0}
ABLATIONS = [(0.5, "avl", AVL_CHOICE_ONLY, "avl, its choice only"),
             (0.95, "random", {"S": 0.95}, "random")]


# What a FlexAttention model reads of the high-resolution view (`evaluate`'s hires_mode): nothing (the
# 96 px view alone), the blocks its selection chooses, or every block (the whole map, `HiresView.top`).
HIRES_MODES = ("low-res", "selection", "every block")
DEFAULT_HIRES_MODE = "selection"  # FlexAttention as trained


@dataclass(frozen=True)
class Question:
    scene_index: int
    kind: str       # one of PROMPT_KINDS
    text: str
    answer: str
    scene: Scene

    def inputs(self, processor) -> dict:
        """The model's inputs for this question: LLaVA's chat prompt around it, the scene's image."""
        return processor(processor.chat_prompt(self.text), image=self.scene.image())


def reads_fine_scenes(config) -> bool:
    """Whether a toy is trained and measured on fine scenes (small digits): a FlexAttention toy (its
    high-resolution view) or one with every high-resolution token in the sequence (LLaVA-1.6's tiles,
    tinyavl/toy/train_hires.py); the first toy reads plain scenes."""
    return config.hires is not None or config.is_next


def held_out_set(seed: int, n_scenes: int, fine: bool = False) -> list[Question]:
    """n_scenes scenes from the evaluation stream of `seed`, each with one question of every kind (with
    fine, the same scenes and questions drawn as fine scenes: small digits, tinyavl/toy/scenes.py)."""
    questions, stream = [], SceneStream("eval", seed, fine)
    for index in range(n_scenes):
        scene, rng = next(stream)
        for kind in PROMPT_KINDS:
            text, answer = scene.ask(kind, rng)
            questions.append(Question(index, kind, text, answer, scene))
    return questions


def caption_objects_right(prediction: str, scene: Scene) -> int:
    """How many of the scene's objects the caption names exactly (colour, shape, place, digit)."""
    return len(parse_caption(prediction) & {obj.describe() for obj in scene.objects})


# Where each field sits in an object's description, "{colour} {shape} at row R column C[ with digit D]"
# (SceneObject.describe), in words. Compared by position: a caption that breaks the template (a word added
# or left out inside an object) has the fields after that word counted wrong, even one it names right.
CAPTION_FIELDS = {"colour": slice(0, 1), "shape": slice(1, 2), "place": slice(2, 7), "digit": slice(7, None)}


def caption_errors(prediction: str, scene: Scene) -> Counter:
    """Which fields a caption gets wrong: a count for each of CAPTION_FIELDS over the objects it names,
    each paired with a scene object (the pairing with the fewest wrong fields in all, so that an object
    left out or named out of order does not make the ones after it wrong; among pairings as good, the
    first in the scene's order), and "objects": 1 if it names a different number of objects than the
    scene has."""
    said = [part.split() for part in caption_parts(prediction)]
    truths = [obj.describe().split() for obj in scene.objects]

    @functools.cache
    def fewest(i: int, free: frozenset) -> Counter:
        """The wrong fields of the best pairing of said[i:] with the scene objects `free`."""
        if i == len(said) or not free:
            return Counter()
        options = [Counter({field: int(said[i][part] != truths[j][part]) for field, part in CAPTION_FIELDS.items()})
                   + fewest(i + 1, free - {j}) for j in sorted(free)]
        if len(said) - i > len(free):  # more objects said than left to pair: this one may stay unpaired
            options.append(fewest(i + 1, free))
        return min(options, key=lambda errors: sum(errors.values()))

    errors = Counter(dict.fromkeys(CAPTION_FIELDS, 0), objects=int(len(said) != len(truths)))
    errors.update(fewest(0, frozenset(range(len(truths)))))
    return errors


def answer_text(processor, token_ids: list[int], finish_reason: str) -> str:
    """An answer as it is scored: its tokens before the EOS that ended it, special tokens written out. A
    <pad> or <image> inside an answer then makes it wrong, where processor.decode (which leaves special
    tokens out, for a reader) would have let "red <pad>" pass for "red"."""
    ids = token_ids[:-1] if finish_reason == "eos" else token_ids
    return processor.tokenizer.decode(ids, skip_special_tokens=False)


def is_correct(question: Question, prediction: str) -> bool:
    if question.kind == "caption":
        # In any order, but each object once: a caption that names one twice says something else too.
        return sorted(caption_parts(prediction)) == sorted(caption_parts(question.answer))
    return prediction.strip() == question.answer


def attention_pairs(stats) -> int:
    """The (query, key) pairs an answer's attention needs, the unit of the accounting formula (each costs
    4 x n_heads x head_dim FLOPs): the prefill's causal rows, n (n + 1) / 2 in a layer that runs on n rows;
    the rows each decode step attended in each layer; and FlexAttention's high-resolution keys. Each once,
    as a fused implementation computes them: `HiresView.serve` computes a served row's logits over its keys
    a second time, to choose its blocks, which this does not count."""
    return (sum(n * (n + 1) // 2 for n in stats.prefill_attended_per_layer) + sum(map(sum, stats.attended_per_layer))
            + stats.hires_tokens_read)


def paired_ratio(report: dict, reference: dict) -> tuple[float, tuple[float, float]] | tuple[None, None]:
    """One evaluation's accuracy over another's on the same prompts (`evaluate`'s reports), and its 95%
    interval, scene by scene (`paired_ratio_interval`): the table's "of full", budget_sweep's "of_random".
    (None, None) where there is none: the reference got nothing right, or one scene has nothing to resample."""
    if not reference["accuracy"] or len(reference["right_by_scene"]) < 2:
        return None, None
    return (report["accuracy"] / reference["accuracy"],
            paired_ratio_interval(report["right_by_scene"], reference["right_by_scene"]))


class Tally:
    """What `evaluate` counts, answer by answer (`add`), and the report it makes of them (`report`)."""

    def __init__(self):
        self.right, self.asked = Counter(), Counter()                    # per kind of prompt
        self.right_by_scene, self.asked_by_scene = Counter(), Counter()  # the overall interval's clusters
        self.objects_right, self.objects_by_caption = [], []             # per caption
        self.wrong_fields = Counter(dict.fromkeys([*CAPTION_FIELDS, "objects"], 0))
        self.kv_bytes, self.kv_dense = Counter(), Counter()             # per kind of prompt
        self.cached_tokens = Counter()                                   # per kind: the sequences' lengths
        self.kv_after_prefill, self.kv_dense_after_prefill = Counter(), Counter()  # per kind, the prompt cached
        self.attended = self.attended_dense = self.pairs = self.hires_read = 0

    def add(self, question: Question, prediction: str, stats) -> None:
        correct = is_correct(question, prediction)
        self.asked[question.kind] += 1
        self.right[question.kind] += correct
        self.asked_by_scene[question.scene_index] += 1
        self.right_by_scene[question.scene_index] += correct
        if question.kind == "caption":
            self.objects_right.append(caption_objects_right(prediction, question.scene))
            self.objects_by_caption.append(len(question.scene.objects))
            self.wrong_fields.update(caption_errors(prediction, question.scene))
        self.kv_bytes[question.kind] += stats.kv_cache_bytes_peak
        self.kv_dense[question.kind] += stats.kv_cache_bytes_dense
        self.cached_tokens[question.kind] += stats.cached_tokens
        self.kv_after_prefill[question.kind] += stats.kv_cache_bytes_after_prefill
        self.kv_dense_after_prefill[question.kind] += stats.kv_cache_bytes_dense_after_prefill
        self.pairs += attention_pairs(stats)
        self.hires_read += stats.hires_tokens_read
        steps = len(stats.attended_per_layer)
        if steps:
            self.attended += stats.attended_tokens_per_step * steps
            self.attended_dense += stats.attended_tokens_per_step_dense * steps

    def report(self) -> dict:
        kinds = [kind for kind in PROMPT_KINDS if self.asked[kind]]
        n, scenes = sum(self.asked.values()), sorted(self.asked_by_scene)
        right_by_scene = [self.right_by_scene[i] for i in scenes]
        objects = sum(self.objects_by_caption)
        return {
            "n_questions": n,
            "accuracy": sum(self.right.values()) / n,
            "accuracy_ci": clustered_wilson_interval(right_by_scene, [self.asked_by_scene[i] for i in scenes]),
            # In scene order: `paired_ratio_interval` pairs them with another row's (full's, random's).
            "right_by_scene": right_by_scene,
            "accuracy_by_type": {kind: self.right[kind] / self.asked[kind] for kind in kinds},
            "accuracy_by_type_ci": {kind: wilson_interval(self.right[kind], self.asked[kind]) for kind in kinds},
            # A caption's objects go right or wrong together: each caption is a cluster.
            "caption_objects": sum(self.objects_right) / objects if objects else None,
            "caption_objects_ci": (clustered_wilson_interval(self.objects_right, self.objects_by_caption)
                                   if objects else None),
            "caption_errors": dict(self.wrong_fields),  # summed over captions (caption_errors)
            "kv_ratio": sum(self.kv_bytes.values()) / sum(self.kv_dense.values()),
            "kv_ratio_by_type": {kind: self.kv_bytes[kind] / self.kv_dense[kind] for kind in kinds},
            # Budgets are matched at the peak; a policy whose budget is a share of the sequence so far (H2O,
            # StreamingLLM) holds more than `random` before it, when the prefill has just chosen.
            "kv_ratio_after_prefill": sum(self.kv_after_prefill.values()) / sum(self.kv_dense_after_prefill.values()),
            "kv_ratio_after_prefill_by_type": {kind: self.kv_after_prefill[kind] / self.kv_dense_after_prefill[kind]
                                               for kind in kinds},
            # The tokens a sequence caches by its end, the dense cache's length, averaged per kind.
            "cached_tokens_by_type": {kind: self.cached_tokens[kind] / self.asked[kind] for kind in kinds},
            "attended_ratio": self.attended / self.attended_dense if self.attended_dense else None,
            "attention_pairs": self.pairs / n,       # per answer (attention_pairs)
            "hires_tokens_read": self.hires_read / n,  # per answer, summed over layers
        }


def evaluate(model, processor, questions: list[Question], policy: str | KVCache = "full", params: dict | None = None,
             max_new_tokens: int = 64, on_answer=None, hires_mode: str = DEFAULT_HIRES_MODE,
             params_by_type: dict | None = None) -> dict:
    """Run every question under a policy (a registered name and its params, or a cache built elsewhere);
    the report as a dict (see the module docstring).

    One cache runs every question in turn (each is a new sequence: `begin` resets it), so a policy with
    a seeded draw (`random`) draws a fresh set for each. params_by_type {prompt kind: params}, instead of
    params: one cache per kind, each with its own (the report then has "policy_params_by_type", and
    "policy_params" None).
    on_answer(question, prediction, cache, inputs) is called after each answer (the attention pictures,
    evaluate_hires' count of an answer's attention). hires_mode
    (HIRES_MODES) says what a FlexAttention model reads of the high-resolution view: nothing, the
    selection's blocks, or every block."""
    if hires_mode not in HIRES_MODES:
        raise ValueError(f"hires_mode must be one of {HIRES_MODES}, got {hires_mode!r}")
    if params_by_type is not None and (params is not None or isinstance(policy, KVCache)):
        raise ValueError("params_by_type replaces params, for a policy given by name")
    if params_by_type is not None:
        missing = sorted({question.kind for question in questions} - params_by_type.keys())
        if missing:
            raise ValueError(f"params_by_type has no parameters for {', '.join(missing)}")
        cache_of = {kind: make_cache(policy, **kind_params) for kind, kind_params in params_by_type.items()}
    else:
        cache = policy if isinstance(policy, KVCache) else make_cache(policy, **(params or {}))
        cache_of = dict.fromkeys(PROMPT_KINDS, cache)
    tally = Tally()
    hires_config = model.config.hires
    every_block = None if hires_config is None or hires_mode != "every block" else hires_config.blocks ** 2
    start = time.perf_counter()
    for question in questions:
        cache = cache_of[question.kind]
        inputs = question.inputs(processor)
        hires_pixels = None if hires_mode == "low-res" else inputs.get("hires_pixel_values")
        token_ids, stats = generate(model, inputs["input_ids"], inputs["pixel_values"],
                                    image_sizes=inputs["image_sizes"], hires_pixel_values=hires_pixels,
                                    hires_top=every_block, max_new_tokens=max_new_tokens,
                                    policy=cache)
        prediction = answer_text(processor, token_ids, stats.finish_reason)
        tally.add(question, prediction, stats)
        if on_answer:
            on_answer(question, prediction, cache, inputs)
    any_cache = next(iter(cache_of.values()))
    by_type = {} if params_by_type is None else {
        "policy_params_by_type": {kind: kind_cache.params() for kind, kind_cache in cache_of.items()}}
    return {"policy": any_cache.name, "policy_params": None if by_type else any_cache.params(), **by_type,
            **tally.report(), "seconds": time.perf_counter() - start}


def to_4_decimals(x, rounding) -> float:
    """x (a float, read as the decimal it is written as, or a Fraction) to 4 decimals by rounding (math.floor
    or math.ceil)."""
    return rounding(as_decimal(x) * 10_000) / 10_000


def budget_params(policy: str, image_keep: float, kv_ratio: float, n_layers: int,
                  cached_tokens: float | None = None) -> dict:
    """A policy's knobs for the budget `random` holds at S = image_keep (kv_ratio r, as it measured on
    sequences that cache `cached_tokens` tokens by their end, on average).

    - random: S = image_keep. avl: the same S, the core C in its defaults' ratio to S (0.3 / 0.5), other
      knobs at their defaults: the same share of the image, which holds fewer bytes than `random` does
      where A-VL also evicts text (captions).
    - h2o, streaming: their budgets are shares of the sequence: h2o gets r, split 1 : 3 heavy : recent as
      in its defaults; streaming a window of r less its sinks, which it keeps beside the window:
      recent = r - sinks / cached_tokens. budget_sweep gives them r per prompt kind: `random` holds a
      larger share of a long answer (a caption) than of a short one, where their share is the same. A
      share becomes whole rows rounded down (`floor_count`), so streaming's window is rounded up to 4 decimals,
      and h2o, whose two shares are each rounded down, gets its heavy share rounded down and its recent one
      rounded up with one row of the `cached_tokens` more: on a sequence of that length each holds as many
      rows as `random`, or h2o one more, never fewer. (On a kind's sequences of other lengths, captions, the
      floors fall where they will: on the held-out captions streaming held 0.4-0.6 of a row a caption fewer
      than `random`, h2o up to 0.2 more.)
    - fastv: after layer filter_layer - 1 = 0 (the earliest; from its default 2 a 4-layer model cannot
      reach these budgets) it drops R of the image tokens from the L - 1 later layers. random holds
      1 - (1 - image_keep) s of the dense bytes (s: the image's share of them), FastV 1 - R s (L - 1) / L:
      equal at R = (1 - image_keep) L / (L - 1), capped at FASTV_MAX_R, the nearest its knobs allow. R is
      rounded down to 4 decimals: FastV keeps floor((1 - R) n) of n image tokens, never fewer than the exact
      R keeps; rounded to the nearest (2/3 to 0.6667) it kept 47 of the toy's 144 where the exact R keeps 48.
    """
    if policy == "random":
        return {"S": image_keep}
    if policy == "avl":
        defaults = AVLCache()
        return {"S": image_keep, "C": round(image_keep * defaults.C / defaults.S, 4)}
    if policy in ("h2o", "streaming") and cached_tokens is None:
        raise ValueError(f"{policy}'s budget is counted in rows: pass the sequences' cached_tokens")
    if policy == "h2o":
        heavy = to_4_decimals(kv_ratio / 4, math.floor)
        return {"heavy": heavy, "recent": to_4_decimals(kv_ratio - heavy + 1 / cached_tokens, math.ceil)}
    if policy == "streaming":
        return {"recent": to_4_decimals(kv_ratio - StreamingCache().sinks / cached_tokens, math.ceil)}
    if policy == "fastv":
        exact_r = min((1 - as_decimal(image_keep)) * n_layers / (n_layers - 1), as_decimal(FASTV_MAX_R))
        return {"filter_layer": 1, "R": to_4_decimals(exact_r, math.floor)}
    raise ValueError(f"no budget rule for policy {policy!r}")


def budget_sweep(model, processor, questions, log=None, hires_mode: str = DEFAULT_HIRES_MODE) -> list[dict]:
    """`full`, then at every budget of BUDGETS `random` first and each of SWEEP_POLICIES at that budget
    (budget_params: the bytes `random` held, as far as a policy's knobs reach; A-VL at its share of the
    image), then ABLATIONS. Each report gains "budget": the share of image tokens kept (1 for full) and
    "line": the plot's line it belongs to; a peer's, and an ablation's where `random` ran at its budget,
    "of_random" and "of_random_ci": its accuracy over `random`'s at that budget, paired scene by scene
    (`paired_ratio`; None where it has none). hires_mode: as `evaluate`'s."""
    def measure(policy, params, budget, line=None, by_type=None, control=None):
        report = {"budget": budget, "line": line or policy,
                  **evaluate(model, processor, questions, policy, params, hires_mode=hires_mode,
                             params_by_type=by_type)}
        against = ""
        if control is not None:
            report["of_random"], report["of_random_ci"] = paired_ratio(report, control)
            against = (f" ({format_interval(report['of_random'], report['of_random_ci'], 3)} of random's)"
                       if report["of_random"] is not None
                       else " (no ratio to random's: it got nothing right, or there is one scene)")
        if log:
            label = f"{policy} {shown_params(report)}".rstrip()
            log(f"budget {budget}: {label}: accuracy {report['accuracy']:.3f}{against}, "
                f"KV {report['kv_ratio']:.3f}, after the prefill {report['kv_ratio_after_prefill']:.3f} "
                f"(captions {report['kv_ratio_after_prefill_by_type'].get('caption', math.nan):.3f}) "
                f"({report['seconds']:.0f} s)")
        return report

    n_layers = model.config.text.num_hidden_layers
    reports = [measure("full", {}, 1.0)]
    knobs_run = {}  # per policy, the knobs of its last row
    controls = {}   # per budget, `random`'s report there
    for image_keep in BUDGETS:
        # 1.0: random takes no byte budget; its measured bytes are the budget the others match.
        control = controls[image_keep] = measure("random", budget_params("random", image_keep, 1.0, n_layers),
                                                 image_keep)
        reports.append(control)
        for policy in SWEEP_POLICIES:
            # The bytes `random` held on each kind of prompt: a policy whose knobs are shares of the
            # sequence (h2o, streaming) gets them kind by kind; the others' knobs do not depend on them.
            by_type = {kind: budget_params(policy, image_keep, ratio, n_layers, control["cached_tokens_by_type"][kind])
                       for kind, ratio in control["kv_ratio_by_type"].items()}
            if by_type == knobs_run.get(policy):
                # Its knobs reach no lower (FastV's R at FASTV_MAX_R): the row would be the last one again,
                # at more bytes than this budget's. Left out, and said.
                if log:
                    log(f"{policy}: its knobs reach no lower than its last row's; no row at budget {image_keep:g}")
                continue
            knobs_run[policy] = by_type
            params = next(iter(by_type.values()))
            if all(kind_params == params for kind_params in by_type.values()):
                reports.append(measure(policy, params, image_keep, control=control))
            else:
                reports.append(measure(policy, None, image_keep, by_type=by_type, control=control))
    # An ablation is paired with `random` where that ran at its budget (A-VL's choice alone at half of the
    # image: the choice against a random one).
    return reports + [measure(policy, params, budget, line, control=controls.get(budget))
                      for budget, policy, params, line in ABLATIONS]


def format_interval(value: float, interval: tuple[float, float], digits: int = 2) -> str:
    return f"{value:.{digits}f} ({interval[0]:.{digits}f}-{interval[1]:.{digits}f})"


def markdown_table(head: list[str], rows: list[list[str]]) -> list[str]:
    """The lines of a Markdown table: the header row, its rule, then one line per row of cells."""
    lines = ["| " + " | ".join(cells) + " |" for cells in [head, *rows]]
    return [lines[0], "|" + "---|" * len(head), *lines[1:]]


def shown_params(report: dict) -> str:
    """A report's policy parameters in a line: "S=0.5 C=0.3", or for parameters set per kind of prompt
    their range and the caption's value ("recent=0.46-0.50 (caption 0.50)")."""
    shown = [f"{k}={v}" for k, v in (report["policy_params"] or {}).items()]
    by_type = report.get("policy_params_by_type") or {}
    for name in next(iter(by_type.values()), {}):
        values = [kind_params[name] for kind_params in by_type.values()]
        caption = f" (caption {by_type['caption'][name]})" if "caption" in by_type else ""
        shown.append(f"{name}={values[0]}" if len(set(values)) == 1 else f"{name}={min(values)}-{max(values)}{caption}")
    return " ".join(shown)


def format_table(reports: list[dict]) -> str:
    """A Markdown table: one row per report, accuracy (95% interval) overall and per type, the share of
    full's accuracy (its paired interval, `paired_ratio_interval`) and, for a peer or an ablation in a budget
    sweep, of `random`'s at its budget (`budget_sweep`'s "of_random"), the caption objects named exactly
    (95% interval, each caption a cluster), and the measured ratios."""
    full = next((r for r in reports if r["policy"] == "full"), None)
    head = (["budget", "policy", "params", "overall", "of full", "of random"] + list(PROMPT_KINDS)
            + ["caption objects", "KV bytes", "KV bytes, captions", "attended"])
    rows = []
    for r in reports:
        ratio, interval = paired_ratio(r, full) if full else (None, None)
        of_full = "-" if ratio is None else format_interval(ratio, interval, 3)
        of_random = "-" if r.get("of_random") is None else format_interval(r["of_random"], r["of_random_ci"], 3)
        cells = ["-" if r.get("budget") is None else f"{r['budget']:g}", r["policy"], shown_params(r) or "-",
                 format_interval(r["accuracy"], r["accuracy_ci"], 3), of_full, of_random]
        cells += [format_interval(r["accuracy_by_type"][kind], r["accuracy_by_type_ci"][kind]) for kind in PROMPT_KINDS]
        caption_kv = r.get("kv_ratio_by_type", {}).get("caption")
        objects = ("-" if r["caption_objects"] is None
                   else format_interval(r["caption_objects"], r["caption_objects_ci"], 3))
        cells += [objects, f"{r['kv_ratio']:.2f}",
                  "-" if caption_kv is None else f"{caption_kv:.2f}",
                  "-" if r["attended_ratio"] is None else f"{r['attended_ratio']:.2f}"]
        rows.append(cells)
    return "\n".join(markdown_table(head, rows))


def sweep_title(weights: Path, config, n_scenes: int, seed: int) -> str:
    """The budget sweep's title: the model, named by its folder where it is not the committed toy (a control,
    the FlexAttention toy), and the held-out set it answered."""
    model = "toy LLaVA" if weights.resolve() == TOY_WEIGHTS else f"toy LLaVA ({weights.name})"
    scenes = "fine scenes" if reads_fine_scenes(config) else "scenes"
    return f"{model}, {n_scenes} held-out {scenes} (seed {seed}) x {len(PROMPT_KINDS)} prompts"


def plot_sweep(reports: list[dict], path: Path, title: str, replace: bool = False) -> None:
    """Accuracy (with its 95% interval) against the measured KV ratio, one line per policy (or per
    report "line", when budget_sweep gave one)."""
    series = {}
    for r in reports:
        series.setdefault(r.get("line", r["policy"]), []).append((r["kv_ratio"], r["accuracy"], *r["accuracy_ci"]))
    save_line_plot(path, series, x_label="KV bytes held / dense (measured)", y_label="held-out accuracy",
                   title=title, x_range=(0, 1), y_range=(0, 1), replace=replace)


def parse_args(argv):
    parser = ArgumentParser(description=first_paragraph(__doc__))
    parser.add_argument("--weights", type=given_path, default=TOY_WEIGHTS, help="the toy model folder")
    parser.add_argument("--seed", type=int, default=1, help="which held-out set (any integer)")
    parser.add_argument("--n", type=int, default=100, help=f"scenes (each gets {len(PROMPT_KINDS)} prompts)")
    add_policy_arguments(parser)
    parser.add_argument("--table", action="store_true",
                        help=f"every policy at the budgets of image tokens kept {BUDGETS} (budget_sweep)")
    parser.add_argument("--plot", type=output_file, default=None, metavar="OUT.png",
                        help="with --table: draw accuracy against measured KV bytes")
    parser.add_argument("--force", action="store_true",
                        help="replace the --plot file, or the pictures in --attention-maps, if they exist")
    parser.add_argument("--hires-mode", choices=HIRES_MODES, default=None,
                        help="what a FlexAttention toy (weights/toy-hires) reads of its high-resolution view "
                             f"(default: {DEFAULT_HIRES_MODE})")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--attention-maps", type=given_path, default=None,
                        help="folder: draw the attention picture of the first scene's prompts")
    return parser.parse_args(argv)


def map_file(folder: Path, kind: str) -> Path:
    """Where --attention-maps draws the picture of one kind of prompt."""
    return folder / f"{kind}.png"


def run(args) -> dict:
    check_stdout_open("results", {"--plot": args.plot, "--attention-maps": args.attention_maps})
    if args.n < 1:
        raise UserError(f"--n must be at least 1, got {args.n}")
    if args.table and args.n < 2:  # paired_ratio_interval resamples scenes: one gives an interval of no width
        raise UserError(f"--table compares rows scene by scene: give --n 2 or more, got {args.n}")
    if args.table and (args.policy != "full" or given_policy_params(args) or args.attention_maps):
        raise UserError("--table runs its own list of policies: leave out --policy, its parameters "
                        "and --attention-maps")
    if args.force and args.plot is None and args.attention_maps is None:
        raise UserError("--force replaces the --plot file or the pictures in --attention-maps: give one of them")
    if args.plot is not None and not args.table:
        raise UserError("--plot draws the budget sweep: give --table too")
    if args.plot is not None:
        check_output_file(args.plot, "--plot", inputs=[args.weights], suffixes=(".png",), replace=args.force)
    if args.attention_maps is not None:
        pictures = [map_file(args.attention_maps, kind).name for kind in PROMPT_KINDS]  # one per kind of prompt
        check_picture_folder(args.attention_maps, "--attention-maps", pictures, [args.weights], args.force)
    cache = policy_cache(args)  # bad policy parameters fail here, before any work
    check_model_folder(args.weights, "--weights", "tinyavl.toy.train")
    model, processor = load_pretrained(args.weights, device="cpu", dtype="float32")
    filter_note = check_filter_layer(args, model.config, cache)
    if args.hires_mode is not None and model.config.hires is None:  # it would change nothing
        raise UserError(f"--hires-mode: {args.weights} has no high-resolution view (no hires_config); it is for a "
                        "FlexAttention toy (weights/toy-hires)")
    args.hires_mode = args.hires_mode or DEFAULT_HIRES_MODE
    if args.table and model.config.text.num_hidden_layers < 2:  # FastV drops tokens for the layers after one
        raise UserError(f"{args.weights} has a 1-layer decoder: the budget sweep's FastV needs a layer after its "
                        "filter; --table needs 2 layers or more")
    if filter_note:  # once every check has passed: a mistake is one line
        print(filter_note, file=sys.stderr)
    questions = held_out_set(args.seed, args.n, fine=reads_fine_scenes(model.config))

    if args.table:
        log = None if args.json else (lambda line: print(line, file=sys.stderr, flush=True))
        reports = budget_sweep(model, processor, questions, log, args.hires_mode)
        if args.plot is not None:
            plot_sweep(reports, args.plot, sweep_title(args.weights, model.config, args.n, args.seed),
                       replace=args.force)
            if log:
                log(f"wrote {args.plot}")
        return {"seed": args.seed, "n_scenes": args.n, "rows": reports}

    def save_map(question, prediction, cache, inputs):
        if question.scene_index == 0:
            # The folder is made with the first picture: a run stopped before it leaves no empty folders.
            args.attention_maps.mkdir(parents=True, exist_ok=True)
            save_attention_map(map_file(args.attention_maps, question.kind), model, processor, inputs, cache,
                               question=question.text, replace=args.force)

    report = evaluate(model, processor, questions, args.policy, given_policy_params(args), hires_mode=args.hires_mode,
                      on_answer=None if args.attention_maps is None else save_map)
    if args.attention_maps is not None:
        print(f"wrote the first scene's attention maps to {args.attention_maps}", file=sys.stderr)
    return {"seed": args.seed, "n_scenes": args.n, **report}


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_command(run, args, show=lambda result: print(format_table(result["rows"] if args.table else [result])))


if __name__ == "__main__":
    sys.exit(main())
