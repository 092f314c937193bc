"""What the command lines share: the toy models' folders, a parser whose every option has a help and shows
its default, the KV policy flags, the trainers' checks, and how every command ends (`ended_in_one_line`:
one line for a user's mistake, Ctrl-C, SIGTERM or what the system refuses, never a traceback)."""
import argparse
import errno
import json
import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

from tinyavl.cache import POLICIES, KVCache, make_cache, param_owners
from tinyavl.errors import UserError
from tinyavl.files import name_too_long_as_user_error
from tinyavl.params import SEED_PARAM
from tinyavl.startup import REPO, handling, signal_line

# The committed toy LLaVA: the default model of main.py and of the evaluation.
TOY_WEIGHTS = REPO / "weights" / "toy"
# The committed FlexAttention toy (tinyavl/toy/train_hires.py): the default of its evaluation.
HIRES_TOY_WEIGHTS = TOY_WEIGHTS.parent / "toy-hires"


# ---------------------------------------------------------------------------------------------------
# Flags: a parser whose every option explains itself, the paths a command takes, the policy flags and checks.
# ---------------------------------------------------------------------------------------------------

class DefaultsHelpFormatter(argparse.HelpFormatter):
    """--help shows every option's default, except where the default means "not given" (None, False)."""

    def _get_help_string(self, action):
        text = action.help or ""
        # by identity: a default of 0 or 0.0 is a value to show, though it equals False
        shown = not any(action.default is hidden for hidden in (None, False, argparse.SUPPRESS))
        if action.option_strings and shown:
            text += " (default: %(default)s)"
        return text


def flag(name: str) -> str:
    """The command-line flag of a keyword: max_new_tokens -> --max-new-tokens."""
    return "--" + name.replace("_", "-")


def given_path(text: str) -> Path:
    """A path as a command line gives it (an argparse type), never empty: Path("") is the current folder, so
    an unset shell variable ("$DIR") would read or write there without a word."""
    if not text:
        raise argparse.ArgumentTypeError("the path is empty: give a file or folder name")
    return Path(text)


def output_file(text: str) -> Path:
    """An output file's path as a command line gives it (an argparse type, not empty: `given_path`). A
    trailing separator names a folder, which Path would drop: "x.png/" would become the file x.png."""
    path = given_path(text)
    if text.endswith(("/", os.sep)):
        raise argparse.ArgumentTypeError(f"{text} ends in {os.sep}: give a file name, not a folder")
    return path


def check_model_folder(folder: Path, option: str, trainer: str) -> None:
    """A UserError unless the toy command's `option` names a model folder: a file there is told to give the
    folder; a folder that is not there, the trainer that makes one (python -m trainer)."""
    with name_too_long_as_user_error(f"{option} {folder}"):
        if folder.exists() and not folder.is_dir():
            raise UserError(f"{option} {folder} is a file: give the model folder that holds it")
        if not folder.is_dir():
            raise UserError(f"{option}: no model folder at {folder}: train one with python -m {trainer}")


def check_stdout_open(what: str, files: dict | None = None) -> None:
    """A UserError where the command was started with stdout closed (>&-) and given none of the options that
    name a file it writes (files: {flag: its value, None where not given}): its `what`, printed on stdout,
    would go nowhere, after all the work."""
    files = files or {}
    if sys.stdout is None and all(value is None for value in files.values()):
        give = f", or give {' or '.join(files)}" if files else ""
        raise UserError(f"standard output is closed: the {what} would go nowhere (redirect it to a file{give})")


def first_paragraph(doc: str) -> str:
    """A module docstring's first paragraph on one line: the description a command's --help shows."""
    return " ".join(doc.split("\n\n")[0].split())


