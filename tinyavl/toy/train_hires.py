"""Train the FlexAttention toy: the committed toy LLaVA, given FlexAttention's projections and fine-tuned
on fine scenes, whose digits only a high-resolution view of the image can read (tutorial/07).

    python -m tinyavl.toy.train_hires --out weights/toy-hires --force    # the committed one (seed 0), replaced
    python -m tinyavl.toy.train_hires --in-sequence --out weights/toy-tiles --force \\
        --checkpoint weights/toy-tiles-checkpoint.safetensors                # the committed baseline below, replaced

FlexAttention (Li et al., ECCV 2024) is not trained from scratch: it fine-tunes a trained LLaVA-1.5 with
two new projections per layer (`k_proj_hd`, `v_proj_hd`, initialised as copies of `k_proj`, `v_proj`) for
one epoch, the hierarchical output blended in with alpha = min(1, 10 x progress). This does the same
to the toy of tinyavl/toy/train.py (`--base`, default weights/toy), with `HIRES`:
- the image is drawn at 384 px (a fine scene, tinyavl/toy/scenes.py): the sequence gets its 96 px view
  (144 tokens, 12 x 12) as always, and the high-resolution view is its 4 x 4 crops of 96 px through the
  same tower and projector, a 48 x 48 map of 2304 features that never enters the sequence. Scale 4, not
  FlexAttention's 3: a crop is then one place of the scene's grid, and the digit is drawn in it at the
  size the toy's tower learnt digits at, 9 x 15 px (at 3x, digits small enough to blur at 96 px were
  6 x 10 px, which the tower did not learn to read: its patch probe named 0.17 of them after 300 steps
  of the tower alone, chance being 0.10);
- blocks: the 12 x 12 attention map pooled to 4 x 4 blocks, each one place (3 x 3 low-resolution
  tokens, 12 x 12 high-resolution ones);
- first_layer 3: layer 2 chooses, layer 3 (the last) reads. The committed toy's last prompt token, asked
  for a digit, points at the object's place in layer 2 (the chosen blocks hold it for every question,
  1.4 blocks of 16 on average) but not yet in layers 0 and 1 (the place in 87-93% of questions, with
  6.6-9.5 blocks): the measurement is in tutorial/07;
- every row after the image is served in training (each answer token's row is the current token of its
  own decoding step, so teacher forcing trains what generation runs; the question's rows are served too,
  which generation does not do, but with the last layer the only one that reads, their outputs reach no
  answer), with the toy's image-token dropout in half of the sequences, so that what the first toy learnt
  of redundancy stays;
- the patch probe of tinyavl/toy/train.py also names what each high-resolution feature shows, as it
  names what each low-resolution one shows (a fine scene's small digit has no target there: it is not
  legible at 96 px); everything is trained, the tower included, because the toy's tower has never seen
  a digit this small (FlexAttention keeps CLIP frozen, which reads 336 px crops well already).

`--in-sequence` trains what FlexAttention is measured against, with the same recipe, steps and data: the
toy made into a LLaVA-1.6 (`with_tiles_in_sequence`) whose one canvas is the 384 px fine scene, so that
every high-resolution token enters the sequence: the base crop's 144, then the 4 x 4 tiles' 48 x 48 map,
each of its rows closed by `image_newline` (tinyavl/anyres.py): 2496 image tokens. No view, no new
projections; the patch probe names what every crop's features show (`train.tile_patch_targets`). Its
chats are about 2600 tokens long where the FlexAttention toy's are 249: it trained at 1.1-1.6 samples/s on
the 2-core CPU the committed toys were trained on, against 9-10, 3.6 hours for STEPS over three
sittings. `--checkpoint FILE` keeps the training state in FILE every 50 steps (`Checkpoint`:
the weights, the probe, AdamW's moments, the loss history, and where the scene stream and the dropout draws
are); the same command run again after an interruption goes on from there, and ends with the weights one
uninterrupted run would have written, bit for bit on the same machine and thread count.
"""
import hashlib
from dataclasses import asdict, replace
from pathlib import Path

import torch

from tinyavl import load_pretrained
from tinyavl.cli import (TOY_WEIGHTS, ArgumentParser, check_training_args, first_paragraph, given_path, print_progress,
                         run_main)
