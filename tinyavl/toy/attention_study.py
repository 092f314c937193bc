"""Where the toy LLaVA's attention goes, measured as the A-VL paper measured real LVLMs.

    python -m tinyavl.toy.attention_study --out tutorial/figures --force   # numbers + two figures (chapter 4)

Every measure runs on dense attention (nothing evicted) while the model writes its captions for
held-out scenes (`Scene.caption`: 26-43 tokens, long enough to watch attention move from step to
step). Per decoder layer (tinyavl/attention_stats.py has the measures):
- shares: the attention of the decode steps' queries on sys / image / text, beside each segment's
  share of the tokens (what attention spread evenly would give it);
- bos (the attention sink, if there is one): the share on BOS, the first token;
- concentration: the share of the last prompt token's image attention on its top 10% and 50% of
  image tokens (A-VL and FastV rank image tokens by that row);
- ppci_layers: p%-PPCI of that row's top image sets between every two layers;
- ppci_scenes: p%-PPCI of that row's top image sets of two different scenes, in the same layer: near
  1 when a layer picks the same places whatever the picture shows (a ranking by position, not content);
- ppci_steps: p%-PPCI of the image top sets of two decode steps, as a function of their distance;
- capture: the share of each decode step's image attention that falls on the prefill top-S set (what
  A-VL stores at S) or top-C set (its core); a random set of that size captures S (or C) on average;
- object_coverage: which objects that prefill top-S set keeps: the share of each object's patches in it,
  by the object's rank in the caption (the first object named, the second, ...); a random set keeps
  S of every object;
- band_coverage: where in the picture that set lies: the share of each horizontal band of the image
  (the scene's rows of places, top to bottom) in it; a random set keeps S of every band;
- object_attention: how much of that row's image attention lands on the patches that show an object,
  beside their share of the image tokens (what attention blind to the picture's content gives them).
- hires_coverage: what FlexAttention's selection (tinyavl/hires.py, threshold 48) takes from that row:
  the share of the image's area in the chosen blocks (what a high-resolution view would be read of), and
  the share of each object's patches' area inside them, by the object's rank in the caption.

And one measure of accuracy rather than attention, `choice_by_layer`: A-VL's choice of image tokens alone
(the evaluation's AVL_CHOICE_ONLY: half of them stored, all of those computed, nothing else evicted),
with the choice made at random in some layers (`LayerChoiceAVL`), on the questions whose answers are
longer than one token. The layers whose random choice scores better than their own choice are the
layers whose last-prompt-token ranking costs the accuracy. And `hidden_object_recall`: whether the
caption still names an object when the image tokens of its place are hidden from the decoder
(`HiddenImageTokens`), against as many random image tokens hidden: whether the vision tower spreads
what an object is beyond its own patches, as a deep ViT spreads information across an image.
"""
import sys
from itertools import combinations
from pathlib import Path
from statistics import fmean

import torch

from tinyavl import hires, load_pretrained
from tinyavl.attention_stats import capture, ppci, record_attention, segment_shares, segment_sizes, top_set, top_share
from tinyavl.cache import MODALITIES, AVLCache, KVCache
from tinyavl.cli import (TOY_WEIGHTS, ArgumentParser, check_model_folder, check_stdout_open, first_paragraph,
                         given_path, run_command)
from tinyavl.errors import UserError
from tinyavl.files import check_picture_folder
from tinyavl.generate import generate
from tinyavl.model import attention
from tinyavl.toy.evaluate import AVL_CHOICE_ONLY, answer_text, evaluate, format_interval, held_out_set, markdown_table
from tinyavl.toy.intervals import clustered_wilson_interval
from tinyavl.toy.plot import save_line_plot
from tinyavl.toy.scenes import GRID, IMAGE_SIZE, PATCH, parse_caption

LONG_ANSWER_KINDS = ("where", "caption")  # the others are one word, computed by the prefill before any eviction
AVL_DEFAULTS = AVLCache()
# A-VL's default S and C: the shares of the image whose top sets (stored, core) the study measures.
STORED_SHARE, CORE_SHARE = AVL_DEFAULTS.S, AVL_DEFAULTS.C
MAX_DISTANCE = 16         # decode steps apart, for PPCI across steps