def command_name() -> str:
    """How the running command was started, for its usage line: "python -m tinyavl.bench" for a module
    (argparse before Python 3.14 shows the file's name, bench.py, which `python bench.py` cannot run),
    "python main.py" for a script."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    if spec is None:
        return f"python {os.path.basename(sys.argv[0])}"
    return f"python -m {spec.name.removesuffix('.__main__')}"


class ArgumentParser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("prog", command_name())
        # No abbreviations: with flags as short as A-VL's, a mistyped "--k 3" would be read as --kernel 3 and
        # refused with a message about --kernel, not --K.
        super().__init__(*args, formatter_class=DefaultsHelpFormatter, allow_abbrev=False, **kwargs)

    def add_argument(self, *names, **kwargs):
        # Every option explains itself, with its default (DefaultsHelpFormatter): argparse shows neither for an
        # option without a help text.
        if names and names[0].startswith("-") and not kwargs.get("help"):
            raise TypeError(f"option {names[0]} has no help text")
        return super().add_argument(*names, **kwargs)

    def error(self, message):
        # One line like every other user mistake (argparse would print the whole usage first), said as a command
        # says its notes (the arguments are read before the command runs).
        with notes_on_stderr():
            print(f"error: {one_line(message)} (see --help)", file=sys.stderr)
        sys.exit(2)


def add_policy_arguments(parser: argparse.ArgumentParser) -> None:
    """--policy NAME and one flag per parameter the policies declare (their PARAMS in tinyavl/cache.py), with
    its meaning, range and default for each policy that takes it. Unset flags keep the policy's defaults;
    make_cache checks the values, so the command lines and the Python API reject the same things."""
    parser.add_argument("--policy", default="full", help="KV policy: " + ", ".join(POLICIES))
    for name, owners in param_owners().items():
        meanings = {}  # one meaning, one entry: "h2o, streaming: ..."
        for policy, param in owners.items():
            meanings.setdefault(f"{param.help}, {param.allowed()}", []).append(policy)
        defaults = ", ".join(f"{policy} {param.default}" for policy, param in owners.items())
        parser.add_argument(flag(name), dest=name, default=None,
                            # every policy declaring the flag gives it this type (test_policy_contract)
                            type=type(next(iter(owners.values())).default),
                            help="; ".join(f"{', '.join(policies)}: {text}" for text, policies in meanings.items())
                            + f" (default: {defaults})")


def check_filter_layer(args: argparse.Namespace, config, cache) -> str | None:
    """UserError for a --filter-layer the model (its config) has no layer for: the filter would never act. Where
    the policy's own filter_layer, not given, is past the model's layers (only small test models have so few),
    a note to print once every check has passed (a mistake is one line, with no note before it); else None."""
    n_layers = config.text.num_hidden_layers
    if args.filter_layer is not None and args.filter_layer >= n_layers:
        raise UserError(f"--filter-layer {args.filter_layer}: this model has {n_layers} decoder layers, and the "
                        f"filter drops tokens before one of them: give at most {n_layers - 1}")
    if args.filter_layer is None and cache.filters_prefill and cache.filter_layer >= n_layers:
        return (f"note: {cache.name}'s filter_layer is {cache.filter_layer} by default, and this model has "
                f"{n_layers} decoder layers: its prefill filter drops nothing here (--filter-layer {n_layers - 1} "
                "makes it act)")
    return None


def given_policy_params(args: argparse.Namespace) -> dict:
    """The policy parameters given on the command line (the cache's `params()` holds all, defaults too)."""
    return {name: getattr(args, name) for name in param_owners() if getattr(args, name) is not None}


def policy_cache(args: argparse.Namespace) -> KVCache:
    """The cache --policy and its flags ask for (`make_cache`); a mistake's message names the flags
    (--filter-layer), where the Python API's names the parameters (filter_layer)."""
    return make_cache(args.policy, named=flag, **given_policy_params(args))


# Threads beyond the cores only slow training down, but a run reproduces its weights only with the thread count
# that made them (2 for the committed toy), on any machine: so more threads than cores are allowed, up to a
# number no machine's training needs (torch would start a million, and hang).
MAX_THREADS = 256


def check_training_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The trainers' shared flags: --steps and --batch-size at least 1, a finite positive --lr (inf or nan
    would train NaN weights for an hour), --eval-every at least 0, --threads from 1 to MAX_THREADS, and a
    --seed torch can take."""
    for name in ("steps", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"{flag(name)} must be at least 1")
    if not 1 <= args.threads <= MAX_THREADS:
        parser.error(f"--threads must be from 1 to {MAX_THREADS}, got {args.threads}")
    if not 0 < args.lr < float("inf"):
        parser.error(f"--lr must be a finite number above 0, got {args.lr}")
    if args.eval_every < 0:
        parser.error(f"--eval-every must be at least 0 (0: none), got {args.eval_every}")
    try:
        SEED_PARAM.check(args.seed, lambda name: "--seed")
    except UserError as err:
        parser.error(str(err))


# ---------------------------------------------------------------------------------------------------
# How every command ends: its work inside `ended_in_one_line` (through `run_main` or `run_command`), which turns
# a user's mistake, a signal or what the system refuses into one line and an exit status; the streams it
# guards (`Notes`, `NamedStdout`) and the signals it handles (`signals_end_like_ctrl_c`).
# ---------------------------------------------------------------------------------------------------

class Terminated(BaseException):
    """A signal that asks a command to end (SIGTERM: `kill`, `timeout`, a job scheduler; SIGHUP: its terminal
    closed), raised where the command is, as Ctrl-C's KeyboardInterrupt is. A BaseException, like that one,
    so that no `except Exception` takes it for an error to handle."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def signals_end_like_ctrl_c():
    """While a command runs, SIGTERM and SIGHUP raise Terminated, unless they are ignored (`nohup`; from the
    main thread only: `handling`). Python's default for them ends the process on the spot, where no `finally`
    runs: a file being written would stay behind under its temporary name (tinyavl/files.py)."""
    def terminate(signum, frame):
        raise Terminated(signum)

    with handling(("SIGTERM", "SIGHUP"), terminate):
        yield


