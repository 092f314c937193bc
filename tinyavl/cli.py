"""What the command lines share: the toy model's folder, one-line errors, the KV policy flags."""
import argparse
import json
import sys
from pathlib import Path

from tinyavl.cache import POLICIES
from tinyavl.errors import UserError

# The committed toy LLaVA: the default model of main.py and of the evaluation.
TOY_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "toy"

# Policy parameters, named as in the papers; each policy takes its own subset (tinyavl/cache.py).
POLICY_OPTIONS = {
    "S": (float, "avl: fraction of image tokens stored (secondary); random: fraction of image tokens kept"),
    "C": (float, "avl: fraction of image tokens computed (core)"),
    "K": (int, "avl: core update interval in steps; fastv: layer after which image tokens are dropped"),
    "P": (float, "avl: fraction of image tokens the prefill filter keeps (1 = no filter)"),
    "filter_layer": (int, "avl: first layer that runs on the filtered sequence"),
    "T": (float, "avl: fraction of text tokens kept"),
    "R": (float, "fastv: fraction of image tokens dropped"),
    "heavy": (float, "h2o: heavy-hitter fraction of the sequence"),
    "recent": (float, "h2o, streaming: recent-window fraction of the sequence"),
    "sinks": (int, "streaming: attention-sink tokens kept at the start"),
    "random_seed": (int, "random: seed of the generator that draws the image tokens kept"),
    "kernel": (str, "avl: 'auto' (Triton on CUDA), 'triton' or 'torch' for the sparse decode attention"),
}


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        # One line like every other user mistake (argparse would print the whole usage first).
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def add_policy_arguments(parser: argparse.ArgumentParser) -> None:
    """--policy NAME and one flag per policy parameter (unset flags keep the policy's defaults)."""
    parser.add_argument("--policy", default="full", help="KV policy: " + ", ".join(POLICIES))
    for name, (kind, help_text) in POLICY_OPTIONS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, default=None, help=help_text)


def policy_params(args: argparse.Namespace) -> dict:
    """The policy parameters given on the command line."""
    return {name: getattr(args, name) for name in POLICY_OPTIONS if getattr(args, name) is not None}


def run_command(run, args, show) -> int:
    """A command's exit status: run(args), then its result printed as one JSON object (--json) or by
    show(result); a user's mistake (UserError) is one line on stderr and status 2."""
    try:
        result = run(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        show(result)
    return 0