def caption_questions(questions: list) -> list:
    """The caption requests among `questions` (of tinyavl.toy.evaluate.held_out_set: one per scene)."""
    return [question for question in questions if question.kind == "caption"]


def record_captions(model, processor, captions: list) -> list:
    """Dense-attention recordings of the answers to `captions` (caption_questions): a list of
    AttentionRecorder, in their order, so that recording i is about captions[i].scene."""
    recordings = []
    for question in captions:
        inputs = question.inputs(processor)
        recorder, _ = record_attention(model, inputs["input_ids"], inputs["pixel_values"], max_new_tokens=64)
        recordings.append(recorder)
    return recordings


def mean_by_rank(scenes: list, share) -> list[float]:
    """Per rank in the caption (scene.objects' order, in which the true caption names them, whatever order
    a generated one took): the mean of share(i, obj) over the scenes i that have an object of that rank."""
    most = max(len(scene.objects) for scene in scenes)
    return [fmean(share(i, scene.objects[rank]) for i, scene in enumerate(scenes) if rank < len(scene.objects))
            for rank in range(most)]


def object_coverage(recordings: list, scenes: list, keep: float = STORED_SHARE) -> list[list[float]]:
    """Per layer, per rank in the caption (`mean_by_rank`): the mean share of the object's patches in the last
    prompt token's top-`keep` image set."""
    coverage = []
    for layer in range(recordings[0].n_layers):
        kept = [top_set(r.image_row(0, layer), keep) for r in recordings]     # image token = patch index
        coverage.append(mean_by_rank(scenes, lambda i, obj: len(kept[i] & set(obj.patches())) / len(obj.patches())))
    return coverage


def band_coverage(recordings: list, side: int, n_bands: int, keep: float = STORED_SHARE) -> list[list[float]]:
    """Per layer, per horizontal band of the image (top to bottom; image tokens are patches in reading
    order, `side` per row, and the rows split into n_bands bands of equal height): the mean share of the
    band's image tokens in the last prompt token's top-`keep` image set."""
    if side % n_bands:
        raise ValueError(f"{side} rows of patches do not split into {n_bands} equal bands")
    per_band = side * side // n_bands                                      # image tokens in one band
    bands = [set(range(band * per_band, (band + 1) * per_band)) for band in range(n_bands)]
    coverage = []
    for layer in range(recordings[0].n_layers):
        kept = [top_set(r.image_row(0, layer), keep) for r in recordings]
        coverage.append([fmean(len(kept_set & band) / per_band for kept_set in kept) for band in bands])
    return coverage


def object_attention(recordings: list, scenes: list) -> list[dict]:
    """Per layer: "attention", the mean share of the last prompt token's image attention on the patches
    that show an object (`SceneObject.patches`), and "tokens", those patches' mean share of the image
    tokens. The two are equal when a layer attends to the image evenly; attention that follows position
    alone, blind to what a picture shows, can give objects only as much as their places do (on held-out
    scenes each patch place shows an object in 0.10-0.23 of them, 0.18 on average), and its top set keeps
    objects only by chance."""
    result = []
    for layer in range(recordings[0].n_layers):
        attention, tokens = [], []
        for recording, scene in zip(recordings, scenes):
            row = recording.image_row(0, layer)                                      # (n_img,)
            shown = {patch for obj in scene.objects for patch in obj.patches()}
            attention.append(capture(row, shown))
            tokens.append(len(shown) / len(row))
        result.append({"attention": fmean(attention), "tokens": fmean(tokens)})
    return result


def object_attention_table(attention: list[dict]) -> list[str]:
    """`object_attention`'s layers as a titled Markdown table."""
    return ["", "Share of the last prompt token's image attention on the patches that show an object "
            "(their share of the image tokens)", "",
            *markdown_table(["layer", "on objects (tokens)"],
                            [[str(layer), f"{x['attention']:.2f} ({x['tokens']:.2f})"]
                             for layer, x in enumerate(attention)])]


