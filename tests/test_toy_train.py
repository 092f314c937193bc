"""The toy training script: data format, a few steps on a tiny config, and the folder it writes.

The full training (the committed weights/toy) is not run here: README "The toy LLaVA" has its command.
"""
import argparse
import itertools
import json
import math
import os
import random
import re
import stat
from dataclasses import replace
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import tinyavl
from tinyavl.cli import TOY_WEIGHTS
from tinyavl.errors import UserError
from tinyavl.loading import parse_config
from tinyavl.processing import LLAVA_SYSTEM_PROMPT
from tinyavl.toy.scenes import (DIGIT_COLOUR, FINE_SCALE, IMAGE_SIZE, MIN_PATCH_PIXELS, PATCH, Scene, SceneObject,
                                 SceneStream)
from tinyavl.toy import train as train_module
from tokenizers import Tokenizer
from tinyavl.toy.train import (PATCH_CLASSES, PLACES, Checkpoint, PatchProbe, SceneReadout, chat_example,
                               hf_config, hide_image_tokens, hide_rectangles, learning_rate, losses, make_batch,
                               patch_targets, place_targets, pretrain_vision, readout_recall, save_pretrained,
                               sincos_2d, train, train_tokenizer, tune, warmup_steps)

TINY = dict(vision_width=32, vision_layers=1, text_width=32, text_layers=2)


@pytest.fixture(scope="module")
def trained():
    """A tiny model after 60 steps: (model, processor, history)."""
    torch.manual_seed(0)
    return train(steps=60, batch_size=8, lr=3e-3, config_overrides=TINY, log=lambda *_: None)


def test_initial_loss_is_uniform_guessing_and_training_reduces_it(trained):
    model, _, history = trained
    first = sum(h[1] for h in history[:3]) / 3
    last = sum(h[1] for h in history[-5:]) / 5
    # Small initial weights give near-uniform logits: cross-entropy ln(vocab).
    assert abs(first - math.log(model.config.text.vocab_size)) < 0.3
    assert last < 0.6 * first, f"answer loss went {first:.3f} -> {last:.3f}"
    aux_first, aux_last = history[0][2], sum(h[2] for h in history[-5:]) / 5
    assert aux_last < 0.5 * aux_first, f"patch loss went {aux_first:.3f} -> {aux_last:.3f}"


def test_each_step_minimises_the_answer_loss_plus_the_patch_loss(monkeypatch):
    """The recipe that trained the committed toy: each step's loss is the answer loss plus the auxiliary patch
    loss, unweighted (two losses given by hand, the loss each step is taken on recorded)."""
    answer, patch = torch.tensor(1.5, requires_grad=True), torch.tensor(0.25, requires_grad=True)
    stepped = []
    monkeypatch.setattr(train_module, "losses", lambda *args, **kwargs: (answer, patch))
    monkeypatch.setattr(train_module, "take_step", lambda optimizer, params, loss, *args: stepped.append(loss.item()))
    train(steps=2, batch_size=2, config_overrides=TINY, log=lambda *_: None)
    assert stepped == [1.75, 1.75]


def current_umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: set it back at once
    os.umask(mask)
    return mask


def test_written_folder_loads_like_a_llava_hf_checkpoint(trained, tmp_path):
    model, processor, _ = trained
    save_pretrained(model, processor, tmp_path)
    # Every file gets the permissions the umask gives (safetensors' own save_file would make the weights 0600).
    assert {stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir() if p.is_file()} == {0o666 & ~current_umask()}
    loaded, loaded_processor = tinyavl.load_pretrained(tmp_path, device="cpu")
    scene, _ = next(SceneStream("eval", 0))
    inputs = loaded_processor(loaded_processor.chat_prompt("What colour is the circle?"), image=scene.image())
    expected = model(inputs["input_ids"], inputs["pixel_values"])
    assert torch.equal(loaded(inputs["input_ids"], inputs["pixel_values"]), expected)

    # transformers reads the same folder as a LlavaForConditionalGeneration and its processor, from the same
    # text and picture, makes the same inputs: the layout is the published one.
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager").eval()
    hf_inputs = transformers.AutoProcessor.from_pretrained(tmp_path, backend="pil")(
        images=scene.image(), text=loaded_processor.chat_prompt("What colour is the circle?"), return_tensors="pt")
    assert torch.equal(hf_inputs["input_ids"], inputs["input_ids"])
    with torch.no_grad():
        hf_logits = hf(input_ids=hf_inputs["input_ids"], pixel_values=hf_inputs["pixel_values"]).logits
    assert (hf_logits - expected).abs().max() < 1e-4


@pytest.mark.parametrize("folder", ["toy", "toy-nodrop", "toy-hires", "toy-tiles"])
def test_hf_config_writes_each_committed_toys_config_again(folder):
    """hf_config of what a committed toy's config.json loads as is that file, key for key: the trainer writes
    transformers' layout, with tinyavl's own keys only where the file has them (hires_config). A linear RoPE
    factor, which no toy has, goes in transformers' rope_scaling and loads back."""
    raw = json.loads((TOY_WEIGHTS.parent / folder / "config.json").read_text())
    config = parse_config(raw)
    assert hf_config(config) == raw
    scaled = replace(config, text=replace(config.text, rope_linear_factor=2.0))
    written = json.loads(json.dumps(hf_config(scaled)))
    assert written["text_config"]["rope_scaling"] == {"type": "linear", "factor": 2.0}
    assert parse_config(written) == scaled


def test_the_toy_architecture_by_default_is_the_committed_toys():
    """toy_config's defaults with the trainer's tokenizer (what `python -m tinyavl.toy.train` builds) write the
    committed weights/toy/config.json key for key: the ViT's MLP 4x its width, GQA with 2 KV heads, 1024
    positions, ... as the README and chapter 3 describe the toy."""
    tokenizer = train_tokenizer()
    config = train_module.toy_config(tokenizer.get_vocab_size(), tokenizer.token_to_id("<image>"))
    assert hf_config(config) == json.loads((TOY_WEIGHTS / "config.json").read_text())


