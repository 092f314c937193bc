"""Train the toy LLaVA from scratch on synthetic scenes, on a CPU, and write it as a llava-hf folder.

    python -m tinyavl.toy.train --out weights/toy --force    # the committed model (seed 0), replaced

The model is tinyavl's own LlavaForConditionalGeneration (tinyavl/model.py), small: a 2-layer CLIP-style
ViT on 96 px images with 8 px patches (144 image tokens), the two-layer MLP projector, and a 4-layer Llama
decoder with grouped-query attention. Prompts are LLaVA-1.5's own conversation, system prompt first:
"<s> A chat between ... questions. USER: <image>\n{question} ASSISTANT:", so the image block (144
tokens) dominates the prompt (32 sys tokens before it, 6-11 of question after), as LLaVA's 576 do. The
folder it writes (config.json, model.safetensors, tokenizer.json, preprocessor_config.json,
processor_config.json with the system prompt and a llava-hf processor's keys) loads through
`tinyavl.load_pretrained` exactly as a real llava-1.5-7b-hf folder does, and through transformers too.

What makes such a small model learn the task in an hour rather than a day:
- Objects sit on a grid of places (tinyavl/toy/scenes.py), each place 3 x 3 patches.
- The ViT's position embedding starts as a 2-D sine-cosine table, so patches know where they are.
- An auxiliary loss on the image features (the projector's output, what the decoder reads) asks every
  patch token which shape, colour and digit it shows, scored against the decoder's own word embeddings
  of those names. It stands in for CLIP's pre-training and LLaVA's projector alignment stage, which give
  real LLaVA image tokens the decoder can already read, near the words that name what they show.
- Every training image carries several question-answer turns (the llava-1.5 multi-turn chat format),
  so one image pass teaches several answers. Only answer tokens (and their </s>) are trained.
- A word-level tokenizer of 66 entries keeps the sequences short.

Training has two stages, both run by the one command:
1. `train`: the model from scratch on the task (7000 steps), every image token visible.
2. `tune`: 2000 more steps (a fresh optimiser, a scene stream of its own) with image-token dropout in
   every sequence (`hide_image_tokens`): a uniformly random fraction, uniform on [0, 0.75), of the image
   tokens is hidden from the whole sequence (attention_mask 0, positions kept). The draw is uniform and
   blind to attention and to every KV policy; its loss, though, is of the kind the `random` control
   inflicts (a uniform share of the image gone), so the model is trained to survive that control in
   particular (the README reads the comparisons with `random` so).
Why: after stage 1 each fact is read from the few patches the decoder learnt to look at, so a random
half of the image breaks a caption; stage 2 makes the decoder read a fact from any token that shows it,
the redundancy a real LLaVA has (FastV: a random half of LLaVA-1.5's image tokens keeps 98.9% of its
score). Dropout from the first step (`--image-dropout F`, in the share `--image-dropout-share` of the
sequences) gives that redundancy too, but the model then reads places less well ("where": tutorial/09);
stage 2 keeps what stage 1 learnt. `--tune-masks rectangles` hides rectangles of image tokens in stage 2
instead (`hide_image_rectangles`; not part of the committed recipe), which often hides a whole object
and so asks the tower to copy objects beyond their place. Tutorial chapter 9 has the measurements of these
recipes.

`--checkpoint FILE` keeps the training state in FILE every CHECKPOINT_EVERY steps and after each stage's
last (`Checkpoint`: the weights, the patch probe, AdamW's moments, the loss history, where the scene stream
and the dropout draws are, and the run's settings with its stage); the same command run again after an
interruption goes on from there (in stage 2, without running stage 1 again; no batch of a step done is
drawn again), ends with the weights one uninterrupted run writes, bit for bit on the same machine and
thread count, and deletes the file once --out is written. `--checkpoint` cannot be combined with
`--vision-steps`: stage 0 (below) keeps no state.

`--vision-steps N` adds a stage 0 in front (`pretrain_vision`, not part of the committed recipe): the
vision tower alone for N steps, as CLIP is trained apart from LLaVA, then frozen in stages 1 and 2, as
LLaVA-1.5 freezes CLIP. Why: a tower trained end to end with the decoder keeps each object in its own
place (hide the 9 tokens of an object's place and the caption never names it: tutorial/04), where a
real CLIP spreads an image over its tokens. Tutorial chapter 9 has what it measured.
"""
import inspect
import json
import math
import os
import random
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

from tinyavl.cli import (TOY_WEIGHTS, ArgumentParser, check_training_args, first_paragraph, flag, given_path,
                         output_file, print_progress, run_main)
from tinyavl.errors import UserError
from tinyavl.files import (check_new_folder, check_output_file, check_utf8_path, write_file_atomically,
                           write_folder_atomically)
from tinyavl.model import LlavaConfig, LlavaForConditionalGeneration, TextConfig, VisionConfig
from tinyavl.processing import CLIP_MEAN, CLIP_STD, IMAGE_TOKEN, LLAVA_SYSTEM_PROMPT, Processor
from tinyavl.toy.evaluate import evaluate, held_out_set, reads_fine_scenes
from tinyavl.toy.scenes import (COLOURS, DIGITS, FINE_SCALE, GRID, IMAGE_SIZE, PATCH, PROMPT_KINDS, SHAPES, Scene,
                                SceneObject, SceneStream)

BOS_TOKEN, EOS_TOKEN = "<s>", "</s>"  # a Llama tokenizer's
SPECIAL_TOKENS = ["<unk>", BOS_TOKEN, EOS_TOKEN, "<pad>", IMAGE_TOKEN]
TURNS = 4            # question-answer turns a training sequence holds (`chat_example`)
IMAGE_DROPOUT = 0.0  # the largest fraction of a training sequence's image tokens hidden (off: see hide_image_tokens)
IMAGE_DROPOUT_SHARE = 1.0  # the share of training sequences that get image-token dropout at all
TUNE_STEPS = 2000    # stage 2 (`tune`): steps with image-token dropout in every sequence
TUNE_DROPOUT = 0.75  # stage 2: the largest fraction of a sequence's image tokens hidden
TUNE_MASKS = ("tokens", "rectangles")  # stage 2 hides scattered tokens (`hide_image_tokens`) or rectangles
VISION_HIDDEN = 0.75  # stage 0: the largest fraction of an image hidden from the readout
CHECKPOINT_EVERY = 100  # steps between two saves of the training state (--checkpoint): about a minute here
DROPOUT_STATE = "dropout_generator"  # the checkpoint's tensor that holds the dropout generator's state
HIRES_RAMP = 0.1     # FlexAttention: its blend alpha rises linearly from 0 to 1 over this share of the steps


# ---------------------------------------------------------------------------------------------------
# Tokenizer: one id per word, trained with the `tokenizers` library on the scenes' own text.
# ---------------------------------------------------------------------------------------------------

def train_tokenizer(n_scenes: int = 500) -> Tokenizer:
    """A lowercasing word-level tokenizer whose post-processor puts <s> first, as Llama's does."""
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()  # words, and punctuation as its own token
    corpus, stream = [], SceneStream("vocab", 0)
    for _ in range(n_scenes):
        scene, rng = next(stream)
        turns = [scene.ask(kind, rng) for kind in PROMPT_KINDS]
        corpus += [f"USER: {question} ASSISTANT: {answer}" for question, answer in turns]
    # Every word must be in the vocabulary even if the sample above missed it.
    corpus += [LLAVA_SYSTEM_PROMPT, " ".join(COLOURS), " ".join(SHAPES), " ".join(str(d) for d in DIGITS)]
    tokenizer.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS, min_frequency=1))
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", special_tokens=[(BOS_TOKEN, tokenizer.token_to_id(BOS_TOKEN))])
    return tokenizer