def area_in_blocks(blocks, patches: list[int], side: int) -> float:
    """The share of the area of `patches` (image tokens of a side x side grid) inside the chosen blocks
    (n, n) bool. The two grids split the image differently, so both are drawn on their common
    refinement, (side n) x (side n) cells: a block is side x side of them, a patch n x n."""
    n = blocks.shape[0]
    in_patches = torch.zeros(side * side, dtype=torch.bool)
    in_patches[patches] = True
    in_patches = in_patches.view(side, side).repeat_interleave(n, 0).repeat_interleave(n, 1)   # (side n, side n)
    in_blocks = blocks.repeat_interleave(side, 0).repeat_interleave(side, 1)                    # (side n, side n)
    return float((in_patches & in_blocks).sum() / in_patches.sum())


def hires_coverage(recordings: list, scenes: list, side: int, blocks_per_side: int = hires.BLOCKS) -> list[dict]:
    """Per layer: "blocks", the mean share of the image's area in the blocks FlexAttention's selection (at
    hires.THRESHOLD, blocks_per_side blocks a side) takes from the last prompt token's image attention, and
    "objects", per rank in the caption (`mean_by_rank`), the mean share of the area of the object's patches
    (`SceneObject.patches`) inside them."""
    coverage = []
    for layer in range(recordings[0].n_layers):
        chosen = [hires.select_blocks(r.image_row(0, layer)[None], (side, side), hires.THRESHOLD, blocks_per_side)[0]
                  for r in recordings]                                   # each (blocks_per_side, blocks_per_side)
        coverage.append({"blocks": fmean(float(c.float().mean()) for c in chosen),
                         "objects": mean_by_rank(scenes,
                                                 lambda i, obj: area_in_blocks(chosen[i], obj.patches(), side))})
    return coverage


def hires_coverage_table(coverage: list[dict]) -> list[str]:
    """`hires_coverage`'s layers as a titled Markdown table."""
    return ["", f"FlexAttention's selection from the last prompt token's image attention (threshold "
            f"{hires.THRESHOLD}): share of the image's area in the chosen blocks, and of each object's "
            "patches, by the order the caption names the objects", "",
            *markdown_table(["layer", "image area", *(f"object {i + 1}" for i in range(len(coverage[0]["objects"])))],
                            [[str(layer), f"{x['blocks']:.2f}", *(f"{v:.2f}" for v in x["objects"])]
                             for layer, x in enumerate(coverage)])]


class LayerChoiceAVL(AVLCache):
    """A-VL, except that in `random_layers` the prefill keeps a uniformly random set of image tokens (as
    many as A-VL keeps), drawn per layer and per sequence from its own generator (seeded by `seed`): the
    other layers rank by the last prompt token's attention, as A-VL does."""

    def __init__(self, random_layers, seed: int = 0, **params):
        super().__init__(**params)
        self.random_layers = frozenset(random_layers)
        self.generator = torch.Generator().manual_seed(seed)

    def image_importance(self, layer, q, k, n_img_here):
        if layer not in self.random_layers:
            return super().image_importance(layer, q, k, n_img_here)
        return torch.rand(n_img_here, generator=self.generator).to(k.device)  # (n_img_here,)


def layer_sets(n_layers: int) -> list[tuple[int, ...]]:
    """Which layers choose at random, one run each: none, each layer alone, the first and the second half
    of the layers, and all of them."""
    half = n_layers // 2
    sets = [(), *((layer,) for layer in range(n_layers)), tuple(range(half)), tuple(range(half, n_layers)),
            tuple(range(n_layers))]
    return list(dict.fromkeys(sets))  # without repeats (a model of 1 or 2 layers)


def choice_by_layer(model, processor, questions: list) -> list[dict]:
    """For each of `layer_sets`: the accuracy of A-VL's choice alone (AVL_CHOICE_ONLY) with the choice made
    at random in those layers, on the questions of LONG_ANSWER_KINDS; a list of
    {"random_layers": tuple, "report": the evaluation's report}."""
    asked = [question for question in questions if question.kind in LONG_ANSWER_KINDS]
    return [{"random_layers": layers,
             "report": evaluate(model, processor, asked, LayerChoiceAVL(layers, **AVL_CHOICE_ONLY))}
            for layers in layer_sets(model.config.text.num_hidden_layers)]