def toy_processor():
    """The toy's processor, on the trainer's tokenizer."""
    tokenizer = train_tokenizer()
    return tinyavl.Processor(tokenizer, tokenizer.token_to_id("<image>"), (IMAGE_SIZE // PATCH) ** 2, IMAGE_SIZE,
                             IMAGE_SIZE, system_prompt=LLAVA_SYSTEM_PROMPT)


def test_chat_example_trains_only_the_answers():
    processor = toy_processor()
    tokenizer, image_id = processor.tokenizer, processor.image_token_id
    scene, rng = next(SceneStream("eval", 5))
    ids, labels, image = chat_example(scene, rng, processor, turns=3)
    assert len(ids) == len(labels)
    assert list(image) == ["pixel_values"] and torch.equal(image["pixel_values"][0], processor.preprocess(scene.image()))
    assert ids[0] == tokenizer.token_to_id("<s>") and ids.count(image_id) == (IMAGE_SIZE // PATCH) ** 2
    # Labels sit on their own tokens (the shift happens in the loss) and only on the three answers + </s>.
    assert all(label in (-100, token) for token, label in zip(ids, labels))
    trained_ids = [label for label in labels if label != -100]
    answers = processor.tokenizer.decode(trained_ids, skip_special_tokens=False).split("</s>")
    assert len(answers) == 4 and answers[-1] == "", "each answer ends with </s>"
    valid = ({o.colour for o in scene.objects} | {o.shape for o in scene.objects}
             | {f"{o.shape} at {o.place}" for o in scene.objects} | {str(o.digit) for o in scene.objects}
             | {str(n) for n in range(5)} | {scene.caption()})
    assert all(answer.strip() in valid for answer in answers[:-1]), answers
    # The prompt tokens before the first answer are exactly what the processor builds at inference.
    first_answer = next(i for i, label in enumerate(labels) if label != -100)
    prompt = processor.tokenizer.decode(ids[:first_answer], skip_special_tokens=True)
    system, question = prompt.split(" user : ")  # LLaVA-1.5's system prompt comes first
    assert system == processor.decode(processor.tokenizer.encode(LLAVA_SYSTEM_PROMPT, add_special_tokens=False).ids)
    question = question.removesuffix(" assistant :")
    at_inference = processor(processor.chat_prompt(question), image=scene.image())["input_ids"][0]
    assert ids[:first_answer] == at_inference.tolist()


def test_the_answer_loss_predicts_each_answer_token_from_the_row_before():
    """losses' answer loss by hand: the mean over the labelled tokens (the answers') of -log p(token), p the
    softmax of the row before it."""
    model, processor, _ = train(steps=1, batch_size=2, config_overrides=TINY, log=lambda *_: None)
    batch = make_batch(SceneStream("eval", 1), processor, 2, 2, processor.tokenizer.token_to_id("<pad>"))
    probe = PatchProbe(processor.tokenizer, model.config.text.hidden_size)
    with torch.no_grad():
        answer_loss, _ = losses(model, probe, batch)
        logits = model(batch["input_ids"], batch["pixel_values"])                          # (B, T, vocab)
    terms = [-torch.log_softmax(logits[b, t - 1].double(), -1)[label]
             for b, row in enumerate(batch["labels"].tolist()) for t, label in enumerate(row) if label != -100]
    assert len(terms) > 4 and answer_loss.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)


def test_learning_rate_warms_up_then_decays_to_a_tenth_by_hand():
    """110 steps, 10 of warm-up, peak 1: step s < 10 is (s + 1) / 10; then 0.1 + 0.9 (1 + cos(pi x)) / 2
    at x = (s - 10) / 100 of the decay: 1 at its start, 0.55 halfway, 0.1 at its end."""
    assert [learning_rate(s, 110, 1.0, 10) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert [learning_rate(s, 110, 1.0, 10) for s in (10, 60, 110)] == pytest.approx([1.0, 0.55, 0.1])
    assert learning_rate(60, 110, 3e-3, 10) == pytest.approx(0.55 * 3e-3)
    assert (warmup_steps(1000, 300), warmup_steps(9000, 300), warmup_steps(5, 300)) == (101, 300, 1)


def test_batch_shapes_and_padding():
    tokenizer = train_tokenizer()
    image_id = tokenizer.token_to_id("<image>")
    n_img = (IMAGE_SIZE // PATCH) ** 2
    processor = tinyavl.Processor(tokenizer, image_id, n_img, IMAGE_SIZE, IMAGE_SIZE)
    pad = tokenizer.token_to_id("<pad>")
    batch = make_batch(SceneStream("eval", 1), processor, 4, 2, pad)
    B, T = batch["input_ids"].shape
    assert B == 4 and batch["labels"].shape == (B, T)
    assert batch["pixel_values"].shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert batch["patch_targets"].shape == (4, n_img, 3)
    assert (batch["labels"][batch["input_ids"] == pad] == -100).all(), "padding is never trained"
    # Each row is its scene's chat (the same stream replayed), its labels chat_example's (the answers only),
    # padded on the right.
    replay = SceneStream("eval", 1)
    for b in range(B):
        ids, labels, _ = chat_example(*next(replay), processor, 2)
        assert batch["input_ids"][b].tolist() == ids + [pad] * (T - len(ids))
        assert batch["labels"][b].tolist() == labels + [-100] * (T - len(labels))


def test_patch_targets_mark_every_patch_that_shows_the_object():
    """A patch is labelled with an object's shape and colour when at least MIN_PATCH_PIXELS of its pixels
    are not black, and with its digit when that many are the digit's colour: counted from the image alone."""
    side = IMAGE_SIZE // PATCH
    for scene, _ in itertools.islice(SceneStream("eval", 2), 5):
        targets = patch_targets(scene)                                   # (P, 3)
        pixels = np.asarray(scene.image())                               # (H, W, 3)
        drawn = pixels.any(-1).reshape(side, PATCH, side, PATCH).sum((1, 3)).flatten()
        digit = (pixels == DIGIT_COLOUR).all(-1).reshape(side, PATCH, side, PATCH).sum((1, 3)).flatten()
        assert torch.equal(targets[:, 0] > 0, torch.from_numpy(drawn >= MIN_PATCH_PIXELS))
        assert torch.equal(targets[:, 0] > 0, targets[:, 1] > 0)
        assert torch.equal(targets[:, 2] > 0, torch.from_numpy(digit >= MIN_PATCH_PIXELS))
        for obj in scene.objects:  # the class ids name the object's own words
            shapes, colours, digits = PATCH_CLASSES
            assert set(targets[obj.patches(), 0].tolist()) == {shapes.index(obj.shape) + 1}
            assert set(targets[obj.patches(), 1].tolist()) == {colours.index(obj.colour) + 1}
            if obj.digit is not None:
                assert set(targets[obj.digit_patches(), 2].tolist()) == {digits.index(str(obj.digit)) + 1}


def test_high_resolution_targets_are_only_a_fine_scenes():
    """A plain scene draws its digits large: the fine map's digit patches would name the wrong patches."""
    scene, _ = next(SceneStream("eval", 2))
    with pytest.raises(ValueError, match="fine scene"):
        patch_targets(scene, fine_map=True)
    fine, _ = next(SceneStream("eval", 2, fine=True))
    assert patch_targets(fine, fine_map=True).shape[0] == (FINE_SCALE * IMAGE_SIZE // PATCH) ** 2


def test_patch_probe_names_a_patch_by_the_decoder_word_embeddings():
    """With one-hot word embeddings, a patch feature that is the sum of the embeddings of "red", "circle"
    and "7" (and the "nothing" vector elsewhere) is classified exactly: the probe's classes are the words."""
    tokenizer = train_tokenizer()
    vocab, width, scale = tokenizer.get_vocab_size(), 96, 30.0
    words = torch.eye(vocab, width)                                  # (vocab, width): row v = one-hot v
    probe = PatchProbe(tokenizer, width)
    with torch.no_grad():
        probe.nothing.copy_(torch.eye(width)[vocab:vocab + 3])       # three spare one-hot directions
    obj = SceneObject("circle", "red", 2, 3, 7, (220, 40, 40), (1, 2))
    targets = patch_targets(Scene((obj,)))[None]                     # (1, P, 3)
    n_patches = targets.shape[1]
    word, nothing = tokenizer.token_to_id, probe.nothing.detach()     # nothing (3, width)
    features = nothing.sum(0).repeat(1, n_patches, 1)                # (1, P, width): nothing, everywhere
    shape_only = sorted(set(obj.patches()) - set(obj.digit_patches()))
    both = obj.digit_patches()
    features[0, shape_only] = words[word("circle")] + words[word("red")] + nothing[2]
    features[0, both] = words[word("circle")] + words[word("red")] + words[word("7")]
    predicted = torch.stack([scores.argmax(-1) for scores in probe.logits(features, words)], dim=-1)  # (1, P, 3)
    assert torch.equal(predicted, targets)
    assert probe.loss(scale * features, targets, words) < 1e-3
    # The same features read against shuffled word embeddings name the wrong classes.
    shuffled = words[torch.randperm(vocab, generator=torch.Generator().manual_seed(0))]
    predicted = torch.stack([scores.argmax(-1) for scores in probe.logits(features, shuffled)], dim=-1)
    assert not torch.equal(predicted[0, obj.patches()], targets[0, obj.patches()])


def test_sincos_table_by_hand():
    table = sincos_2d(grid=3, width=8)  # quarter = 2 frequencies: 1 and 1/100
    assert table.shape == (9, 8)
    row, col = 2, 1
    freqs = [1.0, 0.01]
    expected = ([math.sin(row * f) for f in freqs] + [math.cos(row * f) for f in freqs]
                + [math.sin(col * f) for f in freqs] + [math.cos(col * f) for f in freqs])
    assert torch.allclose(table[row * 3 + col], torch.tensor(expected), atol=1e-6)


def test_the_vit_position_table_starts_with_zeros_for_the_class_token():
    """init_weights: the CLS token's slot 0, then the sin-cos table of the patches in reading order."""
    config = train_module.toy_config(vocab_size=10, image_token_id=9, vision_width=8, vision_layers=1,
                                     text_width=8, text_layers=1)
    model = tinyavl.LlavaForConditionalGeneration(config)
    train_module.init_weights(model)
    table = model.vision_tower.vision_model.embeddings.position_embedding.weight    # (1 + patches, width)
    assert not table[0].any() and torch.equal(table[1:], sincos_2d(config.vision.patches_per_side, 8))


def test_training_is_reproducible_for_a_seed():
    # Same seed, same weights (on one machine and thread count). This tiny config is deterministic even
    # without `deterministic_algorithms`; the test below checks that the command trains inside it.
    runs = [train(steps=3, batch_size=4, seed=11, config_overrides=TINY, log=lambda *_: None)[0] for _ in range(2)]
    first, second = (run.state_dict() for run in runs)
    assert all(torch.equal(first[key], second[key]) for key in first)
    other = train(steps=3, batch_size=4, seed=12, config_overrides=TINY, log=lambda *_: None)[0].state_dict()
    assert not all(torch.equal(first[key], other[key]) for key in first)


def test_tuning_a_saved_model_equals_tuning_it_in_memory(tmp_path):
    """The committed weights are stage 1 then stage 2 in one process; stage 2 run on the stage-1 folder
    loaded from disk (how the recipe's stage 2 was chosen, on the previous commit's weights) must give
    the same weights."""
    model, processor, _ = train(steps=3, batch_size=4, seed=5, config_overrides=TINY, log=lambda *_: None)
    save_pretrained(model, processor, tmp_path)
    loaded, loaded_processor = tinyavl.load_pretrained(tmp_path, device="cpu")
    tune(model, processor, steps=2, batch_size=4, log=lambda *_: None)
    tune(loaded, loaded_processor, steps=2, batch_size=4, log=lambda *_: None)
    tuned, reloaded = model.state_dict(), loaded.state_dict()
    assert all(torch.equal(tuned[key], reloaded[key]) for key in tuned)
    before = tinyavl.load_pretrained(tmp_path, device="cpu")[0].state_dict()
    assert not all(torch.equal(tuned[key], before[key]) for key in tuned)  # stage 2 changed the weights


def test_training_stops_at_a_loss_that_is_not_finite():
    """A model with a NaN weight (as a damaged checkpoint would resume it) stops the training at its first
    step, rather than training NaN weights to the end and writing them."""
    model, processor, _ = train(steps=1, batch_size=2, seed=5, config_overrides=TINY, log=lambda *_: None)
    with torch.no_grad():
        model.language_model.lm_head.weight[0, 0] = float("nan")
    before = model.state_dict()["language_model.model.norm.weight"].clone()
    with pytest.raises(UserError, match="the gradients are nan at step 1"):
        tune(model, processor, steps=3, batch_size=2, log=lambda *_: None)
    assert torch.equal(model.state_dict()["language_model.model.norm.weight"], before)  # no step was taken


@pytest.mark.parametrize("mask_kind", ["tokens", "rectangles"])
def test_tuning_hides_image_tokens_in_every_batch(mask_kind, monkeypatch):
    """Stage 2 passes every forward a mask that hides image tokens (and only image tokens), scattered or
    as rectangles. (A row may hide none: a drawn fraction under 1 / 144, or a small rectangle target that
    found no room.)"""
    model, processor, _ = train(steps=1, batch_size=4, config_overrides=TINY, log=lambda *_: None)
    seen = []
    forward = tinyavl.LlavaForConditionalGeneration.forward

    def spy(self, input_ids, pixel_values=None, **kwargs):
        seen.append((input_ids, kwargs.get("attention_mask")))
        return forward(self, input_ids, pixel_values, **kwargs)

    monkeypatch.setattr(tinyavl.LlavaForConditionalGeneration, "forward", spy)
    tune(model, processor, steps=3, batch_size=4, image_dropout=0.75, mask_kind=mask_kind, log=lambda *_: None)
    assert len(seen) == 3
    for input_ids, mask in seen:
        hidden = mask == 0
        assert hidden.any() and (input_ids[hidden] == model.config.image_token_id).all()


def test_image_dropout_hides_only_image_tokens_uniformly_and_is_seeded():
    """hide_image_tokens: text is never hidden; a row hides floor(f N_img) of its image tokens with f
    uniform on [0, max): mean fraction max / 2; every image position is hidden equally often; one seed,
    one mask."""
    image_id, n_image, max_fraction, rows = 7, 40, 0.75, 4000
    row = torch.tensor([1, 3] + [image_id] * n_image + [4, 5, 2])
    input_ids = row.repeat(rows, 1)                                               # (rows, T)
    visible = hide_image_tokens(input_ids, image_id, max_fraction, torch.Generator().manual_seed(0))
    is_image = input_ids == image_id
    assert visible[~is_image].all()
    hidden = (visible == 0) & is_image
    fractions = hidden.sum(1).float() / n_image
    assert fractions.max() <= max_fraction and fractions.min() == 0
    # floor(f N) has mean N max/2 - 1/2 (the floor loses 1/2 on average): 14.5 of 40.
    assert abs(hidden.sum(1).float().mean().item() - (n_image * max_fraction / 2 - 0.5)) < 0.4
    per_position = hidden[:, 2:2 + n_image].float().mean(0)                       # (n_image,)
    assert (per_position - per_position.mean()).abs().max() < 0.04  # binomial sd ~0.0075
    again = hide_image_tokens(input_ids[:50], image_id, max_fraction, torch.Generator().manual_seed(0))
    other = hide_image_tokens(input_ids[:50], image_id, max_fraction, torch.Generator().manual_seed(1))
    assert torch.equal(again, visible[:50]) and not torch.equal(other, visible[:50])
    assert hide_image_tokens(input_ids[:5], image_id, 0.0, torch.Generator()).all()


def test_image_dropout_share_picks_that_share_of_the_sequences(monkeypatch):
    """With share s a sequence is dropped with probability s (and then as without the knob): rows with any
    image token hidden are s (1 - P(floor(f N) = 0)) = s (1 - 1 / (N max)) of all; share 1 is the default."""
    image_id, n_image, max_fraction, rows, share = 7, 40, 0.75, 4000, 0.5
    input_ids = torch.tensor([1, 3] + [image_id] * n_image + [4, 2]).repeat(rows, 1)   # (rows, T)
    visible = hide_image_tokens(input_ids, image_id, max_fraction, torch.Generator().manual_seed(0), share)
    dropped_rows = (visible == 0).any(1).float().mean().item()
    assert abs(dropped_rows - share * (1 - 1 / (n_image * max_fraction))) < 0.03   # binomial sd ~0.008
    default = hide_image_tokens(input_ids[:50], image_id, max_fraction, torch.Generator().manual_seed(3))
    everyone = hide_image_tokens(input_ids[:50], image_id, max_fraction, torch.Generator().manual_seed(3), 1.0)
    assert torch.equal(default, everyone)
    # Share 1 draws nothing to pick the rows, so it replays a run without the knob: one draw a row, its fraction.
    draws, rand = [], torch.rand
    monkeypatch.setattr(torch, "rand", lambda *args, **kwargs: draws.append(1) or rand(*args, **kwargs))
    hide_image_tokens(input_ids[:50], image_id, max_fraction, torch.Generator().manual_seed(3), 1.0)
    assert len(draws) == 50


def test_training_passes_the_dropout_mask_to_the_model(monkeypatch):
    """With image_dropout the forward gets an attention_mask that hides some image tokens; with 0, none."""
    seen = []
    forward = tinyavl.LlavaForConditionalGeneration.forward

    def spy(self, input_ids, pixel_values=None, **kwargs):
        mask = kwargs.get("attention_mask")
        seen.append(None if mask is None else int((mask == 0).sum()))
        return forward(self, input_ids, pixel_values, **kwargs)

    monkeypatch.setattr(tinyavl.LlavaForConditionalGeneration, "forward", spy)
    train(steps=2, batch_size=4, image_dropout=0.75, config_overrides=TINY, log=lambda *_: None)
    assert len(seen) == 2 and all(n is not None and n > 0 for n in seen)
    seen.clear()
    train(steps=2, batch_size=4, image_dropout=0.0, config_overrides=TINY, log=lambda *_: None)
    assert seen == [None, None]


def test_the_trainer_trains_with_deterministic_algorithms_and_restores_the_setting(tmp_path, monkeypatch):
    """Both stages of the command run with PyTorch's deterministic kernels (without them two runs of the
    same seed drift apart: `deterministic_algorithms`) on --threads threads, and the process's settings are
    restored after."""
    seen = []

    def fake_train(*args, **kwargs):
        seen.append(("train", torch.are_deterministic_algorithms_enabled()))
        seen.append(("threads", torch.get_num_threads()))
        return train(steps=1, batch_size=2, seed=0, config_overrides=TINY, log=lambda *_: None)

    def fake_tune(*args, **kwargs):
        seen.append(("tune", torch.are_deterministic_algorithms_enabled()))

    monkeypatch.setattr(train_module, "train", fake_train)
    monkeypatch.setattr(train_module, "tune", fake_tune)
    monkeypatch.setattr(train_module, "write_examples", lambda folder, fine=False: None)
    assert not torch.are_deterministic_algorithms_enabled()
    threads = torch.get_num_threads()
    train_module.main(["--steps", "1", "--out", str(tmp_path / "new"), "--threads", str(threads + 1)])
    assert seen == [("train", True), ("threads", threads + 1), ("tune", True)]
    assert not torch.are_deterministic_algorithms_enabled() and torch.get_num_threads() == threads
    assert (tmp_path / "new" / "model.safetensors").exists()
    # A caller's own setting, warnings only, comes back as it was.
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with train_module.deterministic_algorithms():
            assert not torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


class Interrupted(Exception):
    pass


def stopped_in_step_3(take_step):
    """A take_step that takes two steps and raises Interrupted in the third: a training stopped mid-run."""
    steps = []

    def step(*args):  # optimizer, params, loss, step, lr
        steps.append(args[3])
        if len(steps) == 3:
            raise Interrupted
        take_step(*args)
    return step


TINY_RUN = ["--steps", "4", "--tune-steps", "4", "--batch-size", "2", "--eval-every", "0", "--vision-layers", "1",
            "--text-layers", "1", "--text-width", "16"]


@pytest.mark.parametrize("stop_at, saved, steps_left", [
    (4, "stage 1 after step 2", 6),               # in stage 1's 4th step
    (5, "stage 1 after step 4", 4),               # in stage 2's first step: stage 1 is in the file, finished
    (8, "stage 2 after step 2", 2),               # in stage 2's 4th step: stage 1 is not run again
    (None, "stage 2 after step 4", 0)])           # writing the folder: stage 2 is in the file, finished
def test_the_trainer_resumes_either_stage_from_its_checkpoint(stop_at, saved, steps_left, tmp_path, monkeypatch,
                                                              capsys):
    """`train --checkpoint` (saved every 2 steps here), interrupted in stage 1, between the stages, in stage 2 or
    while it writes the folder (the file then holds the stage and step given), then run again: it resumes
    from that step, takes only the steps the file does not hold and draws only their batches (the scene
    stream and the dropout draws go on from the states the file holds), writes the weights of a run without
    a checkpoint byte for byte, and deletes the file. Stage 2's dropout is on (the default), so its draws
    must resume where they were."""
    monkeypatch.setattr(train_module, "CHECKPOINT_EVERY", 2)
    monkeypatch.setattr(train_module, "write_examples", lambda folder, fine=False: None)
    train_module.main(TINY_RUN + ["--out", str(tmp_path / "plain")])
    path, steps_taken, take_step = tmp_path / "state.safetensors", [], train_module.take_step

    def counted(*args, stop_at=None):
        steps_taken.append(args[3])
        if len(steps_taken) == stop_at:
            raise Interrupted
        take_step(*args)

    def interrupted(*_, **__):
        raise Interrupted

    resumed = TINY_RUN + ["--out", str(tmp_path / "resumed"), "--checkpoint", str(path)]
    with monkeypatch.context() as patched:
        patched.setattr(train_module, "take_step", partial(counted, stop_at=stop_at))
        patched.setattr(train_module, "write_folder_atomically", interrupted)
        with pytest.raises(Interrupted):
            train_module.main(resumed)
    assert not (tmp_path / "resumed").exists()
    with safe_open(str(path), framework="pt") as file:
        metadata = file.metadata()
    assert f"stage {json.loads(metadata['run'])['stage']} after step {metadata['step']}" == saved
    steps_taken.clear()
    drawn, make_batch = [], train_module.make_batch
    monkeypatch.setattr(train_module, "take_step", counted)
    monkeypatch.setattr(train_module, "make_batch", lambda *args: drawn.append(1) or make_batch(*args))
    train_module.main(resumed)
    assert len(steps_taken) == steps_left and len(drawn) == steps_left
    assert f"resuming after step {saved[-1]} from {path}" in capsys.readouterr().out
    weights = [(tmp_path / run / "model.safetensors").read_bytes() for run in ("plain", "resumed")]
    assert weights[0] == weights[1] and not path.exists()


@pytest.mark.parametrize("damage, said", [
    (lambda t: t.update({"optimizer.zz.exp_avg": torch.zeros(1)}), "another optimiser's state (optimizer.zz.exp_avg"),
    (lambda t: t.update({"optimizer.0.a.b": torch.zeros(1)}), "another optimiser's state (optimizer.0.a.b"),
    (lambda t: t.update({"optimizer.0.exp_avg": torch.zeros(3, 3)}), "(optimizer.0.exp_avg, (3, 3))"),
    (lambda t: t.pop("optimizer.0.exp_avg_sq"), "an optimiser state with a part of a parameter's missing")])
def test_a_checkpoint_whose_optimiser_state_is_damaged_is_one_line(damage, said, tmp_path, monkeypatch):
    """The weights are checked against the model on resume; the optimiser's moments must be too (a ValueError
    or an error inside AdamW's first step, before)."""
    monkeypatch.setattr(train_module, "CHECKPOINT_EVERY", 2)
    monkeypatch.setattr(train_module, "write_examples", lambda folder, fine=False: None)
    path = tmp_path / "state.safetensors"
    run = TINY_RUN + ["--out", str(tmp_path / "out"), "--checkpoint", str(path)]
    with monkeypatch.context() as patched:
        patched.setattr(train_module, "take_step", stopped_in_step_3(train_module.take_step))
        with pytest.raises(Interrupted):
            train_module.main(run)
    with safe_open(str(path), framework="pt") as file:
        metadata, tensors = file.metadata(), {key: file.get_tensor(key) for key in file.keys()}
    damage(tensors)
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(UserError, match=re.escape(said)):
        train_module.main(run)


def test_moments_for_a_parameter_past_the_last_are_another_optimisers(tmp_path):
    """optimizer.N.* with N the count of the optimiser's parameters, one past the last: refused in one line,
    not an IndexError."""
    model = torch.nn.Linear(2, 3)
    params = list(model.parameters())                                          # indices 0 and 1
    tensors = {f"model.{name}": t for name, t in model.state_dict().items()}
    tensors |= {"optimizer.2.exp_avg": torch.zeros(3), train_module.DROPOUT_STATE: torch.Generator().get_state()}
    path = tmp_path / "state.safetensors"
    save_file(tensors, str(path), metadata={"step": "0", "history": "[]", "run": "{}",
                                            "scenes": json.dumps(random.Random(0).getstate())})
    with pytest.raises(UserError, match=re.escape("another optimiser's state (optimizer.2.exp_avg, (3,))")):
        Checkpoint(path, run={}, every=1).load(model, torch.nn.Module(), train_module.adamw(params, 1e-3),
                                               SceneStream("train", 0), torch.Generator())


@pytest.mark.parametrize("stopped_in", ["take_step", "write_folder_atomically"])  # stage 1; stage 2 finished
def test_the_trainer_refuses_a_checkpoint_of_another_run_and_one_for_stage_0(stopped_in, tmp_path, monkeypatch,
                                                                             capsys):
    """Before any training: a checkpoint saved by other settings (another --lr), in either stage, is a
    one-line error that names the setting (not the stage), and so is --checkpoint with --vision-steps,
    whose stage 0 it does not keep (exit 2); the file is left as it was."""
    monkeypatch.setattr(train_module, "CHECKPOINT_EVERY", 2)
    path, take_step, steps = tmp_path / "state.safetensors", train_module.take_step, []

    def interrupted(*args, **__):
        steps.append(1)
        if stopped_in == "write_folder_atomically" or len(steps) == 3:
            raise Interrupted
        take_step(*args)

    with monkeypatch.context() as patched:
        patched.setattr(train_module, stopped_in, interrupted)
        with pytest.raises(Interrupted):
            train_module.main(TINY_RUN + ["--out", str(tmp_path / "new"), "--checkpoint", str(path)])
    saved = path.read_bytes()
    monkeypatch.setattr(train_module, "train", lambda *a, **k: pytest.fail("trained"))
    for extra, message in ((["--lr", "0.001"], "was saved by another run (lr 0.002 there, 0.001 here)"),
                           (["--vision-steps", "2"], "--checkpoint keeps stages 1 and 2, not --vision-steps' stage 0")):
        with pytest.raises(SystemExit) as exit_:
            train_module.main(TINY_RUN + extra + ["--out", str(tmp_path / "new"), "--checkpoint", str(path)])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2 and message in err[-1]
    assert path.read_bytes() == saved


@pytest.mark.parametrize("flag", ["--out", "--checkpoint"])
def test_trainer_refuses_a_path_that_is_not_utf8_before_training(flag, tmp_path, capsys, monkeypatch):
    """A Linux name may hold any bytes; tokenizers and safetensors take UTF-8 paths only, so the model or the
    checkpoint written there could not be written, or read back (a traceback after the training, before)."""
    monkeypatch.setattr(train_module, "train", lambda *a, **k: pytest.fail("trained"))
    # b"\xfd" is no UTF-8: Python holds it as a lone surrogate
    odd = str(tmp_path / os.fsdecode(b"m\xfd" if flag == "--out" else b"c\xfd.safetensors"))
    paths = {"--out": str(tmp_path / "new"), "--checkpoint": str(tmp_path / "c.safetensors"), flag: odd}
    with pytest.raises(SystemExit) as exit_:
        train_module.main(TINY_RUN + [arg for pair in paths.items() for arg in pair])
    assert exit_.value.code == 2 and f"{odd!r} is not UTF-8" in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("flag, value", [("--image-dropout", "-0.1"), ("--image-dropout", "1"),
                                         ("--image-dropout", "nan"), ("--image-dropout-share", "0"),
                                         ("--image-dropout-share", "1.5"), ("--image-dropout-share", "nan"),
                                         ("--tune-dropout", "1"), ("--tune-dropout", "nan"), ("--tune-steps", "-1"),
                                         ("--vision-steps", "-1"), ("--vision-layers", "0"),
                                         ("--text-layers", "0"), ("--text-width", "0"), ("--text-width", "100")])
def test_trainer_refuses_knobs_out_of_range(flag, value, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train_module, "train", lambda *a, **k: pytest.fail(f"trained with a bad {flag}"))
    with pytest.raises(SystemExit) as exit_:
        train_module.main([flag, value, "--out", str(tmp_path / "new")])
    assert exit_.value.code == 2 and f"{flag} must be" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# Stage 0: the vision tower alone
# ---------------------------------------------------------------------------------------------------

def test_place_targets_by_hand():
    scene = Scene((SceneObject("circle", "red", 1, 1, 5, (220, 40, 40)),
                   SceneObject("square", "blue", 3, 4, None, (50, 90, 235))))
    expected = torch.zeros(PLACES, 3, dtype=torch.long)
    expected[0] = torch.tensor([1, 1, 6])    # circle is shape 1, red colour 1, "5" digit class 6
    expected[11] = torch.tensor([2, 3, 0])   # row 3 column 4: the 12th place; square 2, blue 3, no digit
    assert torch.equal(place_targets(scene), expected)


def test_hide_rectangles_hides_up_to_its_fraction_in_rectangles_and_is_seeded():
    side, max_fraction, images = 12, 0.75, 400
    visible = hide_rectangles(images, side, max_fraction, torch.Generator().manual_seed(0))   # (images, P)
    hidden = 1 - visible
    fractions = hidden.mean(1)
    assert set(visible.unique().tolist()) <= {0.0, 1.0}
    assert fractions.max() < max_fraction and fractions.min() == 0
    # The drawn fraction is uniform on [0, 0.75): mean 0.375 (sd of a mean of 400: 0.011); a run of
    # misses may stop a little short of it, never past it.
    assert 0.3 < fractions.mean().item() < 0.375 + 0.035
    # Rectangles, not scattered patches: a hidden patch's neighbours are mostly hidden too, far more
    # often than the hidden share itself (what independent patches would give).
    grid = hidden.view(images, side, side)
    both = (grid[:, :, 1:] * grid[:, :, :-1]).sum() + (grid[:, 1:] * grid[:, :-1]).sum()
    pairs_from_hidden = grid[:, :, 1:].sum() + grid[:, 1:].sum()
    assert both / pairs_from_hidden > fractions.mean() + 0.3
    again = hide_rectangles(50, side, max_fraction, torch.Generator().manual_seed(0))
    other = hide_rectangles(50, side, max_fraction, torch.Generator().manual_seed(1))
    assert torch.equal(again, visible[:50]) and not torch.equal(other, visible[:50])
    assert hide_rectangles(5, side, 0.0, torch.Generator()).all()
    small = hide_rectangles(20, 3, max_fraction, torch.Generator().manual_seed(0))  # a side under max_edge
    assert (small == 0).any() and ((1 - small).mean(1) < max_fraction).all()


def test_hide_image_rectangles_lays_each_rectangle_mask_over_its_image_block_only():
    """Stage 2's rectangles: row r's image tokens, in order, get hide_rectangles' mask r (the same
    generator draws), wherever the block sits in the sequence; no text token is ever hidden."""
    image_id, side, batch = 7, 4, 3
    input_ids = torch.ones(batch, 24, dtype=torch.long)                    # text everywhere ...
    for row, start in enumerate((2, 5, 8)):                                # ... and a 4 x 4 block at 3 offsets
        input_ids[row, start:start + side * side] = image_id
    visible = train_module.hide_image_rectangles(input_ids, image_id, 0.75, torch.Generator().manual_seed(3))
    expected = hide_rectangles(batch, side, 0.75, torch.Generator().manual_seed(3))    # (B, 16)
    for row in range(batch):
        assert torch.equal(visible[row][input_ids[row] == image_id].float(), expected[row])
    assert (visible[input_ids != image_id] == 1).all() and (visible == 0).any()
    input_ids[:, 2] = 1                                                    # 15 image tokens: no square
    with pytest.raises(ValueError, match="needs a square image block, got 15 image tokens"):
        train_module.hide_image_rectangles(input_ids, image_id, 0.75, torch.Generator())


def test_scene_readout_reads_the_mean_of_the_visible_tokens_and_each_token_alone():
    torch.manual_seed(0)
    readout = SceneReadout(width=8)
    features = torch.randn(2, 6, 8)                                   # (B, P, C)
    visible = torch.tensor([[1, 1, 0, 1, 0, 0], [0, 1, 1, 1, 1, 1]], dtype=torch.float32)
    scores = readout.place_logits(features, visible)
    assert [s.shape for s in scores] == [(2, PLACES, 1 + len(words)) for words in PATCH_CLASSES]
    by_hand = readout.scene(features[0, [0, 1, 3]].mean(0)).view(PLACES, -1)   # (PLACES, all classes)
    assert torch.allclose(torch.cat([s[0] for s in scores], dim=-1), by_hand, atol=1e-6)
    changed = features.clone()
    changed[0, [2, 4, 5]] += 100                                       # hidden tokens changed: same scores
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(scores, readout.place_logits(changed, visible)))
    # The patch head reads each token alone: changing one token changes its own scores only.
    own = torch.cat(readout.patch_logits(features), dim=-1)            # (B, P, all classes)
    assert torch.allclose(own[1, 4], readout.patch(features[1, 4]), atol=1e-6)
    changed_own = torch.cat(readout.patch_logits(changed), dim=-1)
    assert torch.equal(changed_own[:, [0, 1, 3]], own[:, [0, 1, 3]]) and not torch.equal(changed_own[0, 2], own[0, 2])


def test_readout_recall_hides_each_objects_place_and_scores_by_attribute():
    """A stand-in readout that names every shape right, every colour wrong and every digit (or "none")
    right from outside a place scores (1, 0, 1) there; each call sees every token but the 9 of the queried
    object's place. Its patch head names every patch "nothing" in shape, the truth in colour and digit,
    so on the patches that show an object it scores (0, 1, 1)."""
    model, processor, _ = train(steps=1, batch_size=2, config_overrides=TINY, log=lambda *_: None)
    n_scenes, calls = 3, []
    scenes = [scene for scene, _ in itertools.islice(SceneStream("eval", 4), n_scenes)]
    objects = [obj for scene in scenes for obj in scene.objects]
    truths = iter([place_targets(scene) for scene in scenes for _ in scene.objects])  # one per call, in order
    patch_truths = iter([patch_targets(scene) for scene in scenes])

    class StandIn:
        def place_logits(self, features, visible):
            calls.append(visible)
            truth = next(truths)                                    # (PLACES, 3)
            scores = [torch.zeros(1, PLACES, 1 + len(words)) for words in PATCH_CLASSES]
            scores[0][0, torch.arange(PLACES), truth[:, 0]] = 1    # the right shape
            scores[1][0, :, 0] = 1                                 # colour "none": wrong for every object
            scores[2][0, torch.arange(PLACES), truth[:, 2]] = 1    # the right digit (or "none")
            return scores

        def patch_logits(self, features):
            truth, n = next(patch_truths), features.shape[1]       # (P, 3)
            scores = [torch.zeros(1, n, 1 + len(words)) for words in PATCH_CLASSES]
            scores[0][0, :, 0] = 1                                 # shape "nothing": wrong on every object patch
            scores[1][0, torch.arange(n), truth[:, 1]] = 1
            scores[2][0, torch.arange(n), truth[:, 2]] = 1
            return scores

    recall = readout_recall(model, StandIn(), processor, n_scenes=n_scenes, seed=4)
    assert recall == {"outside its place": [1.0, 0.0, 1.0], "own patch": [0.0, 1.0, 1.0]}
    assert len(calls) == len(objects)
    for visible, obj in zip(calls, objects):
        assert (visible[0] == 0).nonzero().flatten().tolist() == obj.place_patches()


def test_vision_pretraining_lowers_the_readout_loss_and_trains_the_tower_alone():
    torch.manual_seed(0)
    model, processor, _ = train(steps=1, batch_size=2, config_overrides=TINY, log=lambda *_: None)
    before = {key: t.clone() for key, t in model.state_dict().items()}
    losses = pretrain_vision(model, processor, steps=40, batch_size=8, lr=3e-3, log_every=40, log=lambda *_: None)
    assert sum(losses[-5:]) / 5 < 0.6 * losses[0], f"readout loss went {losses[0]:.3f} -> {losses[-1]:.3f}"
    after = model.state_dict()
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    assert changed and all(key.startswith("vision_tower.") for key in changed)


def test_with_vision_steps_the_tower_is_frozen_after_stage_0(monkeypatch):
    """train(vision_steps=...) runs stage 0 once, then trains the rest with the tower as stage 0 left it;
    tune(tower_frozen=True) leaves it too, while the decoder moves."""
    towers = []
    pretrain = train_module.pretrain_vision

    def spy(model, *args, **kwargs):
        losses = pretrain(model, *args, **kwargs)
        towers.append({key: t.clone() for key, t in model.vision_tower.state_dict().items()})
        return losses

    monkeypatch.setattr(train_module, "pretrain_vision", spy)
    model, processor, _ = train(steps=3, batch_size=4, vision_steps=2, config_overrides=TINY, log=lambda *_: None)
    assert len(towers) == 1
    assert all(torch.equal(t, towers[0][key]) for key, t in model.vision_tower.state_dict().items())
    decoder = {key: t.clone() for key, t in model.language_model.state_dict().items()}
    tune(model, processor, steps=2, batch_size=4, tower_frozen=True, log=lambda *_: None)
    assert all(torch.equal(t, towers[0][key]) for key, t in model.vision_tower.state_dict().items())
    assert not all(torch.equal(t, decoder[key]) for key, t in model.language_model.state_dict().items())
    tune(model, processor, steps=2, batch_size=4, log=lambda *_: None)   # unfrozen: the tower trains
    assert not all(torch.equal(t, towers[0][key]) for key, t in model.vision_tower.state_dict().items())


def test_trainer_command_runs_stage_0_and_keeps_the_tower_frozen_in_stage_2(monkeypatch, tmp_path):
    """`--vision-steps N` reaches `train` as vision_steps=N, and stage 2 then trains with the tower frozen;
    without it there is no stage 0 and stage 2 trains the tower (the committed recipe). `--vision-layers`
    sets the tower's depth, `--text-layers` and `--text-width` the decoder's (by default the committed toy's)."""
    committed = json.loads((train_module.TOY_WEIGHTS / "config.json").read_text())
    default = dict(vision_layers=committed["vision_config"]["num_hidden_layers"],
                   text_layers=committed["text_config"]["num_hidden_layers"],
                   text_width=committed["text_config"]["hidden_size"])
    for argv, vision_steps, frozen, architecture in (
            ([], 0, False, default),
            (["--vision-steps", "7", "--vision-layers", "4", "--text-layers", "8", "--text-width", "96"], 7, True,
             dict(vision_layers=4, text_layers=8, text_width=96))):
        calls = {}
        monkeypatch.setattr(train_module, "train", lambda *a, **k: calls.update(train=k) or (None, None, []))
        monkeypatch.setattr(train_module, "tune", lambda *a, **k: calls.update(tune=k))
        monkeypatch.setattr(train_module, "write_folder_atomically", lambda *a, **k: None)
        train_module.main(argv + ["--out", str(tmp_path / "new")])
        assert calls["train"]["vision_steps"] == vision_steps and calls["tune"]["tower_frozen"] is frozen
        assert calls["train"]["config_overrides"] == architecture
        assert calls["tune"]["mask_kind"] == "tokens"                      # the committed recipe's stage 2
    train_module.main(["--tune-masks", "rectangles", "--out", str(tmp_path / "new")])
    assert calls["tune"]["mask_kind"] == "rectangles"
    with pytest.raises(SystemExit) as exit_:
        train_module.main(["--tune-masks", "squares", "--out", str(tmp_path / "new")])
    assert exit_.value.code == 2
    with pytest.raises(ValueError, match="mask_kind must be one of tokens, rectangles"):
        tune(None, None, steps=1, mask_kind="squares", log=lambda *_: None)


def test_later_turns_are_a_user_question_then_the_assistant():
    """Between one answer's </s> and the next answer, the untrained text is "USER: <question> ASSISTANT:"
    (lower-cased by the toy's tokenizer), as the processor's chat template writes a turn."""
    processor = toy_processor()
    tokenizer, eos = processor.tokenizer, processor.tokenizer.token_to_id("</s>")
    for scene, rng in itertools.islice(SceneStream("eval", 5), 5):
        ids, labels, _ = chat_example(scene, rng, processor, turns=3)
        ends = [i for i, label in enumerate(labels) if label == eos]
        assert len(ends) == 3
        for end in ends[:-1]:
            answer = next(i for i in range(end + 1, len(ids)) if labels[i] != -100)
            text = tokenizer.decode(ids[end + 1:answer])
            assert re.fullmatch(r"user : [a-z0-9 ]+ [?.] assistant :", text), text


def test_every_prompt_kind_is_trained_and_opens_some_chat():
    """A chat of 4 turns draws 4 of the 6 kinds: a caption in some chats, not in all (about 2/3 of 30), and
    every kind of opening question among 30 chats."""
    processor = toy_processor()
    with_caption, openings = 0, set()
    for scene, rng in itertools.islice(SceneStream("eval", 0), 30):
        ids, _, _ = chat_example(scene, rng, processor, turns=4)
        text = processor.tokenizer.decode(ids)
        with_caption += "describe the image" in text
        openings.add(text.split(" user : ")[1].split()[0])
    assert 0 < with_caption < 30
    assert openings == {"what", "how", "where", "describe"}


def test_the_trainers_tokenizer_is_the_committed_toys():
    assert train_tokenizer().to_str() == Tokenizer.from_file(str(TOY_WEIGHTS / "tokenizer.json")).to_str()


def rows_with_hidden_image_tokens(monkeypatch) -> list:
    """Per row of every batch's dropout mask from here on (`hide_image_tokens`, whose masks reach the model:
    test_training_passes_the_dropout_mask_to_the_model), whether it hides a token. The steps themselves are
    skipped: only the masks are wanted."""
    rows, hide = [], train_module.hide_image_tokens

    def recorded(*args):
        mask = hide(*args)
        rows.extend((mask == 0).any(1).tolist())
        return mask
    monkeypatch.setattr(train_module, "hide_image_tokens", recorded)
    monkeypatch.setattr(train_module, "losses", lambda *args, **kwargs: (torch.zeros(()), torch.zeros(())))
    monkeypatch.setattr(train_module, "take_step", lambda *args: None)
    return rows


def test_each_stage_hides_image_tokens_in_its_share_of_the_sequences(monkeypatch):
    """Stage 1 at image_dropout_share 0.25 hides tokens in about a quarter of its 64 rows (binomial: 0.05 to
    0.5 holds all but about 3 in 10^5 draws); stage 2 in every row, but for the 1 in 108 whose drawn fraction of
    0.75 x 144 image tokens rounds to none."""
    rows = rows_with_hidden_image_tokens(monkeypatch)
    model, processor, _ = train(steps=4, batch_size=16, image_dropout=0.75, image_dropout_share=0.25,
                                config_overrides=TINY, log=lambda *_: None)
    assert len(rows) == 64 and 0.05 < sum(rows) / len(rows) < 0.5, rows
    rows.clear()
    tune(model, processor, steps=4, batch_size=16, log=lambda *_: None)
    assert len(rows) == 64 and sum(rows) / len(rows) > 0.9, rows


def test_each_stage_draws_from_its_own_scene_stream(monkeypatch):
    first = []
    monkeypatch.setattr(train_module, "chat_example", lambda scene, *args: first.append(scene) or
                        chat_example(scene, *args))
    model, processor, _ = train(steps=1, batch_size=1, config_overrides=TINY, log=lambda *_: None)
    tune(model, processor, steps=1, batch_size=1, log=lambda *_: None)
    assert first == [next(SceneStream("train", 0))[0], next(SceneStream("tune", 0))[0]]


def test_the_stages_warm_up_over_their_recipes_steps(monkeypatch):
    """A tenth of the steps, capped: stage 1's 7000 steps warm up over min(300, 701), stage 2's 2000 over
    min(100, 201)."""
    warmups = []
    monkeypatch.setattr(train_module, "optimise", lambda *args, **kwargs: warmups.append(args[6]) or [])
    model, processor, _ = train(steps=7000, config_overrides=TINY, log=lambda *_: None)
    tune(model, processor, steps=2000, log=lambda *_: None)
    assert warmups == [300, 100]


def test_a_stage_saves_its_last_step_whatever_the_checkpoints_interval(tmp_path):
    """4 steps with a checkpoint every 3: saved after step 3 and after step 4, the last, from which the next
    stage goes on."""
    model, processor, _ = train(steps=1, batch_size=1, config_overrides=TINY, log=lambda *_: None)
    checkpoint = Checkpoint(tmp_path / "c.safetensors", run={"x": 1}, every=3)
    tune(model, processor, steps=4, batch_size=1, log=lambda *_: None, checkpoint=checkpoint)
    with safe_open(str(checkpoint.path), framework="pt") as file:
        assert file.metadata()["step"] == "4"


def test_a_step_clips_the_gradients_norm_to_1():
    """AdamW gets the loss's gradients scaled to a norm of 1 at most: here (6, 8), of norm 10, as (0.6, 0.8)."""
    weight = torch.nn.Parameter(torch.zeros(2))
    optimizer, stepped_on = train_module.adamw([weight], 1e-3), []
    optimizer.step = lambda: stepped_on.append(weight.grad.clone())
    train_module.take_step(optimizer, [weight], (weight * torch.tensor([6.0, 8.0])).sum(), step=0, lr=1e-3)
    torch.testing.assert_close(stepped_on, [torch.tensor([0.6, 0.8])])


def test_the_log_averages_the_last_log_every_steps_and_ends_at_the_last_step():
    """log_every 2 over 3 steps: lines after steps 2 and 3 (the last, though 3 is no multiple of 2), each with the
    answer and patch losses averaged over the last 2 steps of the history."""
    lines = []
    history = train(steps=3, batch_size=1, log_every=2, config_overrides=TINY, log=lines.append)[2]
    logged = [line for line in lines if line.startswith("step ")]
    assert [line.split()[1] for line in logged] == ["2/3", "3/3"]
    for line, recent in zip(logged, (history[0:2], history[1:3])):
        answer, patch = (sum(losses) / 2 for losses in list(zip(*recent))[1:])
        assert f"answer loss {answer:.4f}  patch loss {patch:.4f}" in line


def test_a_checkpoint_is_resumed_only_by_a_run_whose_weights_it_would_make():
    """The settings each stage saves: every flag but where the run writes (--out, --force, --checkpoint) and how
    often it evaluates (--eval-every), with torch's version and the stage; stage 2 goes on after stage 1."""
    args = argparse.Namespace(out=Path("toy"), force=True, eval_every=500, checkpoint=Path("state.safetensors"),
                              lr=2e-3, steps=7)
    stage_1, stage_2 = train_module.stage_checkpoints(args)
    assert stage_1.run == {"lr": 2e-3, "steps": 7, "torch": torch.__version__, "stage": 1}
    assert stage_2.run == {**stage_1.run, "stage": 2} and stage_2.after == stage_1.run
    assert stage_1.path == stage_2.path == args.checkpoint


def test_a_resumed_run_counts_the_samples_it_trained_itself(tmp_path, monkeypatch):
    """samples/s after a resume: the steps this run took (2 of batch 1 in 10 s on the clock here: 0.2), not also
    the 2 the checkpoint holds."""
    checkpoint = Checkpoint(tmp_path / "state.safetensors", run={"x": 1}, every=1)
    with monkeypatch.context() as patched:
        patched.setattr(train_module, "take_step", stopped_in_step_3(train_module.take_step))
        with pytest.raises(Interrupted):
            train(steps=4, batch_size=1, config_overrides=TINY, log=lambda *_: None, checkpoint=checkpoint)
    lines = []
    monkeypatch.setattr(train_module, "time", SimpleNamespace(perf_counter=iter([0.0, 10.0]).__next__))
    train(steps=4, batch_size=1, log_every=2, config_overrides=TINY, log=lines.append, checkpoint=checkpoint)
    (logged,) = [line for line in lines if line.startswith("step ")]
    assert f"resuming after step 2 from {checkpoint.path}" in lines
    assert logged.startswith("step 4/4") and " 0.2 samples/s " in logged


def test_held_out_accuracy_is_logged_every_eval_every_steps(monkeypatch):
    """On the scenes optimise's docstring names: 10 held-out scenes of seed 0."""
    steps_taken, evaluated_after, held_out_sets = [], [], []
    take_step, held_out_set = train_module.take_step, train_module.held_out_set
    monkeypatch.setattr(train_module, "take_step", lambda *args: steps_taken.append(1) or take_step(*args))
    monkeypatch.setattr(train_module, "held_out_set", lambda **kwargs: held_out_sets.append(kwargs)
                        or held_out_set(**kwargs))
    monkeypatch.setattr(train_module, "evaluate", lambda *args, **kwargs: evaluated_after.append(len(steps_taken))
                        or {"accuracy": 0.0, "accuracy_by_type": {}})
    train(steps=4, batch_size=1, eval_every=2, config_overrides=TINY, log=lambda *_: None)
    assert evaluated_after == [2, 4]
    assert held_out_sets == [dict(seed=0, n_scenes=10, fine=False)] * 2