class Notes:
    """sys.stderr while a command runs: where its notes and its one-line errors go. Nobody may be reading
    them: stderr closed from the start (2>&-), a reader that stops reading (`2>&1 | head`, `2>&1 >out |
    true`), where a note's write raises BrokenPipeError, or a file that cannot take them (`2>>run.log` on a
    full disk: OSError). None ends the run, which still writes its answer and its files, and ends with the
    status it would have had; the notes go nowhere, never to stdout (where print(file=None) would send them)."""

    def __init__(self, stream):
        self.stream = stream  # the real stderr; None: nobody reads it

    def write(self, text: str) -> int:
        self._try(lambda stream: stream.write(text))
        return len(text)

    def flush(self) -> None:
        self._try(lambda stream: stream.flush())

    def _try(self, act) -> None:
        if self.stream is None:
            return
        try:
            act(self.stream)
        except BlockingIOError:
            return  # a non-blocking stderr whose reader is still there, its pipe full for now: this note is lost
        except OSError:  # BrokenPipeError is one
            # What the stream still buffers must not fail again when Python flushes it at exit: its file
            # descriptor now points at nothing (a stream without one is let go).
            if not tried_pointing_at_nothing(self.stream):
                self.stream = None

    def __getattr__(self, name):  # fileno, isatty, encoding, ...: the stream's
        return getattr(self.stream, name)


class NamedStdout:
    """sys.stdout while a command runs: a write the system refuses (`> answer.txt` on a full disk) names standard
    output in the line the command ends with, as a refused output file's names the file (the OSError of a
    stream's write names none)."""

    NAME = "standard output"

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        return self._named(self.stream.write, text)

    def flush(self) -> None:
        self._named(self.stream.flush)

    @staticmethod
    def _named(act, *args):
        try:
            return act(*args)
        except OSError as err:  # BrokenPipeError too: named, and ended quietly all the same
            err.filename = NamedStdout.NAME
            raise

    def __getattr__(self, name):  # fileno, isatty, encoding, ...: the stream's
        return getattr(self.stream, name)


def point_at_nothing(stream) -> None:
    """Point the file descriptor of a stream whose reader has gone, or whose disk is full, at /dev/null:
    Python's own advice for a broken pipe, so that the stream's flush at exit cannot fail again."""
    nothing = os.open(os.devnull, os.O_WRONLY)
    os.dup2(nothing, stream.fileno())
    os.close(nothing)


def tried_pointing_at_nothing(stream) -> bool:
    """`point_at_nothing`, and whether it could: False for a stream with no file descriptor to point (a test's
    capture, a notebook's stream)."""
    try:
        point_at_nothing(stream)
    except (AttributeError, OSError, ValueError):
        return False
    return True


@contextmanager
def wrapped_stream(name: str, wrap):
    """sys.<name> ("stdout", "stderr") is wrap(the stream) inside the block, and the stream as it was after."""
    real = getattr(sys, name)
    setattr(sys, name, wrap(real))
    try:
        yield
    finally:
        setattr(sys, name, real)