def choice_table(rows: list[dict]) -> list[str]:
    """Markdown lines of choice_by_layer: a row per set of layers that choose at random."""
    kinds = list(rows[0]["report"]["accuracy_by_type"])
    cells = []
    for row in rows:
        report, layers = row["report"], row["random_layers"]
        cells.append([", ".join(map(str, layers)) or "none (A-VL's choice)"]
                     + [format_interval(report["accuracy_by_type"][kind], report["accuracy_by_type_ci"][kind])
                        for kind in kinds]
                     + ["-" if report["caption_objects"] is None else f"{report['caption_objects']:.3f}"])
    title = (f"A-VL's choice alone ({AVL_CHOICE_ONLY['S']:.0%} of the image stored), made at random in some layers: "
             f"accuracy on {rows[0]['report']['n_questions']} prompts")
    return ["", title, "", *markdown_table(["layers choosing at random", *kinds, "caption objects"], cells)]


class HiddenImageTokens(KVCache):
    """The dense cache, except that the image tokens `hidden` (indices into the image block: patches in
    reading order) are hidden from the whole sequence, as training's image-token dropout hides them: the
    prompt's queries do not see them (a mask at prefill), and every layer evicts them right after, so no
    decode step reads them either. Not a KV policy, a probe: which tokens go is given, not chosen."""

    def __init__(self, hidden: list[int]):
        super().__init__()
        self.hidden = torch.tensor(hidden, dtype=torch.long)

    def shown(self, n_rows: int, device) -> torch.Tensor:
        """(n_rows,) bool: False on the hidden image tokens' rows of the prompt."""
        shown = torch.ones(n_rows, dtype=torch.bool, device=device)
        shown[self.n_sys + self.hidden.to(device)] = False
        return shown

    def compute(self, layer, q, rows):
        if self.step > 0:
            return super().compute(layer, q, rows)
        k, v = self.k[layer], self.v[layer]                                   # the prompt's rows
        return attention(q, k, v, causal=True, visible=self.shown(k.shape[2], k.device)[None]), None  # visible (1, T)

    def update(self, layer, q, last_row):
        if self.step == 0:
            self.keep_shared_rows(layer, self.shown(self.k[layer].shape[2], self.k[layer].device).nonzero().flatten())


def caption_with_hidden(model, processor, question, hidden: list[int]) -> set[str]:
    """The objects (as SceneObject.describe writes them) that the greedy caption names when the image
    tokens `hidden` are hidden from the decoder (`HiddenImageTokens`)."""
    inputs = question.inputs(processor)
    token_ids, stats = generate(model, inputs["input_ids"], inputs["pixel_values"], max_new_tokens=64,
                                policy=HiddenImageTokens(hidden))
    return parse_caption(answer_text(processor, token_ids, stats.finish_reason))


HIDING = ("nothing", "its place", "as many random tokens")  # what hidden_object_recall hides, per object


def hidden_object_recall(model, processor, questions: list, seed: int = 0) -> dict:
    """Does the vision tower spread what an object is beyond the object's own patches? For each object of
    each caption prompt among `questions`: is it still named exactly (colour, shape, place, digit) when
    nothing is hidden, when every image token of its place is hidden (`SceneObject.place_patches`: all
    of its pixels, nothing of another object), and when as many image tokens drawn at random are hidden
    (a seeded draw). {hiding: (objects named, objects)} for each of HIDING, each a list with one count per
    caption prompt: a caption's objects share an image, so their interval takes them as one cluster."""
    generator = torch.Generator().manual_seed(seed)
    n_img = model.config.num_image_tokens
    named = {hiding: [] for hiding in HIDING}
    n_objects = []
    for question in questions:
        if question.kind != "caption":
            continue
        scene = question.scene
        plain = caption_with_hidden(model, processor, question, [])
        n_objects.append(len(scene.objects))
        for hiding in HIDING:
            named[hiding].append(0)
        for obj in scene.objects:
            place_tokens = obj.place_patches()
            drawn = torch.randperm(n_img, generator=generator)[:len(place_tokens)].tolist()
            named["nothing"][-1] += obj.describe() in plain
            for hiding, hidden in zip(HIDING[1:], (place_tokens, drawn)):
                named[hiding][-1] += obj.describe() in caption_with_hidden(model, processor, question, hidden)
    return {hiding: (named[hiding], n_objects) for hiding in HIDING}


