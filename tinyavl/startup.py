"""A command's first second: Ctrl-C, SIGTERM or SIGHUP while Python imports torch.

torch takes a second or more to import, and code it runs meanwhile catches exceptions: a Ctrl-C raised as
KeyboardInterrupt there was lost (the run went on) or became another error's traceback (a RecursionError
once), and Python's default for SIGTERM and SIGHUP ends the process without a word. So while tinyavl's
imports run in one of its commands, each of the three ends the process at once, with one line and the
status it has later (tinyavl/cli.py, `ended_in_one_line`: 130, 143, 129): nothing has been written yet.
tinyavl/__init__.py runs its imports inside `signals_end_the_imports`. `handling`, the way both it and a running
command (`cli.signals_end_like_ctrl_c`) handle signals for a while, is here too. This module imports nothing slow.
"""
import os
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COMMANDS = (REPO / "main.py", REPO / "tinyavl", REPO / "kernels")  # the command lines, and where the others are


def starting_a_command() -> bool:
    """Whether this process is one of tinyavl's commands, importing it: `python -m tinyavl...` (while Python
    imports a module's packages, sys.argv[0] is "-m"), main.py or `python -m kernels...` (the program being
    run is one of COMMANDS; any `python -m` whose packages import tinyavl counts too). Not a notebook or
    another program that imports tinyavl (pytest too): there a Ctrl-C stays Python's KeyboardInterrupt (a
    notebook's interrupt would end its kernel)."""
    program = getattr(sys.modules.get("__main__"), "__file__", None)
    return sys.argv[:1] == ["-m"] or (program is not None and any(Path(program).resolve().is_relative_to(command)
                                                                  for command in COMMANDS))


def signal_line(signum: int) -> str:
    """The one line a command ends with for a signal that ended it (Ctrl-C, SIGTERM, SIGHUP): here while it
    imports, and in `cli.ended_in_one_line` after. Its exit status is the shell's for it, 128 + signum (130
    for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP)."""
    return "interrupted (Ctrl-C)" if signum == signal.SIGINT else f"terminated ({signal.Signals(signum).name})"


def ended_while_importing(signum, frame):
    """The line a command says later for the signal (`signal_line`), and the shell's status for it."""
    try:  # said where stderr is read: it may be closed (2>&-, sys.stderr None) or its reader gone
        os.write(sys.stderr.fileno(), f"{signal_line(signum)}\n".encode())
    except (AttributeError, OSError, ValueError):
        pass
    os._exit(128 + signum)


@contextmanager
def handling(names: tuple[str, ...], handler, active: bool = True):
    """Inside the block `handler` handles the signals named (those the platform has: no SIGHUP on Windows);
    after it, each is what it was. A signal the process was started to ignore stays ignored (Ctrl-C in a
    shell's background job; SIGHUP under `nohup`, which keeps a training through a closed terminal). Signal
    handlers can only be set from the main thread: elsewhere, or where not `active`, nothing changes."""
    active = active and threading.current_thread() is threading.main_thread()
    signals = [getattr(signal, name) for name in names if hasattr(signal, name)] if active else []
    previous = {sig: signal.getsignal(sig) for sig in signals}
    handled = [sig for sig, old in previous.items() if old is not signal.SIG_IGN]
    for sig in handled:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig in handled:
            signal.signal(sig, previous[sig])


@contextmanager
def signals_end_the_imports():
    """Inside the block, in a command (`starting_a_command`), Ctrl-C, SIGTERM and SIGHUP end the process with
    one line (`ended_while_importing`); after it, each is what it was (`handling`)."""
    with handling(("SIGINT", "SIGTERM", "SIGHUP"), ended_while_importing, active=starting_a_command()):
        yield