# ---------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------

def toy_config(vocab_size: int, image_token_id: int, vision_width: int = 96, vision_layers: int = 2,
               text_width: int = 128, text_layers: int = 4) -> LlavaConfig:
    """The toy architecture: LLaVA-1.5's, scaled down (144 image tokens, GQA with 2 KV heads)."""
    vision = VisionConfig(hidden_size=vision_width, intermediate_size=4 * vision_width,
                          num_hidden_layers=vision_layers, num_attention_heads=4, image_size=IMAGE_SIZE,
                          patch_size=PATCH)
    text = TextConfig(vocab_size=vocab_size, hidden_size=text_width, intermediate_size=3 * text_width,
                      num_hidden_layers=text_layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024, rms_norm_eps=1e-5,
                      bos_token_id=1, eos_token_id=2)  # SPECIAL_TOKENS' order gives <s> id 1, </s> id 2
    # The last ViT layer feeds the projector (real LLaVA reads the second to last of CLIP's 24).
    return LlavaConfig(text=text, vision=vision, image_token_id=image_token_id, vision_feature_layer=-1)


def sincos_2d(grid: int, width: int) -> torch.Tensor:
    """A (grid * grid, width) table: half the channels encode the row, half the column (MAE's recipe)."""
    quarter = width // 4
    freqs = 1.0 / 10000 ** (torch.arange(quarter) / quarter)           # (width/4,)
    coords = torch.arange(grid, dtype=torch.float32)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")          # (grid, grid) each
    parts = []
    for axis in (rows, cols):
        angles = axis.reshape(-1, 1) * freqs                              # (grid^2, width/4)
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1)                                        # (grid^2, width)