def hidden_object_table(recall: dict) -> list[str]:
    """Markdown lines of hidden_object_recall: the share of objects named, with its 95% interval (a
    caption's objects one cluster: `clustered_wilson_interval`)."""
    cells = [[f"{hiding} hidden", format_interval(sum(right) / sum(n), clustered_wilson_interval(right, n))]
             for hiding, (right, n) in recall.items()]
    n = sum(recall[HIDING[0]][1])
    return ["", f"Objects the caption still names exactly, of {n}, by what is hidden from the decoder", "",
            *markdown_table(["hidden", "objects named"], cells)]


def study(recordings: list) -> dict:
    """The per-layer attention measures of the module docstring, from shares to capture, averaged over
    recordings (and their steps); `run` adds the coverage, object, choice and hiding measures."""
    if not any(len(r.rows) > 1 for r in recordings):
        raise UserError("no caption had a decode step to measure (every answer ended at its first token)")
    n_layers = recordings[0].n_layers

    def decode_rows(layer):  # (recorder, step, its attention row) for every decode step of every recording
        return [(r, t, r.rows[t][layer]) for r in recordings for t in range(1, len(r.rows))]

    result = {"n_captions": len(recordings), "layers": []}
    for layer in range(n_layers):
        step_rows = decode_rows(layer)
        shares = [segment_shares(row, r.n_sys, r.n_img) for r, _, row in step_rows]
        sizes = [segment_sizes(len(row), r.n_sys, r.n_img) for r, _, row in step_rows]
        prefill = [r.image_row(0, layer) for r in recordings]                   # per recording (n_img,)
        result["layers"].append({
            "shares": {s: fmean(x[s] for x in shares) for s in MODALITIES},
            "sizes": {s: fmean(x[s] for x in sizes) for s in MODALITIES},
            "bos": fmean(float(row[0] / row.sum()) for _, _, row in step_rows),
            "concentration": {p: fmean(top_share(scores, p) for scores in prefill) for p in (0.1, 0.5)},
            "ppci_steps": {d: fmean(ppci(r.image_row(t, layer), r.image_row(t + d, layer), CORE_SHARE)
                                   for r in recordings for t in range(1, len(r.rows) - d))
                           for d in range(1, MAX_DISTANCE + 1)
                           if any(len(r.rows) - 1 > d for r in recordings)},  # some answer is d + 1 steps long
            "ppci_scenes": (fmean(ppci(a, b, STORED_SHARE) for a, b in combinations(prefill, 2))
                            if len(prefill) > 1 else None),
            "capture": {p: fmean(capture(r.image_row(t, layer), top_set(r.image_row(0, layer), p))
                                 for r, t, _ in step_rows)
                        for p in (STORED_SHARE, CORE_SHARE)},
        })
    result["ppci_layers"] = [[fmean(ppci(r.image_row(0, a), r.image_row(0, b), STORED_SHARE) for r in recordings)
                              for b in range(n_layers)] for a in range(n_layers)]
    return result


def coverage_table(coverage: list[list[float]], column: str, title: str) -> list[str]:
    """Markdown lines of a per-layer coverage (object_coverage, band_coverage): a row per layer, a column
    per object or band, numbered from 1."""
    head = ["layer"] + [f"{column} {i + 1}" for i in range(len(coverage[0]))]
    return ["", title, "", *markdown_table(head, [[str(layer)] + [f"{v:.2f}" for v in row]
                                                  for layer, row in enumerate(coverage)])]


