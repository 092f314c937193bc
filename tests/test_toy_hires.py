"""The FlexAttention toy's world: fine scenes, their training (tinyavl/toy/train_hires.py) and evaluation
(tinyavl/toy/evaluate_hires.py), against hand-derived values and the plain model.

The full training (the committed weights/toy-hires) is not run here: README "FlexAttention on the toy"
has its command.
"""
import argparse
import copy
import hashlib
import json
import math
import random
import shutil
from types import SimpleNamespace
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

import tinyavl
from tinyavl.cli import TOY_WEIGHTS
from tinyavl.errors import UserError
from tinyavl.model import HiresConfig, stitch_tiles
from tinyavl.processing import LLAVA_SYSTEM_PROMPT, Processor
from tinyavl.toy import evaluate_hires
from tinyavl.toy import train as train_module
from tinyavl.toy import train_hires as train_hires_module
from tinyavl.toy.evaluate import HIRES_MODES, PROMPT_KINDS, attention_pairs, evaluate, held_out_set
from test_toy_evaluate import BOTTOM, LEFT, RIGHT, TOP, no_model
from test_toy_train import rows_with_hidden_image_tokens
from tinyavl.toy.evaluate_hires import IN_SEQUENCE, format_table, in_sequence_pairs, plot
from tinyavl.toy.evaluate_hires import main as evaluate_hires_main
from tinyavl.toy.plot import PALETTE
from tinyavl.toy.scenes import (COLOURS, DIGIT_COLOUR, FINE_SCALE, IMAGE_SIZE, PATCH, Scene, SceneObject,
                                SceneStream)
from tinyavl.toy.train import (DROPOUT_STATE, PATCH_CLASSES, Checkpoint, PatchProbe, attribute_loss, chat_example,
                               deterministic_algorithms, losses, make_batch, patch_targets, save_pretrained,
                               tile_patch_targets, toy_config, train, train_tokenizer)
from tinyavl.toy.train_hires import FINE_CANVAS, train_hires, with_hires_projections