def notes_on_stderr():
    """sys.stderr is a `Notes` inside the block (sys.stderr as it was after)."""
    return wrapped_stream("stderr", lambda real: real if isinstance(real, Notes) else Notes(real))


def named_stdout():
    """sys.stdout is a `NamedStdout` inside the block, where it is open (sys.stdout as it was after)."""
    return wrapped_stream("stdout", lambda real: real if real is None or isinstance(real, NamedStdout)
                          else NamedStdout(real))


# What the system, not tinyavl, refuses: one line, status 1. Other OSErrors are bugs and keep their traceback.
SYSTEM_REFUSALS = {errno.ENOSPC, errno.EDQUOT, errno.ENAMETOOLONG, errno.ELOOP, errno.EROFS, errno.EACCES,
                   errno.EPERM, errno.EIO}


def run_command(run, args, show) -> int:
    """A command's exit status: run(args), then its result printed as one JSON object (--json) or by
    show(result), ended as `ended_in_one_line` says."""
    def work():
        result = run(args)
        if args.json:
            print(json.dumps(result))
        else:
            show(result)
    return ended_in_one_line(work)


def run_main(main) -> None:
    """Run a command's main() (one that prints as it goes: a training, the benchmark) and exit with the
    status `ended_in_one_line` gives it."""
    sys.exit(ended_in_one_line(main))


def ended_in_one_line(work) -> int:
    """work()'s exit status: 0, or one line on stderr instead of a traceback for a user's mistake (UserError,
    status 2), Ctrl-C (status 130), SIGTERM and SIGHUP (128 + the signal; no temporary file left), and what
    the system refused (SYSTEM_REFUSALS: a disk full, a name too long, stdout's named as such, `NamedStdout`;
    memory that ran out, `out_of_memory`; status 1). A reader that closed stdout early (`| head`) ends the run
    quietly; a run started with stdout closed (>&-) prints nothing there; one whose stderr nobody reads goes on
    (`Notes`)."""
    with notes_on_stderr():
        try:
            with signals_end_like_ctrl_c(), named_stdout():
                work()
                if sys.stdout is not None:  # None: started with stdout closed (>&-), where print prints nothing
                    sys.stdout.flush()  # here, where a closed pipe is caught, not at exit
            return 0
        except UserError as err:
            print(f"error: {one_line(err)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(signal_line(signal.SIGINT), file=sys.stderr)
            return 128 + signal.SIGINT  # as the shell reports a process the signal ended
        except Terminated as stop:
            print(signal_line(stop.signum), file=sys.stderr)
            return 128 + stop.signum
        except BrokenPipeError:  # stdout's reader has gone
            point_at_nothing(sys.stdout)
            return 1
        except OSError as err:
            if err.errno not in SYSTEM_REFUSALS:
                raise
            print(f"error: {one_line(err)}", file=sys.stderr)
            if err.filename == NamedStdout.NAME:
                # What stdout still buffers would be refused again at exit (Python's "Exception ignored", status
                # 120): its descriptor now points at nothing.
                tried_pointing_at_nothing(sys.stdout)
            return 1
        except (MemoryError, RuntimeError) as err:
            if not out_of_memory(err):
                raise
            detail = (str(err).strip() or type(err).__name__).splitlines()[0]
            print(f"error: out of memory ({detail}): a smaller model, image or setting (see --help) may fit",
                  file=sys.stderr)
            return 1


def print_progress(*values) -> None:
    """print(*values, flush=True) for a long command's progress on stdout (a training's log). Once its reader
    has gone (`| head`), the lines go nowhere and the run goes on, to write what it was started for: a
    training's folder is its result, not its log."""
    try:
        print(*values, flush=True)
    except BrokenPipeError:
        point_at_nothing(sys.stdout)


def one_line(message) -> str:
    """An error (or its message) on one line, whatever it quotes: a path may hold a line break."""
    return str(message).replace("\r", "\\r").replace("\n", "\\n")


def out_of_memory(err: BaseException) -> bool:
    """Whether the memory ran out, which the system refuses as it refuses a full disk: Python's MemoryError,
    torch's OutOfMemoryError (a GPU's), or the RuntimeError torch's CPU allocator raises (errno 12, ENOMEM)."""
    return (isinstance(err, (MemoryError, torch.OutOfMemoryError))
            or (isinstance(err, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(err)))