from tinyavl.errors import UserError
from tinyavl.files import check_new_folder
from tinyavl.loading import checkpoint_files
from tinyavl.model import HiresConfig, LlavaForConditionalGeneration
from tinyavl.toy.scenes import FINE_SCALE, IMAGE_SIZE, SceneStream
from tinyavl.toy.train import (HIRES_RAMP, TUNE_DROPOUT, TURNS, Checkpoint, PatchProbe, add_run_arguments,
                               check_checkpoint, deterministic_algorithms, optimise, torch_threads, warmup_steps,
                               write_toy)

HIRES = HiresConfig(scale=FINE_SCALE, first_layer=3, threshold=48.0, blocks=4)
FINE_CANVAS = (FINE_SCALE * IMAGE_SIZE, FINE_SCALE * IMAGE_SIZE)  # (height, width) px: a fine scene
STEPS = 1100
BATCH_SIZE = 16             # half the first toy's: a step also runs the tower on 16 crops of every image
FINETUNE_DROPOUT = TUNE_DROPOUT  # the largest fraction of a sequence's image tokens hidden: the first toy's stage 2
FINETUNE_DROPOUT_SHARE = 0.5    # in this share of the sequences
FINETUNE_TURNS = TURNS          # question-answer turns a training sequence holds, as the first toy's
CHECKPOINT_EVERY = 50       # steps between two saves of the training state (--checkpoint): 8-12 min for --in-sequence


def with_hires_projections(model: LlavaForConditionalGeneration, hires: HiresConfig) -> LlavaForConditionalGeneration:
    """A copy of the model with FlexAttention's view (config.hires) and, in every layer from
    hires.first_layer on, k_proj_hd and v_proj_hd initialised as copies of k_proj and v_proj."""
    config = replace(model.config, hires=hires)
    config.validate()
    flex = LlavaForConditionalGeneration(config)
    missing, unexpected = flex.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all("_proj_hd." in key for key in missing), (missing, unexpected)
    with torch.no_grad():
        for layer in flex.language_model.model.layers[hires.first_layer:]:
            attn = layer.self_attn
            attn.k_proj_hd.load_state_dict(attn.k_proj.state_dict())
            attn.v_proj_hd.load_state_dict(attn.v_proj.state_dict())
    return flex.eval()


def with_tiles_in_sequence(model: LlavaForConditionalGeneration, seed: int) -> LlavaForConditionalGeneration:
    """A copy of the model as a LLaVA-1.6 whose only canvas is FINE_CANVAS: its weights, and a new
    image_newline drawn (from `seed`) as LLaVA-NeXT draws it, normal / sqrt(hidden size); room for
    positions up to 4096, the 2496 image tokens and the chat after them."""
    text = replace(model.config.text, max_position_embeddings=max(4096, model.config.text.max_position_embeddings))
    config = replace(model.config, text=text, image_grid_pinpoints=[FINE_CANVAS])
    config.validate()
    tiled = LlavaForConditionalGeneration(config)
    missing, unexpected = tiled.load_state_dict(model.state_dict(), strict=False)
    assert missing == ["image_newline"] and not unexpected, (missing, unexpected)
    with torch.no_grad():
        hidden = text.hidden_size
        tiled.image_newline.copy_(torch.randn(hidden, generator=torch.Generator().manual_seed(seed)) / hidden ** 0.5)
    return tiled.eval()


def from_base(base: Path, in_sequence: bool = False, seed: int = 0):
    """(model, processor): the trained toy in the folder `base` with FlexAttention's view and projections
    (`HIRES`, `with_hires_projections`), and its processor returning the high-resolution view too; with
    in_sequence, the toy as a LLaVA-1.6 (`with_tiles_in_sequence`, its newline drawn from seed) and its
    processor tiling the image."""
    model, processor = load_pretrained(base, device="cpu", dtype="float32")  # the CPU, where train.py trains
    if model.config.hires is not None or model.config.is_next:  # its view or tiles would be built over again
        raise UserError(f"{base} is already a FlexAttention or LLaVA-1.6 toy: start from the plain toy "
                        f"({TOY_WEIGHTS})")
    if in_sequence:
        model = with_tiles_in_sequence(model, seed)
        processor.image_grid_pinpoints = model.config.image_grid_pinpoints  # its patch_size is the tower's already
        return model, processor
    # Training serves every row after the image (`losses`' first_served), the question's rows too, which
    # generation does not: their outputs must reach no answer, so the view is read in the last layer alone.
    if model.config.text.num_hidden_layers != HIRES.first_layer + 1:
        raise UserError(f"{base} has {model.config.text.num_hidden_layers} decoder layers: FlexAttention's view "
                        f"is read in layer {HIRES.first_layer} only, its last, so the toy needs "
                        f"{HIRES.first_layer + 1} (train.py --text-layers)")
    processor.hires_scale = HIRES.scale
    return with_hires_projections(model, HIRES), processor