TOY = Path(__file__).resolve().parent.parent / "weights" / "toy"
TINY = dict(vision_width=32, vision_layers=1, text_width=32, text_layers=2)
N_HD = (IMAGE_SIZE * FINE_SCALE // PATCH) ** 2   # high-resolution tokens: 48 x 48
N_TILED = 144 + 48 * (48 + 1)                    # LLaVA-1.6's image block: the base crop, the map, a newline a row
TINY_HIRES = HiresConfig(scale=FINE_SCALE, first_layer=1, threshold=48, blocks=4)


# ---------------------------------------------------------------------------------------------------
# Fine scenes
# ---------------------------------------------------------------------------------------------------

def test_a_fine_scene_is_the_scene_drawn_larger_with_a_small_digit():
    """Box-averaged back to 96 px, a fine scene's picture is the plain scene's wherever neither digit is;
    the same draws give the same objects."""
    fine, _ = next(SceneStream("eval", 3, fine=True))
    plain, _ = next(SceneStream("eval", 3))
    assert fine.objects == plain.objects and fine.fine and not plain.fine
    big = np.asarray(fine.image())                                     # (96 FINE_SCALE, 96 FINE_SCALE, 3)
    assert big.shape == (IMAGE_SIZE * FINE_SCALE, IMAGE_SIZE * FINE_SCALE, 3)
    small = big.reshape(IMAGE_SIZE, FINE_SCALE, IMAGE_SIZE, FINE_SCALE, 3).mean(axis=(1, 3))  # (96, 96, 3)
    fine_digits = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    plain_digits = np.zeros_like(fine_digits)
    for obj in fine.objects:
        fine_digits |= obj.digit_mask(fine=True).reshape(IMAGE_SIZE, FINE_SCALE, IMAGE_SIZE, FINE_SCALE).any(axis=(1, 3))
        plain_digits |= obj.digit_mask()
    elsewhere = ~fine_digits & ~plain_digits
    assert np.array_equal(small[elsewhere], np.asarray(plain.image())[elsewhere])
    assert fine_digits.any()


def test_fine_digit_pixels_and_patches_by_hand():
    # A square at row 1 column 1, offset (0, 0), digit 1 (.#. ##. .#. .#. ###): at 384 px the square is
    # 84 px, and the digit's 3 px cells start at (37, 34): cell (i, j) spans x 37+3j.., y 34+3i...
    square = SceneObject("square", "red", 1, 1, 1, COLOURS["red"], (0, 0))
    mask = square.digit_mask(fine=True)
    assert mask.shape == (384, 384) and mask.sum() == 8 * 9              # 8 cells of 3 x 3 px
    assert mask[34:37, 40:43].all() and not mask[34:37, 37:40].any()      # row 0: only the middle cell
    assert mask[46:49, 37:46].all()                                       # row 4: the bar
    # 8 px patches, 48 a row. Patch (row 4, col 4) = y 32-39, x 32-39 holds cell (1,0): 9 px. Patch (4, 5)
    # holds (0,1) and (1,1): 18 px. Patch (5, 5) holds (2,1), (3,1) and the bar's y 46-47 at x 40-45:
    # 9 + 9 + 12 = 30 px. Patch (5, 4) holds only the bar's x 37-39, y 46-47: 6 px < 8; row 6 (y 48-55)
    # the bar's last line: 3 and 6 px.
    assert square.digit_patches(fine=True) == [4 * 48 + 4, 4 * 48 + 5, 5 * 48 + 5]
    image = np.asarray(Scene((square,), fine=True).image())
    assert (image[mask] == DIGIT_COLOUR).all() and (image[square.shape_mask(FINE_SCALE) & ~mask] == COLOURS["red"]).all()


def test_fine_patch_targets_name_the_digit_only_at_high_resolution():
    scene = Scene((SceneObject("square", "red", 1, 1, 1, COLOURS["red"], (0, 0)),), fine=True)
    low, high = patch_targets(scene), patch_targets(scene, fine_map=True)
    plain = patch_targets(replace(scene, fine=False))
    assert torch.equal(low[:, :2], plain[:, :2]) and (low[:, 2] == -100).all()   # no legible digit at 96 px
    assert high.shape == ((IMAGE_SIZE * FINE_SCALE // PATCH) ** 2, 3)
    one = PATCH_CLASSES[2].index("1") + 1
    assert (high[:, 2] == one).nonzero().flatten().tolist() == [196, 197, 245]
    shape = PATCH_CLASSES[0].index("square") + 1
    assert set((high[:, 0] == shape).nonzero().flatten().tolist()) == set(scene.objects[0].patches(FINE_SCALE))


def test_tile_targets_follow_the_crops_as_the_model_stitches_them():
    """The base crop's targets (the low-resolution image's), then each tile's: stitched as the model
    stitches tile features into its map, the tiles' targets are the high-resolution map's."""
    scene, _ = next(SceneStream("test", 1, fine=True))
    targets = tile_patch_targets(scene)                                   # (144 + 16 x 144, 3)
    assert targets.shape == (144 + N_HD, 3) and torch.equal(targets[:144], patch_targets(scene))
    tiles = targets[144:].view(FINE_SCALE ** 2, 144, 3)
    assert torch.equal(stitch_tiles(tiles, FINE_SCALE, FINE_SCALE).flatten(0, 1), patch_targets(scene, fine_map=True))
    assert (targets[144:, 2] > 0).any() and (targets[:144, 2] == -100).all()   # digits legible in the tiles only


def test_attribute_loss_leaves_out_an_attribute_with_no_target():
    g = torch.Generator().manual_seed(0)
    scores = [torch.randn(2, 5, n, generator=g) for n in (6, 5, 11)]
    targets = torch.stack([torch.randint(0, 6, (2, 5), generator=g), torch.randint(0, 5, (2, 5), generator=g),
                           torch.full((2, 5), -100)], dim=-1)
    expected = (F.cross_entropy(scores[0].flatten(0, 1), targets[..., 0].flatten())
                + F.cross_entropy(scores[1].flatten(0, 1), targets[..., 1].flatten())) / 2
    torch.testing.assert_close(attribute_loss(scores, targets), expected)


# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------

def untrained_flex():
    """(model, the same given FlexAttention's projections, its processor): a tiny untrained toy."""
    torch.manual_seed(0)
    tokenizer = train_tokenizer()
    image_token_id = tokenizer.token_to_id("<image>")
    config = toy_config(tokenizer.get_vocab_size(), image_token_id, **TINY)
    model = tinyavl.LlavaForConditionalGeneration(config).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    flex = with_hires_projections(model, TINY_HIRES)
    processor = Processor(tokenizer, image_token_id, config.num_image_tokens, IMAGE_SIZE, IMAGE_SIZE,
                          system_prompt=LLAVA_SYSTEM_PROMPT, hires_scale=FINE_SCALE)
    return model, flex, processor


@pytest.fixture(scope="module")
def tiny_flex():
    """A tiny toy (untrained) given FlexAttention's projections, its processor and a fine-scene batch."""
    model, flex, processor = untrained_flex()
    batch = make_batch(SceneStream("test", 0, fine=True), processor, 2, 2, processor.tokenizer.token_to_id("<pad>"))
    return model, flex, processor, batch


def test_the_hires_fine_tuning_runs_its_recipe(monkeypatch):
    """Half of its sequences hide image tokens (FINETUNE_DROPOUT_SHARE: 0.25 to 0.75 of 32 rows), its scenes
    come from the "hires" stream, its warm-up over 1100 steps is min(100, 111) (`warmup_steps`), and the
    view's blend ramps from 0 to 1 over HIRES_RAMP (a tenth) of the steps: 0, 0.5, then 1 over 20 steps."""
    _, flex, processor = untrained_flex()
    rows = rows_with_hidden_image_tokens(monkeypatch)
    scenes = []
    monkeypatch.setattr(train_module, "chat_example", lambda scene, *args: scenes.append(scene) or
                        chat_example(scene, *args))
    train_hires(flex, processor, steps=2, batch_size=16, log=lambda *_: None)
    assert len(rows) == 32 and 0.25 < sum(rows) / len(rows) < 0.75, rows
    assert scenes[0] == next(SceneStream("hires", 0, fine=True))[0]
    monkeypatch.undo()

    recipe = []
    monkeypatch.setattr(train_hires_module, "optimise", lambda *args, **kwargs: recipe.append(args[6]) or [])
    train_hires(flex, processor, steps=1100, log=lambda *_: None)
    assert recipe == [100]
    monkeypatch.undo()

    alphas = []
    monkeypatch.setattr(train_module, "losses", lambda model, probe, batch, hires_alpha=1.0: alphas.append(hires_alpha)
                        or (torch.zeros(()), torch.zeros(())))
    monkeypatch.setattr(train_module, "take_step", lambda *args: None)
    train_hires(flex, processor, steps=20, batch_size=1, log=lambda *_: None)
    assert alphas == [0.0, 0.5] + [1.0] * 18


@pytest.mark.parametrize("name, other", [("lr", 1e-3), ("steps", 7), ("batch_size", 4), ("seed", 1),
                                         ("threads", 1), ("in_sequence", True)])
def test_every_flag_that_changes_the_weights_is_in_the_hires_runs_settings(name, other):
    """A checkpoint saved under one setting is not resumed under another."""
    args = dict(base=TOY_WEIGHTS, in_sequence=False, steps=1100, batch_size=16, lr=8e-4, seed=0, threads=2)
    assert (train_hires_module.run_settings(argparse.Namespace(**args))
            != train_hires_module.run_settings(argparse.Namespace(**args | {name: other})))


def test_the_projections_start_as_copies_and_blended_out_the_model_is_the_plain_one(tiny_flex):
    model, flex, _, batch = tiny_flex
    for i, layer in enumerate(flex.language_model.model.layers):
        attn = layer.self_attn
        assert hasattr(attn, "k_proj_hd") == (i >= TINY_HIRES.first_layer)
        if i >= TINY_HIRES.first_layer:
            assert torch.equal(attn.k_proj_hd.weight, attn.k_proj.weight)
            assert torch.equal(attn.v_proj_hd.weight, attn.v_proj.weight)
    ids, pixels = batch["input_ids"], batch["pixel_values"]
    with torch.no_grad():
        off = flex(ids, pixels,
                   hires_view=flex.make_hires_view(ids, batch["hires_pixel_values"], alpha=0.0, first_served=0))
        assert torch.equal(off, model(ids, pixels))


def test_a_fine_batch_carries_both_views_and_their_targets(tiny_flex):
    _, _, _, batch = tiny_flex
    assert batch["pixel_values"].shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert batch["hires_pixel_values"].shape == (2, 3, 384, 384)
    assert batch["patch_targets"].shape == (2, 144, 3) and batch["hires_patch_targets"].shape == (2, N_HD, 3)


def test_training_losses_with_the_view(tiny_flex):
    """Blend 0: the answer loss is the plain model's, and the patch loss is the mean of the two views'.
    Blend 1: the answer loss moves, and its gradient reaches the new projections."""
    model, flex, processor, batch = tiny_flex
    probe = PatchProbe(processor.tokenizer, flex.config.text.hidden_size)
    plain_batch = {key: value for key, value in batch.items() if not key.startswith("hires")}
    with torch.no_grad():
        plain_lm, plain_patch = losses(model, probe, plain_batch)
        lm, patch = losses(flex, probe, batch, hires_alpha=0.0)
        view = flex.make_hires_view(batch["input_ids"], batch["hires_pixel_values"])
        words = flex.language_model.model.embed_tokens.weight
        high = probe.loss(view.features, batch["hires_patch_targets"], words)
    assert torch.equal(lm, plain_lm)
    torch.testing.assert_close(patch, (plain_patch + high) / 2)
    # The view serves every row from the one after the image block (144 tokens from the first; the answers' rows,
    # each some decoding step's current token, among them), not the image's own last row.
    served_from, make_hires_view = [], flex.make_hires_view
    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(flex, "make_hires_view", lambda *args, first_served, **kwargs: served_from.append(first_served)
                        or make_hires_view(*args, first_served=first_served, **kwargs))
        with torch.no_grad():
            losses(flex, probe, batch, hires_alpha=1.0)
    first_image = batch["input_ids"][0].tolist().index(flex.config.image_token_id)
    assert served_from == [first_image + (IMAGE_SIZE // PATCH) ** 2]
    flex.requires_grad_(True)
    try:
        lm, _ = losses(flex, probe, batch, hires_alpha=1.0)
        lm.backward()
        grad = flex.language_model.model.layers[1].self_attn.k_proj_hd.weight.grad
        assert not torch.equal(lm.detach(), plain_lm) and grad is not None and grad.abs().sum() > 0
    finally:
        flex.zero_grad(set_to_none=True)
        flex.requires_grad_(False)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A folder holding a tiny toy deep enough for HIRES (4 decoder layers), trained one step."""
    base = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    base_model, base_processor, _ = train(steps=1, batch_size=2, config_overrides=TINY | {"text_layers": 4},
                                          log=lambda *_: None)
    save_pretrained(base_model, base_processor, base)
    return base


def test_the_hires_trainer_loads_its_base_on_the_cpu_where_cuda_is_present(tiny_base, monkeypatch):
    """The toys train on the CPU, where their batches are built: on a machine with CUDA the base must not
    load onto the GPU (load_pretrained's default there), or the first forward pass would mix devices."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    model, _ = train_hires_module.from_base(tiny_base)
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def test_the_hires_trainer_writes_a_flexattention_toy(tiny_base, tmp_path):
    out = tmp_path / "flex"
    train_hires_module.main(["--base", str(tiny_base), "--out", str(out), "--steps", "2", "--batch-size", "2",
                             "--eval-every", "0"])
    model, processor = tinyavl.load_pretrained(out)
    assert model.config.hires == train_hires_module.HIRES and processor.hires_scale == FINE_SCALE
    assert Image.open(out / "examples" / "scene-0.png").size == (384, 384)
    inputs = processor(processor.chat_prompt("What digit is at row 1 column 1?"),
                       image=out / "examples" / "scene-0.png")
    tokens, stats = tinyavl.generate(model, **inputs, max_new_tokens=2, eos_token_id=())
    assert len(tokens) == 2 and stats.hires_tokens_read > 0


@pytest.fixture(scope="module")
def tiles_toy(tmp_path_factory):
    """(folder, its base toy's processor): `train_hires --in-sequence` for one step from a tiny toy."""
    tmp_path = tmp_path_factory.mktemp("tiles")
    torch.manual_seed(0)
    base_model, base_processor, _ = train(steps=1, batch_size=2, config_overrides=TINY, log=lambda *_: None)
    base = tmp_path / "base"
    base.mkdir()
    save_pretrained(base_model, base_processor, base)
    out = tmp_path / "tiles"
    train_hires_module.main(["--in-sequence", "--base", str(base), "--out", str(out), "--steps", "1",
                             "--batch-size", "2", "--eval-every", "0"])
    return out, base_processor


def test_the_in_sequence_toys_newline_is_drawn_from_the_seed(tmp_path):
    """--seed draws the in-sequence toy's new image_newline too, as LLaVA-NeXT draws it: normal / sqrt(hidden
    size); every other weight is the base's."""
    torch.manual_seed(0)
    base, base_processor, _ = train(steps=1, batch_size=2, config_overrides=TINY, log=lambda *_: None)
    save_pretrained(base, base_processor, tmp_path)
    hidden = base.config.text.hidden_size
    tiled = {seed: train_hires_module.from_base(tmp_path, in_sequence=True, seed=seed)[0] for seed in (0, 1)}
    for seed, model in tiled.items():
        expected = torch.randn(hidden, generator=torch.Generator().manual_seed(seed)) / hidden ** 0.5
        torch.testing.assert_close(model.image_newline.detach(), expected, rtol=0, atol=0)
        weights = model.state_dict()
        assert all(torch.equal(weights[name], t) for name, t in base.state_dict().items())
    assert not torch.equal(tiled[0].image_newline, tiled[1].image_newline)


def test_the_in_sequence_trainer_writes_a_tiled_toy_that_costs_what_the_table_counts(tiles_toy):
    """--in-sequence: a LLaVA-1.6 toy whose one canvas is the fine scene (2496 image tokens); its
    generation computes exactly the attention pairs in_sequence_pairs counts for the low-resolution
    prompt of the same question."""
    out, base_processor = tiles_toy
    model, processor = tinyavl.load_pretrained(out)
    assert model.config.image_grid_pinpoints == [FINE_CANVAS] == processor.image_grid_pinpoints
    assert model.config.hires is None and model.image_newline.abs().sum() > 0
    prompt, image = base_processor.chat_prompt("What digit is at row 1 column 1?"), out / "examples" / "scene-0.png"
    inputs = processor(prompt, image=image)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == N_TILED
    _, stats = tinyavl.generate(model, **inputs, max_new_tokens=3, eos_token_id=())
    low_res_prompt = base_processor(prompt, image=image)["input_ids"].shape[1]
    assert attention_pairs(stats) == in_sequence_pairs(low_res_prompt, 144, N_TILED, 2,
                                                       model.config.text.num_hidden_layers)


@pytest.mark.parametrize("out,says", [("base", "would overwrite the input"),       # the base itself
                                      (".", "would replace a folder that holds the input"),
                                      ("base/sub", "lies inside the input folder")])
def test_the_hires_trainer_refuses_to_overwrite_its_base(tmp_path, capsys, out, says):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_:
        train_hires_module.main(["--base", str(base), "--out", str(tmp_path / out), "--force"])
    assert exit_.value.code == 2 and says in capsys.readouterr().err
    assert (base / "config.json").read_text() == "{}"


@pytest.mark.parametrize("base", ["toy-hires", "toy-tiles"])
def test_the_hires_trainer_starts_only_from_a_plain_toy(tmp_path, capsys, base):
    with pytest.raises(SystemExit) as exit_:
        train_hires_module.main(["--base", str(TOY_WEIGHTS.parent / base), "--out", str(tmp_path / "flex")])
    assert exit_.value.code == 2 and "plain toy" in capsys.readouterr().err


@pytest.mark.parametrize("layers", [2, 5])
def test_the_hires_trainer_refuses_a_base_whose_last_layer_is_not_the_one_that_reads(tmp_path, capsys, layers):
    """HIRES reads the view in layer 3: a 2-layer base has no such layer (it used to be told its config's
    hires_config.first_layer was wrong, a value its config.json does not have), and in a 5-layer one the
    question's rows, served in training and not in generation, would change what layer 4 reads for the
    answer. Each is refused in one line that says so."""
    torch.manual_seed(0)
    base_model, base_processor, _ = train(steps=1, batch_size=2, config_overrides={**TINY, "text_layers": layers},
                                          log=lambda *_: None)
    (tmp_path / "base").mkdir()
    save_pretrained(base_model, base_processor, tmp_path / "base")
    with pytest.raises(SystemExit) as exit_:
        # --steps 1: a base let through would train for a moment, not for STEPS
        train_hires_module.main(["--base", str(tmp_path / "base"), "--out", str(tmp_path / "flex"), "--steps", "1"])
    err = capsys.readouterr().err.splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and err[0].startswith("error: --base: ")
    assert (f"has {layers} decoder layers: FlexAttention's view is read in layer 3 only, its last, so the toy "
            "needs 4") in err[0]


class Interrupted(Exception):
    pass


def test_a_run_interrupted_and_resumed_from_its_checkpoint_ends_with_the_uninterrupted_runs_weights(tiny_flex,
                                                                                                    tmp_path):
    """A 4-step run stopped during its 3rd step (its checkpoint holds step 2), then run again from a fresh
    copy of the starting model with the same checkpoint, ends bit for bit where the uninterrupted run ends,
    with the same loss history; image-token dropout is on, so the draws must resume where they were."""
    _, flex, processor, _ = tiny_flex
    settings = dict(steps=4, batch_size=2, log_every=1)

    def stop_in_step_3(line):
        if line.startswith("step 3/"):
            raise Interrupted

    checkpoint = Checkpoint(tmp_path / "state.safetensors", run={"seed": 0}, every=2)
    whole, resumed, lines = copy.deepcopy(flex), copy.deepcopy(flex), []
    with deterministic_algorithms():
        whole_history = train_hires(whole, processor, **settings, log=lambda *_: None)
        with pytest.raises(Interrupted):
            train_hires(copy.deepcopy(flex), processor, **settings, log=stop_in_step_3, checkpoint=checkpoint)
        checkpoint.check()                                          # saved by these settings: resumable
        with pytest.raises(UserError, match=r"another run \(seed 0 there, 1 here\)"):
            Checkpoint(checkpoint.path, run={"seed": 1}, every=2).check()
        history = train_hires(resumed, processor, **settings, log=lines.append, checkpoint=checkpoint)
    assert f"resuming after step 2 from {checkpoint.path}" in lines
    assert history == whole_history and len(history) == 4
    for (name, expected), (_, got) in zip(whole.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(got, expected), name


def test_the_command_resumes_from_its_checkpoint_and_removes_it_once_the_toy_is_written(tiny_base, tmp_path,
                                                                                         monkeypatch, capsys):
    """`train_hires --checkpoint`, its folder never written (interrupted after the last step, which the
    checkpoint holds), then run again: it resumes with no step left to take, writes the weights of a run
    without a checkpoint byte for byte, and deletes the file."""
    monkeypatch.setattr(train_hires_module, "CHECKPOINT_EVERY", 1)
    path = tmp_path / "state.safetensors"
    argv = ["--base", str(tiny_base), "--steps", "2", "--batch-size", "2", "--eval-every", "0"]
    train_hires_module.main(argv + ["--out", str(tmp_path / "plain")])

    def interrupted(*_, **__):
        raise Interrupted

    with monkeypatch.context() as patched:
        patched.setattr(train_module, "write_folder_atomically", interrupted)  # in write_toy
        with pytest.raises(Interrupted):
            train_hires_module.main(argv + ["--out", str(tmp_path / "resumed"), "--checkpoint", str(path)])
    assert path.exists() and not (tmp_path / "resumed").exists()
    capsys.readouterr()
    train_hires_module.main(argv + ["--out", str(tmp_path / "resumed"), "--checkpoint", str(path)])
    assert f"resuming after step 2 from {path}" in capsys.readouterr().out
    weights = [(tmp_path / run / "model.safetensors").read_bytes() for run in ("plain", "resumed")]
    assert weights[0] == weights[1] and not path.exists()


FIVE_STEPS = json.dumps([[step, 0.5, 0.5] for step in range(5)])  # the history a run saves after 5 steps
SCENES = json.dumps(random.Random(0).getstate())                    # a scene stream's state, as a run saves it


def save_checkpoint_file(path, metadata: dict, dropout_state=torch.Generator().get_state()):
    """A file with a checkpoint's metadata and the dropout generator's state (None: left out)."""
    tensors = {"model.x": torch.zeros(1)} | ({} if dropout_state is None else {DROPOUT_STATE: dropout_state})
    save_file(tensors, str(path), metadata=metadata)


def link_to_another_run(path):
    """A link at `path` to a file beside it (any file: a save would replace the link, not write through it)."""
    target = path.with_name("elsewhere.safetensors")
    target.write_bytes(b"a run's state")
    path.symlink_to(target)


def write_checkpoint_of_another_run(path, base):
    """A checkpoint of the command's defaults from `base`, but for 7 steps."""
    args = argparse.Namespace(base=base, in_sequence=False, steps=7, batch_size=16, lr=8e-4, seed=0, threads=2)
    run = json.dumps(train_hires_module.run_settings(args))
    save_checkpoint_file(path, {"step": "5", "history": FIVE_STEPS, "run": run, "scenes": SCENES})


def test_a_run_is_its_bases_weights_not_every_safetensors_name_beside_them(tmp_path):
    """run_settings hashes the files the base loads from: a stray backup.safetensors beside them leaves a
    run what it was (a resume is not refused), and a folder or a dangling link of such a name is no error."""
    base = tmp_path / "base"
    shutil.copytree(TOY_WEIGHTS, base)
    args = argparse.Namespace(base=base, in_sequence=False, steps=7, batch_size=16, lr=8e-4, seed=0, threads=2)
    settings = train_hires_module.run_settings(args)
    assert settings["base_sha256"] == hashlib.sha256((base / "model.safetensors").read_bytes()).hexdigest()
    (base / "backup.safetensors").write_bytes(b"an older model")
    (base / "old.safetensors").mkdir()
    (base / "gone.safetensors").symlink_to(tmp_path / "nothing")
    assert train_hires_module.run_settings(args) == settings


def write_checkpoint_with(dropout_state=torch.Generator().get_state(), **metadata):
    """A checkpoint of the command's defaults whose metadata has `metadata` in place of what a run saves
    (None: left out), and dropout_state for the dropout generator's state, as a hand edit or another program
    might write it."""
    def write(path, base):
        args = argparse.Namespace(base=base, in_sequence=False, steps=1100, batch_size=16, lr=8e-4, seed=0,
                                  threads=2)
        saved = {"step": "5", "history": FIVE_STEPS, "run": json.dumps(train_hires_module.run_settings(args)),
                 "scenes": SCENES, **metadata}
        save_checkpoint_file(path, {k: v for k, v in saved.items() if v is not None}, dropout_state)
    return write


def write_checkpoint_of_an_older_version(path, base):
    """A checkpoint of the command's defaults saved by a version with one setting more."""
    args = argparse.Namespace(base=base, in_sequence=False, steps=1100, batch_size=16, lr=8e-4, seed=0, threads=2)
    run = json.dumps({**train_hires_module.run_settings(args), "old_knob": 1})
    save_checkpoint_file(path, {"step": "5", "history": FIVE_STEPS, "run": run, "scenes": SCENES})


@pytest.mark.parametrize("name, make, message", [
    ("state.pt", None, "give it a .safetensors name"),
    ("state.safetensors", write_checkpoint_with(history="5"), "is not a training checkpoint (its step '5' or its"),
    ("state.safetensors", write_checkpoint_with(step="-3"), "is not a training checkpoint (its step '-3' or its"),
    # range(-1) is empty, as the history: only the step's sign tells
    ("state.safetensors", write_checkpoint_with(step="-1", history="[]"), "(its step '-1' or its"),
    ("state.safetensors", write_checkpoint_with(run=None), "is not a training checkpoint (its metadata has no 'run')"),
    ("state.safetensors", write_checkpoint_with(run="null"), "is not a training checkpoint (its settings are 'null'"),
    ("state.safetensors", write_checkpoint_with(run="[1]"), "is not a training checkpoint (its settings are '[1]'"),
    ("state.safetensors", write_checkpoint_with(history='[["a", "b", "c"]]'), "its history is not what a training"),
    ("state.safetensors", write_checkpoint_with(history="[]"), "its history is not what a training"),  # 5 steps
    ("state.safetensors", write_checkpoint_with(scenes=None), "(its metadata has no 'scenes')"),
    ("state.safetensors", write_checkpoint_with(scenes="[3, [1, 2], null]"), "not a training checkpoint (state vector"),
    ("state.safetensors", write_checkpoint_with(scenes="null"), "is not a training checkpoint ("),
    ("state.safetensors", write_checkpoint_with(dropout_state=None), "it holds no dropout generator's state"),
    ("state.safetensors", write_checkpoint_with(dropout_state=torch.zeros(3, dtype=torch.uint8)),
     "is not a training checkpoint ("),
    ("state.safetensors", lambda path, _: save_file({"x": torch.zeros(1)}, str(path)), "its metadata has no 'run'"),
    ("state.safetensors", lambda path, _: path.write_bytes(b"not safetensors"), "is not a training checkpoint"),
    ("state.safetensors", write_checkpoint_of_another_run, "saved by another run (steps 7 there, 1100 here)"),
    ("state.safetensors", write_checkpoint_of_an_older_version, "saved by another run (old_knob 1 there, None here)"),
    ("flex/state.safetensors", None, "is inside --out"),
    ("state.safetensors", lambda path, _: path.symlink_to(path.with_name("gone.safetensors")), "is a link"),
    ("state.safetensors", lambda path, _: link_to_another_run(path), "is a link"),
    ("base", None, "give it a .safetensors name"),
    ("base/model.safetensors", None, "lies inside the input folder"),       # beside the weights it starts from
])
def test_the_hires_trainer_refuses_a_checkpoint_it_cannot_resume_from(tiny_base, tmp_path, capsys, name, make,
                                                                       message):
    (tmp_path / "flex").mkdir()
    path = {"base": tiny_base, "base/model.safetensors": tiny_base / "model.safetensors"}.get(name, tmp_path / name)
    if make:
        make(path, tiny_base)
    before = path.read_bytes() if path.is_file() else None
    with pytest.raises(SystemExit) as exit_:
        train_hires_module.main(["--base", str(tiny_base), "--out", str(tmp_path / "flex"), "--checkpoint", str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and "--checkpoint" in err[-1] and message in err[-1]
    assert (path.read_bytes() if path.is_file() else None) == before


@pytest.mark.parametrize("out", ["state.safetensors", "state.safetensors/flex"])
def test_the_hires_trainer_refuses_a_checkpoint_in_the_way_of_its_out(tiny_base, tmp_path, capsys, out):
    """Before the training: a checkpoint at --out's own path, or at a folder it would be made in, would
    stop the toy being written after the training (with the training lost)."""
    path = tmp_path / "state.safetensors"
    with pytest.raises(SystemExit) as exit_:
        train_hires_module.main(["--base", str(tiny_base), "--out", str(tmp_path / out), "--checkpoint", str(path),
                                 "--steps", "1", "--batch-size", "1", "--eval-every", "0"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "is where --out" in err and not path.exists()


def test_the_hires_trainer_refuses_a_checkpoint_named_as_a_folder(tiny_base, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        train_hires_module.main(["--base", str(tiny_base), "--out", str(tmp_path / "flex"), "--checkpoint",
                                 str(tmp_path / "state.safetensors") + "/"])
    assert exit_.value.code == 2 and "give a file name, not a folder" in capsys.readouterr().err


def test_the_hires_trainer_refuses_a_checkpoint_inside_its_base(tiny_base, tmp_path, capsys):
    path = tiny_base / "state.safetensors"
    with pytest.raises(SystemExit) as exit_:
        train_hires_module.main(["--base", str(tiny_base), "--out", str(tmp_path / "flex"), "--checkpoint", str(path)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "lies inside the input folder" in err and not path.exists()


# ---------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------

def test_in_sequence_pairs_by_hand():
    # A 10-token prompt whose 4 image tokens become 16: 22 tokens, 22 * 23 / 2 = 253 causal pairs a layer,
    # then 2 decode steps over 23 and 24 keys: 3 layers x 300.
    assert in_sequence_pairs(10, 4, 16, 2, 3) == 900


def test_attention_pairs_count_the_prefill_the_steps_and_the_high_resolution_keys(tiny_flex):
    """Dense attention without the view: the prefill's causal pairs and each step's keys, in every layer,
    which is in_sequence_pairs with as many tokens in the sequence. Reading every block adds each served
    row's N_HD keys in every layer from first_layer on."""
    _, flex, processor, _ = tiny_flex
    scene, _ = next(SceneStream("eval", 0, fine=True))
    inputs = processor(processor.chat_prompt("What digit is at row 1 column 1?"), image=scene.image())
    prompt, layers = inputs["input_ids"].shape[1], flex.config.text.num_hidden_layers
    _, plain = tinyavl.generate(flex, inputs["input_ids"], inputs["pixel_values"], max_new_tokens=3, eos_token_id=())
    assert attention_pairs(plain) == in_sequence_pairs(prompt, 144, 144, 2, layers)
    _, every = tinyavl.generate(flex, **inputs, hires_top=16, max_new_tokens=3, eos_token_id=())
    served_rows, hires_layers = 3, layers - TINY_HIRES.first_layer
    assert every.hires_tokens_read == served_rows * hires_layers * N_HD
    assert attention_pairs(every) == attention_pairs(plain) + every.hires_tokens_read


def test_evaluate_reads_what_its_hires_mode_says(tiny_flex):
    _, flex, processor, _ = tiny_flex
    questions = [q for q in held_out_set(0, 1, fine=True) if q.kind == "digit"]
    reads = {mode: evaluate(flex, processor, questions, max_new_tokens=2, hires_mode=mode)["hires_tokens_read"]
             for mode in ("low-res", "selection", "every block")}
    # One layer reads: every block is N_HD keys for each of the (1 or 2) served rows.
    assert reads["low-res"] == 0 and reads["selection"] > 0 and reads["every block"] in (N_HD, 2 * N_HD)


def fake_report(policy, mode, digit, mflops):
    return {"policy": policy, "mode": mode, "accuracy_by_type": dict.fromkeys(
                ("colour", "shape", "count", "digit", "where", "caption"), 0.5) | {"digit": digit},
            "accuracy_by_type_ci": dict.fromkeys(("colour", "shape", "count", "where", "caption"), (0.4, 0.6))
            | {"digit": (digit - 0.1, digit + 0.1)}, "kv_ratio": 1.0,
            "hires_tokens_read": 0, "attention_mflops": mflops, "in_sequence_mflops": 100.0}


def test_evaluate_hires_measures_the_in_sequence_toy_on_the_same_questions(tiles_toy, capsys):
    out, _ = tiles_toy
    assert evaluate_hires_main(["--n", "1", "--in-sequence-toy", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    flex, tiled = result["rows"], result["in_sequence_rows"]
    assert [r["policy"] for r in tiled] == ["full", "avl"] and {r["mode"] for r in tiled} == {IN_SEQUENCE}
    assert [r["n_questions"] for r in tiled] == [6, 6] == [r["n_questions"] for r in flex[:1] + flex[-1:]]
    # 2496 image tokens in every prompt: its dense attention costs more than any FlexAttention answer's.
    assert tiled[0]["attention_mflops"] > max(r["attention_mflops"] for r in flex)


def test_the_table_compares_each_mode_with_every_block_and_the_sequence(tmp_path):
    reports = [fake_report("full", "low-res", 0.2, 10.0), fake_report("full", "selection", 0.9, 12.0),
               fake_report("full", "every block", 0.95, 20.0)]
    lines = format_table(reports).splitlines()
    assert len(lines) == 2 + 3 + 1
    assert lines[3].startswith("| full | selection | 0.90 (0.80-1.00) | 0.50 (0.40-0.60) |")   # digit, colour
    assert "| 12.0 | 0.60 | 0.120 |" in lines[3]
    assert "cost only" in lines[-1] and "| 100.0 |" in lines[-1]
    # A policy's rows are compared with its own every-block row: avl's selection (9.0) with its 18.0.
    with_avl = reports + [fake_report("avl", "selection", 0.8, 9.0), fake_report("avl", "every block", 0.85, 18.0)]
    avl_selection = format_table(with_avl).splitlines()[5]
    assert avl_selection.startswith("| avl | selection |") and "| 9.0 | 0.50 | 0.090 |" in avl_selection
    tiled = [fake_report("full", IN_SEQUENCE, 0.97, 400.0), fake_report("avl", IN_SEQUENCE, 0.95, 300.0)]
    lines = format_table(reports, tiled).splitlines()
    assert len(lines) == 2 + 3 + 2 and not any("cost only" in line for line in lines)
    assert lines[-1].startswith("| avl | all high-res tokens in the sequence | 0.95 (0.85-1.05) |")
    assert lines[-1].endswith("| - | 300.0 | - | 0.750 |") and lines[-2].endswith("| 400.0 | - | 1.000 |")


@pytest.mark.parametrize("document", ["README.md", "tutorial/07-flexattention.md"])
def test_the_documents_tables_have_the_commands_columns_and_rows(document):
    """The FlexAttention table of the README and of chapter 7 is what evaluate_hires prints: its header, and
    each row's cache and what it reads."""
    reports = [fake_report(policy, mode, 0.5, 10.0) for policy in ("full", "avl") for mode in HIRES_MODES]
    printed = format_table(reports, [fake_report(policy, IN_SEQUENCE, 0.5, 100.0) for policy in ("full", "avl")])
    text = (Path(__file__).resolve().parent.parent / document).read_text().splitlines()
    start = text.index(printed.splitlines()[0])                                  # the header, or ValueError
    table = text[start:start + len(printed.splitlines())]
    assert [line.split(" | ")[:2] for line in table] == [line.split(" | ")[:2] for line in printed.splitlines()]


@pytest.mark.parametrize("with_tiles", [False, True])
def test_the_plot_puts_each_point_where_its_cost_and_accuracy_say(tmp_path, with_tiles):
    """Each point where its MFLOPs and its digit accuracy put it, in its policy's colour: on a linear axis
    from the least to the most, or with the in-sequence toy's points on a log10 one."""
    reports = [fake_report("full", "low-res", 0.2, 10.0), fake_report("full", "selection", 0.9, 20.0),
               fake_report("avl", "selection", 0.5, 40.0)]
    tiled = [fake_report("full", IN_SEQUENCE, 0.8, 1000.0), fake_report("avl", IN_SEQUENCE, 0.3, 500.0)]
    path = tmp_path / "hires.png"
    plot(reports, path, "title", tiled if with_tiles else None)
    with Image.open(path) as picture:
        pixels = picture.convert("RGB")
    points = [(PALETTE[0], reports[0]), (PALETTE[0], reports[1]), (PALETTE[1], reports[2])]
    if with_tiles:
        points += [(PALETTE[0], tiled[0]), (PALETTE[1], tiled[1])]
    for colour, r in points:
        mflops = r["attention_mflops"]
        share = math.log10(mflops / 10.0) / 2 if with_tiles else (mflops - 10.0) / 30.0  # 10 .. 1000 or 10 .. 40
        x, y = LEFT + share * (RIGHT - LEFT), BOTTOM - r["accuracy_by_type"]["digit"] * (BOTTOM - TOP)
        assert pixels.getpixel((round(x), round(y))) == colour, (r["policy"], r["mode"])


@pytest.mark.parametrize("argv, message", [(["--n", "0"], "--n must be at least 1"),
                                           (["--weights", "nowhere"], "no model folder"),
                                           (["--weights", str(TOY)], "has no hires_config"),
                                           (["--in-sequence-toy", str(TOY)], "keeps its image at low resolution")])
def test_evaluate_hires_bad_input_is_one_line(argv, message, capsys, monkeypatch):
    # A refusal comes before any question: without it the run would evaluate for minutes, then fail here.
    monkeypatch.setattr(evaluate_hires, "compare", lambda *args, **kwargs: pytest.fail("evaluated bad input"))
    assert evaluate_hires_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------------
# The committed FlexAttention toy (weights/toy-hires)
# ---------------------------------------------------------------------------------------------------

HIRES_TOY = TOY.parent / "toy-hires"
EXAMPLE_IMAGES = ("scene-0.png", "scene-1.png", "scene-2.png", "scene-3.png")


@pytest.fixture(scope="module")
def hires_toy():
    return tinyavl.load_pretrained(HIRES_TOY, device="cpu")


def test_the_committed_hires_toy_is_the_toy_with_flexattention(hires_toy):
    model, processor = hires_toy
    assert model.config.hires == train_hires_module.HIRES and processor.hires_scale == FINE_SCALE
    # Its examples are the first toy's scenes (the same truth), drawn fine.
    truth = json.loads((HIRES_TOY / "examples" / "examples.json").read_text())
    assert truth == json.loads((TOY / "examples" / "examples.json").read_text())
    assert all(Image.open(HIRES_TOY / "examples" / image).size == (384, 384) for image in EXAMPLE_IMAGES)
    size = sum(f.stat().st_size for f in HIRES_TOY.rglob("*") if f.is_file())
    assert size < 25 * 2 ** 20


@pytest.mark.parametrize("scale", [10 ** 6, 140])
def test_a_hires_scale_no_image_could_be_made_at_is_the_configs_fault(tmp_path, scale):
    """hires_config.scale sizes every image's high-resolution view: one that makes even a square image past
    the largest image tinyavl reads (twice PIL's MAX_IMAGE_PIXELS: 179 M pixels, 13,380 px a side; at 96 px,
    140 makes 13,440) is refused as the config's, as it loads, not blamed on the image as it is preprocessed."""
    folder = tmp_path / "hires"
    shutil.copytree(HIRES_TOY, folder)
    config = json.loads((folder / "config.json").read_text())
    config["hires_config"]["scale"] = scale
    (folder / "config.json").write_text(json.dumps(config))
    side = scale * 96
    with pytest.raises(UserError, match=f"config.json has hires_config.scale {scale}: at {side} px a side, even a "
                                        "square image would have more than the 178956970 pixels"):
        tinyavl.load_processor(folder)
    config["hires_config"]["scale"] = 139                                # 13,344 px a side: it loads
    (folder / "config.json").write_text(json.dumps(config))
    assert tinyavl.load_processor(folder)[1].hires_scale == 139


@pytest.mark.parametrize("image", EXAMPLE_IMAGES)
def test_golden_fine_digit(hires_toy, image):
    """Every example's digit question, answered with the selection: the truth of examples.json."""
    model, processor = hires_toy
    truth = json.loads((HIRES_TOY / "examples" / "examples.json").read_text())[image]
    question = next(q for q in truth if q.startswith("What digit"))
    inputs = processor(processor.chat_prompt(question), image=HIRES_TOY / "examples" / image)
    tokens, stats = tinyavl.generate(model, **inputs, max_new_tokens=4)
    assert processor.decode(tokens).strip() == truth[question] and stats.hires_tokens_read > 0


def test_the_map_frames_the_blocks_the_model_reads(hires_toy, tmp_path, monkeypatch):
    """--hires-threshold on a FlexAttention model frames its own blocks (hires_config.blocks a side, 4 here),
    those hires.select_blocks takes from the drawn layer's heat, not hires.BLOCKS' 9 of LLaVA-1.5."""
    from tinyavl import attention_map, hires
    model, processor = hires_toy
    inputs = processor(processor.chat_prompt("What digit is at row 1 column 3?"),
                       image=HIRES_TOY / "examples" / "scene-0.png")
    cache = tinyavl.make_cache("full")
    tinyavl.generate(model, **inputs, max_new_tokens=1, policy=cache)
    drawn = []
    draw = attention_map.draw_attention_map
    monkeypatch.setattr(attention_map, "draw_attention_map", lambda *a, **k: drawn.append(a[6]) or draw(*a, **k))
    layer = model.config.hires.first_layer - 1                          # the layer that selects
    attention_map.save_attention_map(tmp_path / "map.png", model, processor, inputs, cache, layer, hires_threshold=48)
    side = model.config.vision.image_size // model.config.vision.patch_size
    heat = attention_map.image_heat(model, inputs["input_ids"], inputs["pixel_values"], layer)
    expected = hires.select_blocks(heat[None], (side, side), 48, model.config.hires.blocks)[0]
    assert model.config.hires.blocks == 4 != hires.BLOCKS
    assert torch.equal(drawn[0], expected)


# ---------------------------------------------------------------------------------------------------
# The committed in-sequence toy (weights/toy-tiles): what FlexAttention is measured against
# ---------------------------------------------------------------------------------------------------

TILES_TOY = TOY.parent / "toy-tiles"
COARSE_KINDS = ("What colour", "What shape", "How many", "Where")  # read from the low-resolution view as well


@pytest.fixture(scope="module")
def tiled_toy():
    return tinyavl.load_pretrained(TILES_TOY, device="cpu")


def test_the_committed_tiles_toy_is_the_toy_with_every_high_res_token_in_its_sequence(tiled_toy):
    model, processor = tiled_toy
    assert model.config.image_grid_pinpoints == [FINE_CANVAS] and model.config.hires is None
    weights, base = model.state_dict(), tinyavl.load_pretrained(TOY)[0].state_dict()
    assert sorted(weights) == sorted([*base, "image_newline"])
    # Trained from the toy, not only converted: every layer of the decoder moved.
    assert all(not torch.equal(weights[key], base[key]) for key in base if key.endswith("self_attn.q_proj.weight"))
    truth = json.loads((TILES_TOY / "examples" / "examples.json").read_text())
    assert truth == json.loads((TOY / "examples" / "examples.json").read_text())
    inputs = processor(processor.chat_prompt("What digit is at row 1 column 3?"),
                       image=TILES_TOY / "examples" / "scene-0.png")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == N_TILED
    size = sum(f.stat().st_size for f in TILES_TOY.rglob("*") if f.is_file())
    assert size < 25 * 2 ** 20


def test_the_committed_tiles_toy_runs_as_transformers_llava_next_runs_it(tiled_toy):
    """The folder is a llava-hf LLaVA-NeXT checkpoint: transformers' model, from the same files, gives the
    same logits at every position of a one-question prompt (2534 tokens, 2496 of them the image's)."""
    transformers = pytest.importorskip("transformers")
    model, processor = tiled_toy
    hf = transformers.LlavaNextForConditionalGeneration.from_pretrained(TILES_TOY, attn_implementation="eager").eval()
    inputs = processor(processor.chat_prompt("Describe the image."), image=TILES_TOY / "examples" / "scene-3.png")
    with torch.no_grad():
        ours = model(**inputs)
        ref = hf(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"],
                 image_sizes=inputs["image_sizes"]).logits
    assert (ours - ref).abs().max() < 1e-4


@pytest.mark.parametrize("image", EXAMPLE_IMAGES)
def test_golden_coarse_answers_from_the_tiled_sequence(tiled_toy, image):
    """Every example's colour, shape, count and "where" question, read from its 2496 image tokens: the
    truth of examples.json. Its digits and captions are left to the README's table: it reads 0.48 of
    the digits and 0.22 of the captions there, so no example is sure to be one it gets."""
    model, processor = tiled_toy
    truth = json.loads((TILES_TOY / "examples" / "examples.json").read_text())[image]
    questions = [q for q in truth if q.startswith(COARSE_KINDS)]
    assert len(questions) == len(COARSE_KINDS)
    for question in questions:
        inputs = processor(processor.chat_prompt(question), image=TILES_TOY / "examples" / image)
        tokens, _ = tinyavl.generate(model, **inputs, max_new_tokens=8)
        assert processor.decode(tokens) == truth[question], question


def test_attention_mflops_is_4_heads_head_dim_flops_a_pair():
    model = SimpleNamespace(config=SimpleNamespace(text=SimpleNamespace(num_attention_heads=4, head_dim=32)))
    assert evaluate_hires.attention_mflops(1_000_000, model) == 4 * 4 * 32


def test_compare_prices_the_in_sequence_toy_answer_by_answer(monkeypatch):
    """Two answers, of 3 and 5 decode steps after prompts of 10 and 12 tokens (4 of them image tokens); the
    tiled image is 144 + 48 x (48 + 1) = 2496 tokens. Per answer, in every layer, a causal prefill over
    n = prompt - 4 + 2496 tokens, then step s's query over n + s + 1 keys; in_sequence_mflops is their mean.
    (The answers' lengths differ, so a mean is told from the first, the last, the largest or the smallest.)"""
    layers = 2
    model = SimpleNamespace(config=SimpleNamespace(
        text=SimpleNamespace(num_hidden_layers=layers, num_attention_heads=1, head_dim=1),
        vision=SimpleNamespace(image_size=96, patch_size=8)))
    answers = [(10, 3), (12, 5)]

    def fake_evaluate(model, processor, questions, policy, on_answer=None, hires_mode=None):
        for prompt, steps in answers:
            on_answer(None, "", SimpleNamespace(next_pos=prompt + steps, n_img=4), {"input_ids": torch.zeros(1, prompt)})
        return {"policy": policy, "attention_pairs": 0.0}
    monkeypatch.setattr(evaluate_hires, "evaluate", fake_evaluate)

    def by_hand(prompt, steps):
        n = prompt - 4 + 2496
        return layers * (n * (n + 1) // 2 + sum(n + s + 1 for s in range(steps)))
    expected = (by_hand(10, 3) + by_hand(12, 5)) / 2 * 4 / 1e6
    reports = evaluate_hires.compare(model, None, [])
    assert len(reports) == 6 and all(r["in_sequence_mflops"] == pytest.approx(expected, rel=1e-12) for r in reports)


def hires_report(policy, mode, mflops, in_sequence):
    return {"policy": policy, "mode": mode, "accuracy_by_type": dict.fromkeys(PROMPT_KINDS, 0.5),
            "accuracy_by_type_ci": dict.fromkeys(PROMPT_KINDS, (0.4, 0.6)), "kv_ratio": 1.0,
            "hires_tokens_read": 0, "attention_mflops": mflops, "in_sequence_mflops": in_sequence}


def test_the_cost_only_row_is_priced_by_full_reading_nothing():
    reports = [hires_report("full", "low-res", 10.0, 100.0), hires_report("full", "every block", 20.0, 101.0),
               hires_report("avl", "every block", 15.0, 97.0)]
    assert evaluate_hires.format_table(reports).splitlines()[-1].endswith("| 100.0 | - | 1.000 |")


def test_hires_evaluation_flags_are_checked_before_the_model_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(evaluate_hires, "load_pretrained", no_model)
    plot, tiles = tmp_path / "hires.png", tmp_path / "tiles"
    plot.write_text("the user's")
    tiles.mkdir()
    for argv, says in ((["--force"], "--force replaces the --plot file"),
                       (["--plot", str(plot)], "already exists"),
                       (["--plot", str(tiles / "x.png"), "--in-sequence-toy", str(tiles)],
                        "lies inside the input folder")):
        assert evaluate_hires.main(argv) == 2 and says in capsys.readouterr().err
    assert plot.read_text() == "the user's" and not list(tiles.iterdir())


def test_the_hires_evaluation_asks_fine_scenes(monkeypatch):
    flex = SimpleNamespace(config=SimpleNamespace(hires=object(), is_next=False))
    monkeypatch.setattr(evaluate_hires, "load_pretrained", lambda *a, **k: (flex, None))
    asked = []
    monkeypatch.setattr(evaluate_hires, "compare", lambda model, processor, questions, log=None: asked.extend(questions) or [])
    assert evaluate_hires.main(["--n", "2", "--json"]) == 0
    assert len(asked) == 12 and all(q.scene.fine and q.scene.image().size == (384, 384) for q in asked)