def init_weights(model: LlavaForConditionalGeneration) -> None:
    """Small normal weights (std 0.02), zero biases, and the 2-D sin-cos ViT position table."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
    embeddings = model.vision_tower.vision_model.embeddings
    nn.init.normal_(embeddings.class_embedding, std=0.02)
    grid = model.config.vision.patches_per_side
    with torch.no_grad():
        embeddings.position_embedding.weight[0].zero_()  # the CLS slot
        embeddings.position_embedding.weight[1:] = sincos_2d(grid, model.config.vision.hidden_size)


# What the probe names on each patch, one tuple of words per attribute: class i + 1 is the i-th word,
# class 0 is "nothing there". Both the targets and the probe's class vectors follow this order.
PATCH_CLASSES = (tuple(SHAPES), tuple(COLOURS), tuple(str(digit) for digit in DIGITS))


def class_ids(obj: SceneObject) -> tuple[int, int, int]:
    """The object's (shape, colour, digit) classes in PATCH_CLASSES' numbering (digit 0: it has none)."""
    shapes, colours, digits = PATCH_CLASSES
    digit = 0 if obj.digit is None else digits.index(str(obj.digit)) + 1
    return shapes.index(obj.shape) + 1, colours.index(obj.colour) + 1, digit


class PatchProbe(nn.Module):
    """The auxiliary loss: from each image feature (the projector's output), the shape, colour and digit
    its patch shows (class 0 = nothing there). A class is scored by the feature's dot product with the
    decoder's own word embedding of its name ("circle", "red", "5"), so the image token of a red circle
    is pulled towards the words a question names it by: what LLaVA's projector-alignment stage does with
    captions. Only the "nothing" vectors belong to the probe; they are not in the folder the trainer writes
    (a training checkpoint keeps them, to resume)."""

    def __init__(self, tokenizer: Tokenizer, width: int):
        super().__init__()
        self.name_ids = [torch.tensor([tokenizer.token_to_id(word) for word in words]) for words in PATCH_CLASSES]
        self.nothing = nn.Parameter(torch.zeros(len(PATCH_CLASSES), width))  # class 0 of each attribute

    def logits(self, features, word_embeddings) -> list[torch.Tensor]:
        """features (B, P, C), word_embeddings (vocab, C) -> per attribute, (B, P, 1 + names) class scores."""
        return [features @ torch.cat([self.nothing[i:i + 1], word_embeddings[ids]]).T  # classes (1 + names, C)
                for i, ids in enumerate(self.name_ids)]

    def loss(self, features, targets, word_embeddings):  # targets (B, P, 3): one column per attribute
        return attribute_loss(self.logits(features, word_embeddings), targets)


def attribute_loss(scores, targets) -> torch.Tensor:
    """The mean over attributes of the cross-entropy of scores[i] (..., classes) against targets[..., i];
    an attribute whose targets are all -100 (ignored: a fine scene's low-resolution digits) is left out."""
    named = [i for i in range(len(scores)) if (targets[..., i] != -100).any()]
    return sum(F.cross_entropy(scores[i].flatten(0, -2), targets[..., i].flatten()) for i in named) / len(named)


def patch_targets(scene: Scene, fine_map: bool = False) -> torch.Tensor:
    """(P, 3) class ids per patch: shape and colour on every patch that shows the shape, the digit on
    every patch that shows the digit. A fine scene's low-resolution image shows no legible digit: its
    digit column is -100 (no target, cross_entropy's ignore_index). fine_map: the patches of a fine scene's
    high-resolution map (FINE_SCALE x as many a side), where its small digits are legible."""
    if fine_map and not scene.fine:  # a plain scene's digits are large: the fine map's patches would be wrong
        raise ValueError("high-resolution patch targets are a fine scene's")
    scale = FINE_SCALE if fine_map else 1
    side = IMAGE_SIZE * scale // PATCH
    targets = torch.zeros(side * side, 3, dtype=torch.long)
    legible = fine_map or not scene.fine
    if not legible:
        targets[:, 2] = -100
    for obj in scene.objects:
        shape, colour, digit = class_ids(obj)
        patches = obj.patches(scale)
        targets[patches, 0] = shape
        targets[patches, 1] = colour
        if digit and legible:
            targets[obj.digit_patches(fine_map), 2] = digit
    return targets


def tile_patch_targets(scene: Scene) -> torch.Tensor:
    """((1 + FINE_SCALE^2) P, 3): a fine scene's patch targets in the order a LLaVA-1.6 toy's crops reach
    its projector (tinyavl/anyres.py): the base crop (the whole image at 96 px), then the FINE_SCALE x
    FINE_SCALE tiles of the 384 px canvas in reading order, each tile's patches in reading order."""
    side = IMAGE_SIZE // PATCH
    # (tile row, y, tile col, x, 3)
    fine_targets = patch_targets(scene, fine_map=True).view(FINE_SCALE, side, FINE_SCALE, side, 3)
    # (tile row, tile col, y, x, 3), flattened: tile by tile
    tiles = fine_targets.transpose(1, 2).reshape(FINE_SCALE ** 2 * side * side, 3)
    return torch.cat([patch_targets(scene), tiles])


# ---------------------------------------------------------------------------------------------------
# Data: one image, several chat turns
# ---------------------------------------------------------------------------------------------------

def chat_example(scene: Scene, rng: random.Random, processor: Processor, turns: int):
    """(input_ids, labels, image) for one image and `turns` question-answer turns in llava-1.5's chat
    format; image: the processor's pixel_values [1, 3, H, W] (and hires_pixel_values for a FlexAttention
    processor; LLaVA-1.6's [1, n_crops, 3, H, W] with image_sizes), as it returns them for the first turn.

    The first turn is built by the processor, exactly as at inference; later turns follow it as
    "USER: {question} ASSISTANT: {answer}</s>". labels is -100 except on answer tokens and their </s>.
    """
    kinds = rng.sample(PROMPT_KINDS, turns)
    eos = processor.tokenizer.token_to_id(EOS_TOKEN)
    ids, labels = [], []
    for i, kind in enumerate(kinds):
        question, answer = scene.ask(kind, rng)
        if i == 0:
            first_turn = processor(processor.chat_prompt(question), image=scene.image())
            prompt = first_turn["input_ids"][0].tolist()
        else:
            prompt = processor.tokenizer.encode(f"USER: {question} ASSISTANT:", add_special_tokens=False).ids
        reply = processor.tokenizer.encode(answer, add_special_tokens=False).ids + [eos]
        ids += prompt + reply
        labels += [-100] * len(prompt) + reply
    image = {key: value for key, value in first_turn.items() if key != "input_ids" and value is not None}
    return ids, labels, image


def make_batch(stream, processor: Processor, batch_size: int, turns: int, pad_id: int) -> dict:
    """A right-padded batch: input_ids, labels (B, T); pixel_values (B, 3, H, W); patch targets (B, P, 3).
    A FlexAttention processor's batch also has hires_pixel_values (B, 3, scale H, scale W) and
    hires_patch_targets (B, scale^2 P, 3); a LLaVA-1.6 processor's has pixel_values (B, n_crops, 3, H, W),
    image_sizes (B, 2) and the patch targets of every crop (`tile_patch_targets`)."""
    examples, targets, hires_targets = [], [], []
    for _ in range(batch_size):
        scene, rng = next(stream)
        examples.append(chat_example(scene, rng, processor, turns))
        targets.append(tile_patch_targets(scene) if processor.image_grid_pinpoints else patch_targets(scene))
        hires_targets.append(patch_targets(scene, fine_map=True) if processor.hires_scale else None)
    T = max(len(ids) for ids, _, _ in examples)
    input_ids = torch.full((batch_size, T), pad_id)
    labels = torch.full((batch_size, T), -100)
    for b, (ids, answer_labels, _) in enumerate(examples):
        input_ids[b, :len(ids)] = torch.tensor(ids)
        labels[b, :len(answer_labels)] = torch.tensor(answer_labels)
    images = {key: torch.cat([image[key] for _, _, image in examples]) for key in examples[0][2]}
    batch = {"input_ids": input_ids, "labels": labels, **images, "patch_targets": torch.stack(targets)}
    if processor.hires_scale:
        batch["hires_patch_targets"] = torch.stack(hires_targets)
    return batch


# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------

def hide_image_tokens(input_ids, image_token_id: int, max_fraction: float, generator,
                      share: float = IMAGE_DROPOUT_SHARE) -> torch.Tensor:
    """attention_mask (B, T) for image-token dropout: each sequence is picked with probability `share`,
    and in a picked sequence a uniformly random fraction (drawn from [0, max_fraction)) of its image
    tokens, chosen uniformly at random, is hidden from every query; their positions stay. Text tokens
    are never hidden.

    Why: a real LVLM's image is redundant (FastV's LLaVA-1.5 keeps 98.9% of its score with a random
    half of the image tokens gone) because CLIP's 24 layers spread each object over many tokens and
    the decoder reads it from many of them. A toy trained in an hour reads each fact from the few
    patches that show it most (its 2-layer tower spreads little); hiding random image tokens makes the
    decoder read a fact from any of the object's tokens, as dropout does for units (Srivastava et al.,
    2014). Nothing here reads a KV policy: the draw is uniform and blind to attention, and hidden tokens
    are hidden from the whole sequence, question and answers alike, not evicted from a cache after a
    prefill. Its distribution is, though, the `random` control's (a uniform share of the image gone):
    the control the model is trained to survive."""
    visible = torch.ones_like(input_ids)                                         # (B, T)
    for row in range(input_ids.shape[0]):
        # No draw when every sequence is picked, so share 1 replays the masks of a run without the knob.
        if share < 1 and torch.rand((), generator=generator).item() >= share:
            continue
        image_positions = (input_ids[row] == image_token_id).nonzero().flatten()  # (N_img,)
        fraction = max_fraction * torch.rand((), generator=generator).item()
        n_hidden = int(fraction * len(image_positions))
        order = torch.randperm(len(image_positions), generator=generator)
        visible[row, image_positions[order[:n_hidden]]] = 0
    return visible


def hide_image_rectangles(input_ids, image_token_id: int, max_fraction: float, generator) -> torch.Tensor:
    """attention_mask (B, T) that hides, in every sequence, random rectangles of image tokens covering a
    uniformly random fraction (from [0, max_fraction)) of the image (`hide_rectangles`, on the square grid
    of patches in reading order, as the image block lists them). Text tokens are never hidden.

    Why: scattered tokens (`hide_image_tokens`) nearly always leave a few of every object's patches, so
    the decoder can keep reading each object only where it lies. A rectangle often hides a whole object;
    naming it then asks the tower to copy it into the tokens that stay, as large ViTs spread what they
    see. Blind to attention and to every KV policy, like `hide_image_tokens`."""
    n_img = int((input_ids[0] == image_token_id).sum())
    side = math.isqrt(n_img)
    if side * side != n_img:  # a LLaVA-1.6 block (tiles, newlines) is no square of patches
        raise ValueError(f"hide_image_rectangles needs a square image block, got {n_img} image tokens")
    image_visible = hide_rectangles(input_ids.shape[0], side, max_fraction, generator)  # (B, N_img)
    visible = torch.ones_like(input_ids)                                                # (B, T)
    visible[input_ids == image_token_id] = image_visible.flatten().to(visible.dtype)    # every row has N_img
    return visible


def hide_rectangles(batch_size: int, side: int, max_fraction: float, generator, max_edge: int = 8) -> torch.Tensor:
    """visible (B, side * side) 0/1, for stage 0 and for stage 2's `hide_image_rectangles`: per image, up to
    a uniformly random fraction (from [0, max_fraction)) of the patches is hidden, as random rectangles of
    1..max_edge patches a side (BEiT's blockwise masking, arXiv 2106.08254); it stops short of the fraction
    after 10 rectangles in a row that would overshoot it. Rectangles, not scattered patches, so that whole
    objects are often hidden: the readout can then name them only if the tower has copied them into the
    tokens that stay."""
    visible = torch.ones(batch_size, side, side)
    draw = partial(torch.randint, generator=generator)
    max_edge = min(max_edge, side)  # a rectangle fits in the image
    for mask in visible:  # (side, side): one image's tokens, 1 visible
        target = int(max_fraction * torch.rand((), generator=generator).item() * side * side)
        hidden, misses = 0, 0
        while hidden < target and misses < 10:  # a rectangle that overshoots the target is a miss
            height, width = int(draw(1, max_edge + 1, ())), int(draw(1, max_edge + 1, ()))
            top, left = int(draw(0, side - height + 1, ())), int(draw(0, side - width + 1, ()))
            newly_hidden = int(mask[top:top + height, left:left + width].sum())
            if 0 < newly_hidden <= target - hidden:
                mask[top:top + height, left:left + width] = 0
                hidden, misses = hidden + newly_hidden, 0
            else:
                misses += 1
    return visible.flatten(1)


def losses(model, probe, batch, hires_alpha: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(next-token loss on the answers, auxiliary patch loss) for one batch.

    A batch with hires_pixel_values trains FlexAttention: every row after the image (each answer token's
    row is the current token of its own decoding step) reads the blocks chosen for it, blended in by
    hires_alpha, and the patch loss is the mean of the low- and the high-resolution features'."""
    ids = batch["input_ids"]
    view = None
    if "hires_pixel_values" in batch:  # made before the hook below, which catches the low-resolution features
        image_end = int((ids[0] == model.config.image_token_id).nonzero()[-1]) + 1  # every sequence's image is there
        view = model.make_hires_view(ids, batch["hires_pixel_values"], hires_alpha, first_served=image_end)
    captured = {}
    hook = model.multi_modal_projector.register_forward_hook(
        lambda module, inputs, output: captured.update(features=output))  # image features (B, P, C_text)
    try:
        logits = model(ids, batch["pixel_values"], attention_mask=batch.get("attention_mask"),
                       image_sizes=batch.get("image_sizes"), hires_view=view)  # (B, T, vocab)
    finally:
        hook.remove()
    # Row t predicts token t + 1: logits (B (T-1), vocab) against labels (B (T-1),), -100 where no answer.
    lm_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)
    word_embeddings = model.language_model.model.embed_tokens.weight  # (vocab, C_text), shared with the decoder
    patch_loss = probe.loss(captured["features"], batch["patch_targets"], word_embeddings)
    if view is not None:
        patch_loss = (patch_loss + probe.loss(view.features, batch["hires_patch_targets"], word_embeddings)) / 2
    return lm_loss, patch_loss


def warmup_steps(steps: int, cap: int) -> int:
    """The learning rate's warm-up: a tenth of the steps, plus one, at most cap."""
    return min(cap, steps // 10 + 1)


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def write_safetensors(tensors: dict, path: Path, metadata: dict) -> None:
    """`tensors` as a safetensors file at `path`. Written with open(), not by safetensors' save_file, which
    makes a file only its owner can read (0600): this one gets what the umask gives any new file."""
    Path(path).write_bytes(safetensors_bytes(tensors, metadata=metadata))


@dataclass
class Checkpoint:
    """Where `optimise` keeps its training state, so that a run longer than a sitting can be interrupted
    and resumed: one safetensors file with the model's and the probe's tensors, AdamW's moments and the
    dropout generator's state, and in its metadata the steps done, the loss history, where the scene
    stream is (its rng's state) and `run`, the settings that made the run. A file
    saved by other settings is refused (`check`), so a resume never mixes two runs; the code is not among
    the settings: resume with the code that started the run. A later stage of a run (`main`'s stage 2) keeps
    its state in the same file: `after` holds the settings of the stage before, whose file this stage does
    not resume from but replaces at its first save (`main` runs this stage once that one is finished)."""
    path: Path
    run: dict
    every: int
    after: dict | None = None

    def save(self, step: int, model, probe, optimizer, history, stream: SceneStream, dropout_generator) -> None:
        tensors = {f"model.{key}": t for key, t in model.state_dict().items()}
        tensors |= {f"probe.{key}": t for key, t in probe.state_dict().items()}
        for index, state in optimizer.state_dict()["state"].items():  # exp_avg, exp_avg_sq, step per parameter
            tensors |= {f"optimizer.{index}.{name}": t for name, t in state.items()}
        tensors[DROPOUT_STATE] = dropout_generator.get_state()                     # (5056,) uint8
        tensors = {key: t.detach().contiguous() for key, t in tensors.items()}
        metadata = {"step": str(step), "history": json.dumps(history), "run": json.dumps(self.run),
                    "scenes": json.dumps(stream.rng.getstate())}
        # replace: the checkpoint is the training's own file, rewritten every `every` steps.
        write_file_atomically(self.path, lambda temporary: write_safetensors(tensors, temporary, metadata),
                              replace=True)

    def resumes(self) -> bool:
        """Whether the file at path holds this run's state to go on from (`check` first: a UserError where it
        is not a checkpoint, or is another run's)."""
        return self.check() == self.run

    def check(self) -> dict | None:
        """The settings the file at path was saved by: None where nothing is there (the run starts from its
        first step), else self.run or self.after. UserError if the file is not a checkpoint, or was saved by
        a run with other settings."""
        check_utf8_path(self.path, "file")
        if os.path.islink(self.path):
            # The first save would replace the link itself by a file (os.replace), and the end of the run
            # delete that file: the user's link gone, whatever it points at left behind.
            raise UserError(f"{self.path} is a link: give the path of a file, or of none yet")
        if not self.path.exists():
            return None
        try:
            with safe_open(str(self.path), framework="pt") as file:
                metadata = file.metadata() or {}  # None: a safetensors file written without any
                dropout_state = file.get_tensor(DROPOUT_STATE) if DROPOUT_STATE in file.keys() else None
            saved = json.loads(metadata["run"])
            if not isinstance(saved, dict):
                raise ValueError(f"its settings are {metadata['run']!r}, not what a training saves")
            # Read only to refuse what load() cannot use: steps done, a (step, loss, loss) for each of steps
            # 0 .. step - 1, and the two draws' states.
            step, history = int(metadata["step"]), json.loads(metadata["history"])
            entries = isinstance(history, list) and all(
                isinstance(h, list) and len(h) == 3 and all(isinstance(x, (int, float)) for x in h) for h in history)
            if step < 0 or not entries or [h[0] for h in history] != list(range(step)):
                raise ValueError(f"its step {metadata['step']!r} or its history is not what a training saves")
            random.Random().setstate(rng_state(json.loads(metadata["scenes"])))  # raises if it is not a state
            if dropout_state is None:
                raise ValueError("it holds no dropout generator's state")
            torch.Generator().set_state(dropout_state)                              # RuntimeError if not one
        except KeyError as err:
            raise UserError(f"{self.path} is not a training checkpoint (its metadata has no {err})") from None
        except (SafetensorError, OSError, TypeError, ValueError, OverflowError, RuntimeError) as err:
            raise UserError(f"{self.path} is not a training checkpoint ({err})") from None
        if saved not in (self.run, self.after):
            # Named against the stage of this run the file is nearest to: a file of another run's stage 1 is
            # told by its settings, not also by its stage.
            ours = min([run for run in (self.run, self.after) if run is not None],
                       key=lambda run: sum(saved.get(key) != run.get(key) for key in saved.keys() | run.keys()))
            differ = ", ".join(f"{key} {saved.get(key)} there, {ours.get(key)} here"
                               for key in sorted(saved.keys() | ours.keys()) if saved.get(key) != ours.get(key))
            raise UserError(f"{self.path} was saved by another run ({differ}): give the same settings or "
                            "another file")
        return saved

    def load(self, model, probe, optimizer, stream: SceneStream, dropout_generator) -> tuple[int, list]:
        """Put the state this run saved (`resumes`) into model, probe, optimizer, the scene stream and the
        dropout generator, so that the next batch and its draws are those the saved run would have taken next;
        returns (steps done, history of (step, lm_loss, patch_loss))."""
        with safe_open(str(self.path), framework="pt") as file:
            metadata, tensors = file.metadata(), {key: file.get_tensor(key) for key in file.keys()}
        stream.rng.setstate(rng_state(json.loads(metadata["scenes"])))
        dropout_generator.set_state(tensors.pop(DROPOUT_STATE))
        try:
            model.load_state_dict(without_prefix(tensors, "model."))
            probe.load_state_dict(without_prefix(tensors, "probe."))
        except RuntimeError as err:  # missing or unexpected keys, other shapes
            raise UserError(f"{self.path} holds another model's weights ({str(err).splitlines()[0]})") from None
        moments = {}  # AdamW's state: parameter index -> {exp_avg, exp_avg_sq: its shape; step: a scalar}
        params = [param for group in optimizer.param_groups for param in group["params"]]
        for key, t in without_prefix(tensors, "optimizer.").items():
            index, _, name = key.partition(".")
            param = params[int(index)] if index.isascii() and index.isdigit() and int(index) < len(params) else None
            shapes = {} if param is None else {"exp_avg": param.shape, "exp_avg_sq": param.shape, "step": ()}
            if name not in shapes or t.shape != shapes[name]:
                raise UserError(f"{self.path} holds another optimiser's state (optimizer.{key}, {tuple(t.shape)})")
            moments.setdefault(int(index), {})[name] = t
        if any(len(state) != 3 for state in moments.values()):
            raise UserError(f"{self.path} holds an optimiser state with a part of a parameter's missing")
        # The optimiser's own param_groups: only their lr differs from the saved run's, and optimise sets
        # it every step.
        optimizer.load_state_dict({"state": moments, "param_groups": optimizer.state_dict()["param_groups"]})
        return int(metadata["step"]), [tuple(entry) for entry in json.loads(metadata["history"])]


def check_checkpoint(checkpoint: Checkpoint, out: Path, inputs=()) -> None:
    """UserError unless the checkpoint file can be written, apart from the command's `inputs` and the folder
    --out it writes, and anything already there was saved by a run with the same settings (`check`)."""
    path = checkpoint.path
    check_output_file(path, "--checkpoint", inputs=inputs, suffixes=(".safetensors",), replace=True)  # resumed from
    if out.resolve() in path.resolve().parents:
        raise UserError(f"--checkpoint {path} is inside --out, which is replaced when it is written: choose "
                        "another path")
    if path.resolve() == out.resolve() or path.resolve() in out.resolve().parents:
        raise UserError(f"--checkpoint {path} is where --out {out} goes, or a folder above it: the file would "
                        "stand in its way; choose another path")
    try:
        checkpoint.check()
    except UserError as err:
        raise UserError(f"--checkpoint {err}") from None


def rng_state(saved) -> tuple:
    """A `random.Random` state (`getstate()`) from its JSON form, which has lists where the state has tuples."""
    version, internal, gauss_next = saved
    return version, tuple(internal), gauss_next


def without_prefix(tensors: dict, prefix: str) -> dict:
    """The entries of `tensors` whose key starts with prefix, the prefix taken off."""
    return {key[len(prefix):]: t for key, t in tensors.items() if key.startswith(prefix)}


def check_finite(grad_norm: torch.Tensor, step: int) -> None:
    """UserError, before the optimiser steps, once the gradients' norm (`clip_grad_norm_`'s) is NaN or infinite,
    as it is when the loss is: the step would make every weight NaN, and the run would train on and write
    them as a model, or save them over a good checkpoint (NaN weights resumed from a damaged one show here
    at the first step)."""
    if not torch.isfinite(grad_norm):
        raise UserError(f"the gradients are {grad_norm.item()} at step {step + 1}: the weights or the loss went NaN "
                        "or infinite (a damaged checkpoint, or a learning rate too high to train at); nothing was "
                        "written")


def adamw(params: list, lr: float) -> torch.optim.AdamW:
    """The optimiser of every training loop here (`optimise`, `pretrain_vision`)."""
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.01)


def take_step(optimizer, params: list, loss: torch.Tensor, step: int, lr: float) -> None:
    """One step of every training loop here (`optimise`, `pretrain_vision`) at learning rate lr, on the
    gradients of `loss`, their norm clipped to 1 (refused when it is not finite: `check_finite`)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    check_finite(torch.nn.utils.clip_grad_norm_(params, 1.0), step)
    optimizer.step()


def optimise(model, probe, processor, stream: SceneStream, steps: int, lr: float, warmup: int, batch_size: int,
             turns: int, image_dropout: float, image_dropout_share: float, dropout_generator,
             log_every: int, eval_every: int, log, tower_frozen: bool = False,
             mask_kind: str = "tokens", checkpoint: Checkpoint | None = None) -> list[tuple[int, float, float]]:
    """The training loop both stages share: `steps` AdamW steps (a fresh optimiser) on batches from
    `stream`, learning rate `learning_rate(step, steps, lr, warmup)`; returns the history of
    (step, lm_loss, patch_loss). Every eval_every steps (0: never) the greedy accuracy on 10 held-out
    scenes (seed 0) is logged. With tower_frozen the vision tower is not trained (LLaVA's recipe once
    its CLIP tower is trained). `mask_kind`, one of TUNE_MASKS, says how image_dropout hides image tokens.
    With a `checkpoint`, the training state is saved there every checkpoint.every steps and after the last
    (from which a later stage goes on), and a run that finds its own goes on from it: it ends with the
    weights the uninterrupted run ends with, bit for bit (same machine and thread count, both runs inside
    `deterministic_algorithms`, as `main` runs them). The global torch RNG is not saved: no step draws from
    it (every draw here has its own generator or stream, and those are saved)."""
    model.train().requires_grad_(True)
    if tower_frozen:
        model.vision_tower.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad] + list(probe.parameters())
    optimizer = adamw(params, lr)
    image_token_id, pad_id = model.config.image_token_id, processor.tokenizer.token_to_id("<pad>")
    history, done = [], 0
    if checkpoint and checkpoint.resumes():
        done, history = checkpoint.load(model, probe, optimizer, stream, dropout_generator)
        log(f"resuming after step {done} from {checkpoint.path}")
    start = time.perf_counter()
    for step in range(done, steps):
        batch = make_batch(stream, processor, batch_size, turns, pad_id)
        if image_dropout and mask_kind == "rectangles":
            batch["attention_mask"] = hide_image_rectangles(batch["input_ids"], image_token_id, image_dropout,
                                                            dropout_generator)
        elif image_dropout:
            batch["attention_mask"] = hide_image_tokens(batch["input_ids"], image_token_id, image_dropout,
                                                        dropout_generator, image_dropout_share)
        lm_loss, patch_loss = losses(model, probe, batch, hires_alpha=min(1.0, step / (HIRES_RAMP * steps)))
        take_step(optimizer, params, lm_loss + patch_loss, step, learning_rate(step, steps, lr, warmup))
        history.append((step, lm_loss.item(), patch_loss.item()))
        if (step + 1) % log_every == 0 or step + 1 == steps:
            seconds = time.perf_counter() - start
            recent = history[-log_every:]
            log(f"step {step + 1}/{steps}  answer loss {sum(h[1] for h in recent) / len(recent):.4f}  "
                f"patch loss {sum(h[2] for h in recent) / len(recent):.4f}  "
                f"lr {optimizer.param_groups[0]['lr']:.2e}  {(step + 1 - done) * batch_size / seconds:.1f} samples/s  "
                f"{seconds / 60:.1f} min")
        if eval_every and (step + 1) % eval_every == 0:
            model.eval()
            questions = held_out_set(seed=0, n_scenes=10, fine=reads_fine_scenes(model.config))
            report = evaluate(model, processor, questions)
            model.train()
            log(f"  held-out accuracy {report['accuracy']:.3f}: " +
                ", ".join(f"{kind} {acc:.2f}" for kind, acc in report["accuracy_by_type"].items()))
        if checkpoint and ((step + 1) % checkpoint.every == 0 or step + 1 == steps):
            checkpoint.save(step + 1, model, probe, optimizer, history, stream, dropout_generator)
    model.eval().requires_grad_(False)
    return history


def train(steps: int, batch_size: int = 32, lr: float = 2e-3, seed: int = 0, turns: int = TURNS,
          image_dropout: float = IMAGE_DROPOUT,
          image_dropout_share: float = IMAGE_DROPOUT_SHARE, vision_steps: int = 0, log_every: int = 100,
          eval_every: int = 0, config_overrides: dict | None = None, log=None, checkpoint: Checkpoint | None = None):
    """Train a toy model from scratch; returns (model, processor, history of (step, lm_loss, patch_loss)).

    image_dropout is the largest fraction of a sequence's image tokens `hide_image_tokens` hides (0: off),
    in the share image_dropout_share of the sequences. With vision_steps, stage 0 (`pretrain_vision`)
    trains the tower first, which then stays frozen.
    Every eval_every steps (0: never) the greedy accuracy on 10 held-out scenes (seed 0) is logged.
    With a checkpoint, stage 1 resumes (`optimise`); stage 0 does not save its state."""
    log = log or print_progress
    model, processor = new_model(seed, config_overrides)
    config = model.config
    probe = PatchProbe(processor.tokenizer, config.text.hidden_size)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params / 1e6:.2f} M parameters, {config.num_image_tokens} image tokens, "
        f"vocabulary {config.text.vocab_size}")
    if vision_steps:
        pretrain_vision(model, processor, vision_steps, batch_size, seed=seed, log=log)
        log(f"stage 1: {steps} steps, the vision tower frozen")
    history = optimise(model, probe, processor, SceneStream("train", seed), steps, lr, warmup_steps(steps, 300),
                       batch_size, turns, image_dropout, image_dropout_share,
                       dropout_generator=torch.Generator().manual_seed(seed), log_every=log_every,
                       eval_every=eval_every, log=log, tower_frozen=vision_steps > 0, checkpoint=checkpoint)
    return model, processor, history


def new_model(seed: int = 0, config_overrides: dict | None = None):
    """(model, processor): a toy model with its initial weights, drawn from `seed`, as `train` starts it."""
    torch.manual_seed(seed)
    tokenizer = train_tokenizer()
    image_token_id = tokenizer.token_to_id(IMAGE_TOKEN)
    config = toy_config(tokenizer.get_vocab_size(), image_token_id, **(config_overrides or {}))
    processor = Processor(tokenizer, image_token_id, config.num_image_tokens, IMAGE_SIZE, IMAGE_SIZE,
                          system_prompt=LLAVA_SYSTEM_PROMPT)
    model = LlavaForConditionalGeneration(config)
    init_weights(model)
    return model, processor


def tune(model, processor, steps: int, batch_size: int = 32, lr: float = 4e-4, seed: int = 0, turns: int = TURNS,
         image_dropout: float = TUNE_DROPOUT, tower_frozen: bool = False,
         mask_kind: str = "tokens", log_every: int = 100, eval_every: int = 0, log=None,
         checkpoint: Checkpoint | None = None):
    """Stage 2: go on training a trained model with image-token dropout in every sequence; returns the history.

    It starts from nothing but the weights (a fresh optimiser, a fresh probe, whose "nothing" vectors are
    not saved, and a scene stream of its own, "tune"), so it gives the same weights in the process that
    ran stage 1 and on the stage-1 folder loaded from disk. `mask_kind` (TUNE_MASKS) hides scattered image
    tokens (`hide_image_tokens`, the committed recipe) or rectangles of them (`hide_image_rectangles`).
    With a checkpoint, it resumes (`optimise`).
    Its masks are drawn from `seed`, as stage 1's dropout and stage 0's rectangles are: where an earlier stage
    drew the same kind of mask, with the same fraction, share and batch size (never in the committed recipe,
    whose stage 1 hides nothing), stage 2's masks repeat its masks step for step, on other scenes (stage 2's
    own stream), so no mask meets the same image twice; other draws share only the seed. A seed of
    its own per stage would end that, and with it every measured recipe of tutorial/09 that draws in stage 0
    or 1 being what its command writes."""
    if mask_kind not in TUNE_MASKS:
        raise ValueError(f"mask_kind must be one of {', '.join(TUNE_MASKS)}, got {mask_kind!r}")
    log = log or print_progress
    log(f"stage 2: {steps} steps with up to {image_dropout:.0%} of each sequence's image tokens hidden, as {mask_kind}")
    probe = PatchProbe(processor.tokenizer, model.config.text.hidden_size)
    return optimise(model, probe, processor, SceneStream("tune", seed), steps, lr, warmup_steps(steps, 100),
                    batch_size, turns, image_dropout, image_dropout_share=1.0,
                    dropout_generator=torch.Generator().manual_seed(seed), log_every=log_every,
                    eval_every=eval_every, log=log, tower_frozen=tower_frozen, mask_kind=mask_kind,
                    checkpoint=checkpoint)


# ---------------------------------------------------------------------------------------------------
# Stage 0: the vision tower alone, as CLIP is trained apart from LLaVA
# ---------------------------------------------------------------------------------------------------

PLACES = GRID * GRID


def place_index(obj: SceneObject) -> int:
    """The object's place in reading order, 0 .. PLACES - 1."""
    return (obj.row - 1) * GRID + obj.column - 1


def place_targets(scene: Scene) -> torch.Tensor:
    """(PLACES, 3) class ids per place (reading order): the shape, colour and digit of the object there
    (class 0: no object, or no digit)."""
    targets = torch.zeros(PLACES, 3, dtype=torch.long)
    for obj in scene.objects:
        targets[place_index(obj)] = torch.tensor(class_ids(obj))
    return targets


class SceneReadout(nn.Module):
    """Stage 0's two linear heads on the tower's tokens, trained with it and thrown away after (as CLIP's
    text tower is): `scene` names every place's shape, colour and digit from the mean of the visible
    tokens; `patch` names what each token's own patch shows (`patch_targets`), so that the tokens that
    carry the scene still say what they show, which is what the decoder reads them for."""

    def __init__(self, width: int):
        super().__init__()
        self.n_classes = [1 + len(words) for words in PATCH_CLASSES]
        self.scene = nn.Linear(width, PLACES * sum(self.n_classes))
        self.patch = nn.Linear(width, sum(self.n_classes))

    def place_logits(self, features, visible) -> tuple[torch.Tensor, ...]:
        """features (B, P, C), visible (B, P) 0/1 -> per attribute, (B, PLACES, classes) scores for each place."""
        pooled = (features * visible[..., None]).sum(1) / visible.sum(1, keepdim=True)  # (B, C)
        scores = self.scene(pooled).view(len(pooled), PLACES, sum(self.n_classes))      # (B, PLACES, all classes)
        return scores.split(self.n_classes, dim=-1)

    def patch_logits(self, features) -> tuple[torch.Tensor, ...]:
        """features (B, P, C) -> per attribute, (B, P, classes) scores for each token's own patch."""
        return self.patch(features).split(self.n_classes, dim=-1)

    def loss(self, features, visible, scene_targets, patch_targets):  # (B, PLACES, 3), (B, P, 3)
        return (attribute_loss(self.place_logits(features, visible), scene_targets)
                + attribute_loss(self.patch_logits(features), patch_targets))


def readout_recall(model, readout, processor, n_scenes: int = 100, seed: int = 0) -> dict:
    """On held-out scenes, per attribute (shape, colour, digit, where "no digit" is a class too), the share
    named right by the readout: "outside its place", each object from the mean of every image token
    outside the object's place (how far the tower spreads an object); "own patch", each token that shows
    an object, from that token alone (what the decoder can read from it)."""
    outside, own, n_objects, n_shown = torch.zeros(3), torch.zeros(3), 0, 0
    stream = SceneStream("eval", seed)
    with torch.no_grad():
        for _ in range(n_scenes):
            scene, _ = next(stream)
            features = model.vision_features(processor.preprocess(scene.image())[None])  # (1, P, C)
            place_truth, patch_truth = place_targets(scene), patch_targets(scene)         # (PLACES, 3), (P, 3)
            for obj in scene.objects:
                visible = torch.ones(1, features.shape[1])
                visible[0, obj.place_patches()] = 0
                place = place_index(obj)
                scores = readout.place_logits(features, visible)  # per attribute i: (1, PLACES, classes of i)
                outside += torch.tensor([float(s[0, place].argmax() == place_truth[place, i])
                                         for i, s in enumerate(scores)])
                n_objects += 1
            shown = patch_truth[:, 0] > 0                                                   # (P,)
            own += torch.stack([(s[0].argmax(-1) == patch_truth[:, i])[shown].float().sum()   # s (1, P, classes)
                                for i, s in enumerate(readout.patch_logits(features))])
            n_shown += int(shown.sum())
    return {"outside its place": (outside / n_objects).tolist(), "own patch": (own / n_shown).tolist()}


def pretrain_vision(model, processor, steps: int, batch_size: int = 32, lr: float = 1e-3, seed: int = 0,
                    max_hidden: float = VISION_HIDDEN, log_every: int = 100, log=None) -> list[float]:
    """Stage 0: train the vision tower alone to name every place's object from the mean of the image
    tokens left visible after `hide_rectangles`, and each token's own patch from the token (`SceneReadout`);
    returns the readout loss of every step.

    Why: real LLaVA's CLIP tower was trained apart, on a global objective (an image's pooled embedding
    against its caption's), by 24 layers over 400M images, and its tokens carry much of the image beyond
    their own patch (Darcet et al., arXiv 2309.16588). A small tower trained end to end on our questions
    keeps each object in its own place (tutorial/04 measures it). A global objective read from a random
    part of the image asks every token to carry the scene. The patch head keeps each token saying what its
    own patch shows: without it the frozen tokens lost that, and stage 1 learnt its lookups at a fraction
    of the speed (held-out accuracy 0.25 at step 2000, against 0.65 with the tower trained end to end).
    Nothing here sees the decoder or a KV policy."""
    log = log or print_progress
    log(f"stage 0: the vision tower alone, {steps} steps, up to {max_hidden:.0%} of each image hidden")
    generator = torch.Generator().manual_seed(seed)
    tower = model.vision_tower
    readout = SceneReadout(model.config.vision.hidden_size)
    params = list(tower.parameters()) + list(readout.parameters())
    optimizer = adamw(params, lr)
    side = model.config.vision.patches_per_side
    stream, losses_seen, start = SceneStream("vision", seed), [], time.perf_counter()
    tower.train().requires_grad_(True)
    for step in range(steps):
        scenes = [next(stream)[0] for _ in range(batch_size)]
        pixels = torch.stack([processor.preprocess(scene.image()) for scene in scenes])  # (B, 3, H, W)
        visible = hide_rectangles(batch_size, side, max_hidden, generator)             # (B, P)
        loss = readout.loss(model.vision_features(pixels), visible,
                            torch.stack([place_targets(scene) for scene in scenes]),   # (B, PLACES, 3)
                            torch.stack([patch_targets(scene) for scene in scenes]))   # (B, P, 3)
        take_step(optimizer, params, loss, step, learning_rate(step, steps, lr, warmup_steps(steps, 300)))
        losses_seen.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            seconds = time.perf_counter() - start
            recent = losses_seen[-log_every:]
            log(f"step {step + 1}/{steps}  readout loss {sum(recent) / len(recent):.4f}  "
                f"{(step + 1) * batch_size / seconds:.1f} samples/s  {seconds / 60:.1f} min")
    tower.eval()
    for what, (shape, colour, digit) in readout_recall(model, readout, processor).items():
        log(f"  named from {what}: shape {shape:.2f}, colour {colour:.2f}, digit {digit:.2f}")
    return losses_seen


# ---------------------------------------------------------------------------------------------------
# Writing the llava-hf folder
# ---------------------------------------------------------------------------------------------------

def hf_config(config: LlavaConfig) -> dict:
    """config.json in the layout transformers writes for llava-hf checkpoints."""
    # A Llama decoder: no sliding window (a Mistral field), and head_dim and RoPE scaling in transformers' form.
    left_out = ("head_dim", "rope_linear_factor", "sliding_window")
    text = {k: v for k, v in asdict(config.text).items() if k not in left_out}
    if config.text.rope_linear_factor != 1:  # in transformers' form, which the loader reads; plain RoPE has none
        text["rope_scaling"] = {"type": "linear", "factor": config.text.rope_linear_factor}
    vision = asdict(config.vision)
    hires_key = {} if config.hires is None else {"hires_config": asdict(config.hires)}  # tinyavl's own key
    tiles = {} if not config.is_next else {"image_grid_pinpoints": [list(p) for p in config.image_grid_pinpoints]}
    return {
        "architectures": [f"Llava{'Next' if config.is_next else ''}ForConditionalGeneration"],
        "model_type": "llava_next" if config.is_next else "llava",
        "image_token_index": config.image_token_id,
        "projector_hidden_act": config.projector_hidden_act,
        "vision_feature_layer": config.vision_feature_layer,
        "vision_feature_select_strategy": config.vision_feature_select_strategy,
        "torch_dtype": "float32",
        "text_config": {"model_type": "llama", "architectures": ["LlamaForCausalLM"], **text},
        "vision_config": {"model_type": "clip_vision_model", **vision},
        **hires_key,
        **tiles,
    }


def save_pretrained(model: LlavaForConditionalGeneration, processor: Processor, out: Path) -> None:
    """Write config.json, model.safetensors, tokenizer.json, preprocessor_config.json and
    processor_config.json (the system prompt, and a llava-hf processor's keys) into the folder `out`."""
    tensors = {key: t.detach().contiguous() for key, t in model.state_dict().items()}
    # CLIP's post_layernorm is part of the published layout although LLaVA never applies it.
    width = model.config.vision.hidden_size
    tensors["vision_tower.vision_model.post_layernorm.weight"] = torch.ones(width)
    tensors["vision_tower.vision_model.post_layernorm.bias"] = torch.zeros(width)
    write_safetensors(tensors, out / "model.safetensors", {"format": "pt"})
    config = hf_config(model.config)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    processor.tokenizer.save(str(out / "tokenizer.json"))
    preprocessor = {"crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}, "do_center_crop": True,
                    "do_normalize": True, "do_rescale": True, "do_resize": True,
                    "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
                    "image_processor_type": "CLIPImageProcessor", "resample": 3, "rescale_factor": 1 / 255,
                    "size": {"shortest_edge": IMAGE_SIZE}}
    if model.config.is_next:  # LLaVA-1.6's processor tiles on the same canvases as config.json
        preprocessor.update(image_grid_pinpoints=config["image_grid_pinpoints"],
                            image_processor_type="LlavaNextImageProcessor", aspect_ratio_setting="anyres")
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    # What a llava-hf processor_config.json holds, with which transformers' processor counts an image's
    # tokens (the tower's patch size, and its CLS token, which "default" drops), and the toy's system prompt.
    processor_config = {"num_additional_image_tokens": 1, "patch_size": model.config.vision.patch_size,
                        "system_prompt": processor.system_prompt,
                        "vision_feature_select_strategy": model.config.vision_feature_select_strategy}
    (out / "processor_config.json").write_text(json.dumps(processor_config, indent=2) + "\n")


def write_examples(out: Path, n: int = 4, fine: bool = False) -> None:
    """A few scenes (their own seed stream, never trained on; fine scenes with fine) as PNGs, with their
    truth in examples.json."""
    folder = out / "examples"
    folder.mkdir(parents=True, exist_ok=True)
    truth, stream = {}, SceneStream("example", 0, fine)
    for i in range(n):
        scene, rng = next(stream)
        scene.image().save(folder / f"scene-{i}.png")
        truth[f"scene-{i}.png"] = dict(scene.ask(kind, rng) for kind in PROMPT_KINDS)
    (folder / "examples.json").write_text(json.dumps(truth, indent=2) + "\n")


def write_toy(out: Path, model, processor, replace: bool, checkpoint_path: Path | None, fine: bool = False) -> None:
    """A trainer's last act: the toy written to `out` as a llava-hf folder with its example scenes (fine
    ones with fine), all at once (`write_folder_atomically`), then its training checkpoint, if it kept one,
    deleted: the run it could resume has ended."""
    def write(folder: Path) -> None:
        save_pretrained(model, processor, folder)
        write_examples(folder, fine=fine)

    write_folder_atomically(out, write, replace=replace)
    if checkpoint_path:
        checkpoint_path.unlink(missing_ok=True)
    print(f"wrote {out}")


@contextmanager
def torch_threads(n: int):
    """Inside, torch runs on n CPU threads (the weights depend on the count); the caller's count after, as a
    command run in a process that goes on (a test, a notebook) must leave it."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def deterministic_algorithms():
    """Inside, PyTorch picks its deterministic kernels. Why: without them training was not deterministic
    on this project's 2-core machine (which kernel varies was not pinned down): two 20-step runs of the
    committed recipe with 2 threads ended with different weights, and a whole run of the command drifted
    from the toy committed then (full attention 0.79 against its 0.988: tutorial/03). With them, the same seed,
    thread count and machine give the same weights, at the same speed."""
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def add_run_arguments(parser: ArgumentParser, eval_every: int, checkpoint_every: int) -> None:
    """How a training runs, the same flags in both trainers (checked by cli.check_training_args): its threads,
    its held-out reports, and a checkpoint to resume from."""
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (results depend on it)")
    parser.add_argument("--eval-every", type=int, default=eval_every,
                        help="steps between held-out accuracy reports (0: none; they do not change the weights)")
    parser.add_argument("--checkpoint", type=output_file,
                        help=f"a .safetensors file to keep the training state in every {checkpoint_every} steps and "
                             "to resume from if it is there (same settings only); removed once --out is written")


def main(argv=None) -> None:
    parser = ArgumentParser(description=first_paragraph(__doc__))
    parser.add_argument("--out", type=given_path, default=TOY_WEIGHTS, help="folder to write (llava-hf layout)")
    parser.add_argument("--force", action="store_true", help="replace --out if it already holds files")
    parser.add_argument("--steps", type=int, default=7000, help="stage 1: training steps")
    parser.add_argument("--batch-size", type=int, default=32, help="scenes per step")
    parser.add_argument("--lr", type=float, default=2e-3,
                        help="stage 1: AdamW's peak learning rate (stage 2 peaks at tune's 4e-4)")
    parser.add_argument("--seed", type=int, default=0,
                        help="the weights' initialisation, both stages' scene streams, the dropout draws and stage "
                             "0's rectangles")
    parser.add_argument("--image-dropout", type=float, default=IMAGE_DROPOUT,
                        help="stage 1: largest fraction of a sequence's image tokens hidden (0: none; stage 2's "
                             "is --tune-dropout)")
    parser.add_argument("--image-dropout-share", type=float, default=IMAGE_DROPOUT_SHARE,
                        help="stage 1: share of training sequences that get image-token dropout (the rest see every "
                             "token)")
    # The architecture flags default to toy_config's own defaults: the committed toy's, stated once.
    toy_defaults = {name: param.default for name, param in inspect.signature(toy_config).parameters.items()}
    parser.add_argument("--vision-layers", type=int, default=toy_defaults["vision_layers"],
                        help="the vision tower's depth")
    parser.add_argument("--text-layers", type=int, default=toy_defaults["text_layers"], help="the decoder's depth")
    parser.add_argument("--text-width", type=int, default=toy_defaults["text_width"],
                        help="the decoder's hidden size, a multiple of 8 (4 heads of an even size, for RoPE)")
    parser.add_argument("--vision-steps", type=int, default=0,
                        help="stage 0: steps of the vision tower alone, frozen after (0: none)")
    parser.add_argument("--tune-steps", type=int, default=TUNE_STEPS,
                        help="stage 2: steps of training with image-token dropout in every sequence (0: none)")
    parser.add_argument("--tune-masks", choices=TUNE_MASKS, default=TUNE_MASKS[0],
                        help="stage 2: hide scattered image tokens or rectangles of them")
    parser.add_argument("--tune-dropout", type=float, default=TUNE_DROPOUT,
                        help="stage 2: largest fraction of a sequence's image tokens hidden")
    add_run_arguments(parser, eval_every=500, checkpoint_every=CHECKPOINT_EVERY)
    args = parser.parse_args(argv)
    for name in ("vision_layers", "text_layers", "text_width"):
        if getattr(args, name) < 1:
            parser.error(f"{flag(name)} must be at least 1")
    for name in ("tune_steps", "vision_steps"):
        if getattr(args, name) < 0:
            parser.error(f"{flag(name)} must be at least 0, got {getattr(args, name)}")
    for name in ("image_dropout", "tune_dropout"):
        if not 0 <= getattr(args, name) < 1:
            parser.error(f"{flag(name)} must be in [0, 1), got {getattr(args, name)}")
    if args.text_width % 8:
        parser.error(f"--text-width must be a multiple of 8, got {args.text_width}")
    if not 0 < args.image_dropout_share <= 1:
        parser.error(f"--image-dropout-share must be in (0, 1], got {args.image_dropout_share}")
    check_training_args(parser, args)
    if args.checkpoint and args.vision_steps:
        parser.error("--checkpoint keeps stages 1 and 2, not --vision-steps' stage 0: give one of the two")
    try:
        check_new_folder(args.out, args.force)  # before the hour of training, not after
    except UserError as err:
        parser.error(f"--out: {err}")
    stage_1, stage_2 = stage_checkpoints(args) if args.checkpoint else (None, None)
    if stage_2:
        try:
            check_checkpoint(stage_2, args.out)  # the file may hold either stage of this run
        except UserError as err:
            parser.error(str(err))
    architecture = {name: getattr(args, name) for name in ("vision_layers", "text_layers", "text_width")}
    with torch_threads(args.threads), deterministic_algorithms():
        if stage_2 and stage_2.resumes():  # stage 1 is done: its weights are in stage 2's state
            model, processor = new_model(args.seed, architecture)
        else:
            model, processor, _ = train(args.steps, args.batch_size, args.lr, args.seed,
                                        image_dropout=args.image_dropout, image_dropout_share=args.image_dropout_share,
                                        vision_steps=args.vision_steps, eval_every=args.eval_every,
                                        config_overrides=architecture, checkpoint=stage_1)
        if args.tune_steps:
            tune(model, processor, args.tune_steps, args.batch_size, seed=args.seed, image_dropout=args.tune_dropout,
                 tower_frozen=args.vision_steps > 0, mask_kind=args.tune_masks, eval_every=args.eval_every,
                 checkpoint=stage_2)
    write_toy(args.out, model, processor, args.force, args.checkpoint)


def stage_checkpoints(args) -> tuple[Checkpoint, Checkpoint]:
    """The checkpoints of the command's two stages, in the one file --checkpoint names: each saved with the
    arguments that change the weights (not --out, --force, --eval-every or --checkpoint), the torch version
    and its stage; stage 2 goes on from stage 1's finished state (`Checkpoint.after`). Stage 1's settings hold
    stage 2's flags too: a file is only ever resumed by the command that wrote it."""
    run = {name: value for name, value in sorted(vars(args).items())
           if name not in ("out", "force", "eval_every", "checkpoint")} | {"torch": torch.__version__}
    stage_1 = Checkpoint(args.checkpoint, run | {"stage": 1}, CHECKPOINT_EVERY)
    return stage_1, Checkpoint(args.checkpoint, run | {"stage": 2}, CHECKPOINT_EVERY, after=stage_1.run)


if __name__ == "__main__":
    run_main(main)