def train_hires(model, processor, steps: int = STEPS, batch_size: int = BATCH_SIZE, lr: float = 8e-4, seed: int = 0,
                log_every: int = 100, eval_every: int = 0, log=None,
                checkpoint: Checkpoint | None = None) -> list[tuple[int, float, float]]:
    """Fine-tune a model `from_base` (either kind) on fine scenes, FINETUNE_TURNS turns a sequence, the
    image tokens hidden as FINETUNE_DROPOUT and FINETUNE_DROPOUT_SHARE say (seed: the scenes' stream, the
    dropout draws); returns the history of (step, lm_loss, patch_loss). With a checkpoint, it resumes
    (`optimise`)."""
    log = log or print_progress
    probe = PatchProbe(processor.tokenizer, model.config.text.hidden_size)
    looks = model.config.hires or f"every high-resolution token in the sequence, {model.config.image_grid_pinpoints}"
    log(f"{steps} steps on fine scenes, {looks}")
    return optimise(model, probe, processor, SceneStream("hires", seed, fine=True), steps, lr,
                    warmup_steps(steps, 100), batch_size, FINETUNE_TURNS,
                    image_dropout=FINETUNE_DROPOUT, image_dropout_share=FINETUNE_DROPOUT_SHARE,
                    dropout_generator=torch.Generator().manual_seed(seed), log_every=log_every,
                    eval_every=eval_every, log=log, checkpoint=checkpoint)


def run_settings(args) -> dict:
    """What makes a run of this command what it is, saved with its checkpoint: the arguments that change
    the weights (not --out, --force or --eval-every), the base's weights by their sha256, the recipe's
    constants and the torch version."""
    base_weights = hashlib.sha256()
    for path in checkpoint_files(args.base):  # the files from_base loads: one, or a sharded checkpoint's shards
        base_weights.update(path.read_bytes())
    return {"base_sha256": base_weights.hexdigest(), "in_sequence": args.in_sequence,
            "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
            "threads": args.threads, "image_dropout": FINETUNE_DROPOUT, "image_dropout_share": FINETUNE_DROPOUT_SHARE,
            "turns": FINETUNE_TURNS, "hires_ramp": HIRES_RAMP, "hires": asdict(HIRES), "torch": torch.__version__}


def main(argv=None) -> None:
    parser = ArgumentParser(description=first_paragraph(__doc__))
    parser.add_argument("--base", type=given_path, default=TOY_WEIGHTS, help="the trained toy to start from")
    parser.add_argument("--out", type=given_path, required=True, help="folder to write (llava-hf layout)")
    parser.add_argument("--force", action="store_true", help="replace --out if it already holds files")
    parser.add_argument("--in-sequence", action="store_true",
                        help="train the baseline instead: every high-resolution token in the sequence (LLaVA-1.6)")
    parser.add_argument("--steps", type=int, default=STEPS, help="fine-tuning steps")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="scenes per step")
    parser.add_argument("--lr", type=float, default=8e-4, help="AdamW's peak learning rate")
    parser.add_argument("--seed", type=int, default=0,
                        help="the training scene stream, the dropout draws and --in-sequence's new image_newline")
    add_run_arguments(parser, eval_every=550, checkpoint_every=CHECKPOINT_EVERY)
    args = parser.parse_args(argv)
    check_training_args(parser, args)
    try:
        check_new_folder(args.out, args.force, inputs=[args.base])  # before the training, not after
    except UserError as err:
        parser.error(f"--out: {err}")
    try:
        model, processor = from_base(args.base, args.in_sequence, args.seed)
    except UserError as err:
        parser.error(f"--base: {err}")
    checkpoint = args.checkpoint and Checkpoint(args.checkpoint, run_settings(args), CHECKPOINT_EVERY)
    if checkpoint:
        try:
            check_checkpoint(checkpoint, args.out, inputs=[args.base])
        except UserError as err:
            parser.error(str(err))
    with torch_threads(args.threads), deterministic_algorithms():
        train_hires(model, processor, args.steps, args.batch_size, args.lr, args.seed, eval_every=args.eval_every,
                    checkpoint=checkpoint)
    write_toy(args.out, model, processor, args.force, args.checkpoint, fine=True)


if __name__ == "__main__":
    run_main(main)