def report_markdown(result: dict) -> str:
    """The numbers as Markdown tables (what the chapter quotes)."""
    layers = result["layers"]
    head = ["layer", *(f"{s}: attention (tokens)" for s in MODALITIES), "BOS", "image top 10%", "image top 50%",
            f"capture, prefill top {STORED_SHARE:.0%}", f"capture, top {CORE_SHARE:.0%}"]
    rows = [[str(layer), *(f"{x['shares'][s]:.2f} ({x['sizes'][s]:.2f})" for s in MODALITIES), f"{x['bos']:.2f}",
             f"{x['concentration'][0.1]:.2f}", f"{x['concentration'][0.5]:.2f}", f"{x['capture'][STORED_SHARE]:.2f}",
             f"{x['capture'][CORE_SHARE]:.2f}"] for layer, x in enumerate(layers)]
    lines = [f"{result['n_captions']} captions, dense attention, mean over decode steps", "",
             *markdown_table(head, rows)]
    layer_head = ["layer", *(str(b) for b in range(len(layers)))]
    lines += ["", f"{STORED_SHARE:.0%}-PPCI of the last prompt token's image ranking between layers", "",
              *markdown_table(layer_head, [[str(a), *(f"{v:.2f}" for v in row)]
                                           for a, row in enumerate(result["ppci_layers"])])]
    if layers[0]["ppci_scenes"] is not None:
        lines += ["", f"{STORED_SHARE:.0%}-PPCI of two different scenes' last-prompt-token image rankings, same layer "
                  f"(unrelated sets: {STORED_SHARE:.2f})", "",
                  *markdown_table(layer_head, [["two scenes", *(f"{x['ppci_scenes']:.2f}" for x in layers)]])]
    distances = [d for d in (1, 2, 3, 4, 8, 16) if d in layers[0]["ppci_steps"]]
    lines += ["", f"{CORE_SHARE:.0%}-PPCI of the image ranking of two decode steps d apart "
                  f"(random sets: {CORE_SHARE:.2f})", "",
              *markdown_table(["layer", *(f"d={d}" for d in distances)],
                              [[str(layer), *(f"{x['ppci_steps'][d]:.2f}" for d in distances)]
                               for layer, x in enumerate(layers)])]
    if "object_coverage" in result:
        lines += coverage_table(result["object_coverage"], "object",
                                f"Share of each object's patches in the prefill top {STORED_SHARE:.0%} (random sets: "
                                f"{STORED_SHARE:.2f}), by the order the caption names the objects")
    if "band_coverage" in result:
        lines += coverage_table(result["band_coverage"], "band",
                                f"Share of each horizontal band of the image in the prefill top {STORED_SHARE:.0%} "
                                f"(random sets: {STORED_SHARE:.2f}), top to bottom")
    if "object_attention" in result:
        lines += object_attention_table(result["object_attention"])
    if "hires_coverage" in result:
        lines += hires_coverage_table(result["hires_coverage"])
    if "choice_by_layer" in result:
        lines += choice_table(result["choice_by_layer"])
    if "hidden_object_recall" in result:
        lines += hidden_object_table(result["hidden_object_recall"])
    return "\n".join(lines)


FIGURES = ("attention-shares.png", "ppci-steps.png")  # what --out receives


def save_figures(result: dict, folder: Path, replace: bool = False) -> list[Path]:
    """FIGURES: attention-shares.png (per layer: attention on each segment against its share of the tokens)
    and ppci-steps.png (the core ranking's PPCI against step distance, per layer)."""
    layers = result["layers"]
    shares = {f"{s} attention": [(i, x["shares"][s]) for i, x in enumerate(layers)] for s in MODALITIES}
    shares |= {f"{s} tokens": [(i, x["sizes"][s]) for i, x in enumerate(layers)] for s in MODALITIES}
    steps = {f"layer {i}": list(x["ppci_steps"].items()) for i, x in enumerate(layers)}
    steps["random sets"] = [(1, CORE_SHARE), (MAX_DISTANCE, CORE_SHARE)]
    paths = [folder / name for name in FIGURES]
    save_line_plot(paths[0], shares, x_label="decoder layer", y_label="share", x_ticks=max(1, len(layers) - 1),
                   title="toy LLaVA: attention of the decode steps per segment (solid), each segment's share of "
                         "the tokens (dashed)",
                   x_range=(0, len(layers) - 1), y_range=(0, 1), dashed=tuple(n for n in shares if "tokens" in n),
                   colour_of={f"{s} tokens": f"{s} attention" for s in MODALITIES}, replace=replace)
    save_line_plot(paths[1], steps, x_label="distance between decode steps", y_label=f"{CORE_SHARE:.0%}-PPCI",
                   title=f"toy LLaVA: how alike the image top-{CORE_SHARE:.0%} sets of two decode steps are",
                   x_range=(0, MAX_DISTANCE), y_range=(0, 1), x_ticks=8, dashed=("random sets",), replace=replace)
    return paths


def run(args) -> dict:
    check_stdout_open("results", {"--out": args.out})
    if args.n < 1:
        raise UserError(f"--n must be at least 1, got {args.n}")
    if args.force and args.out is None:
        raise UserError("--force replaces the figures in --out: give --out too")
    if args.out is not None:  # checked before the minutes of work
        check_picture_folder(args.out, "--out", FIGURES, [args.weights], args.force)
    check_model_folder(args.weights, "--weights", "tinyavl.toy.train")
    model, processor = load_pretrained(args.weights, device="cpu", dtype="float32")
    if model.config.is_next:
        raise UserError(f"{args.weights} is a LLaVA-1.6: the study maps attention onto one square grid of image "
                        "tokens, a LLaVA-1.5's (weights/toy)")
    if model.config.hires is not None:
        # Its scenes would have to be fine ones, read through its high-resolution view at every step.
        raise UserError(f"{args.weights} is a FlexAttention toy: the study asks plain scenes at the low "
                        "resolution, the first toy's (weights/toy)")
    vision, side = model.config.vision, IMAGE_SIZE // PATCH
    if (vision.image_size, vision.patch_size, model.config.num_image_tokens) != (IMAGE_SIZE, PATCH, side ** 2):
        # Its measures read image token i as the scene's patch i (SceneObject.patches).
        raise UserError(f"{args.weights} sees {vision.image_size} px images in {vision.patch_size} px patches as "
                        f"{model.config.num_image_tokens} image tokens: the study reads each image token as one "
                        f"of the scenes' {side} x {side} patches, the toy's "
                        f"({IMAGE_SIZE} px, {PATCH} px patches, no CLS token)")
    questions = held_out_set(args.seed, args.n)
    captions = caption_questions(questions)
    recordings = record_captions(model, processor, captions)
    result = study(recordings)
    scenes = [question.scene for question in captions]                               # the recordings' scenes
    result["object_coverage"] = object_coverage(recordings, scenes)
    result["band_coverage"] = band_coverage(recordings, side, GRID)
    result["object_attention"] = object_attention(recordings, scenes)
    result["hires_coverage"] = hires_coverage(recordings, scenes, side)
    result["choice_by_layer"] = choice_by_layer(model, processor, questions)
    result["hidden_object_recall"] = hidden_object_recall(model, processor, questions)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        for path in save_figures(result, args.out, replace=args.force):
            print(f"wrote {path}", file=sys.stderr)
    return result


def main(argv=None) -> int:
    parser = ArgumentParser(description=first_paragraph(__doc__))
    parser.add_argument("--weights", type=given_path, default=TOY_WEIGHTS, help="the toy model folder")
    parser.add_argument("--seed", type=int, default=1, help="which held-out set")
    parser.add_argument("--n", type=int, default=100,
                        help="held-out scenes: their captions recorded, their \"where\" and caption prompts scored, "
                             "their objects hidden one at a time")
    parser.add_argument("--out", type=given_path, default=None, help="folder for the two figures (default: none)")
    parser.add_argument("--force", action="store_true", help="replace the figures if --out holds them")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    return run_command(run, args, show=lambda result: print(report_markdown(result)))


if __name__ == "__main__":
    sys.exit(main())
