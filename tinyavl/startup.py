"""A command's first second: Ctrl-C while Python imports torch.

torch takes a second or more to import, and code it runs meanwhile catches exceptions: a Ctrl-C raised as
KeyboardInterrupt there was lost (the run went on) or became another error's traceback (a RecursionError
once). So while tinyavl's imports run in one of its commands, Ctrl-C ends the process at once, with one line
and status 130, as it ends a command later (tinyavl/cli.py, `ended_in_one_line`): nothing has been written
yet. tinyavl/__init__.py runs its imports inside `ctrl_c_ends_the_imports`. This module imports nothing slow.
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


def interrupted_while_importing(signum, frame):
    try:  # said where stderr is read: it may be closed (2>&-, sys.stderr None) or its reader gone
        os.write(sys.stderr.fileno(), b"interrupted (Ctrl-C)\n")
    except (AttributeError, OSError, ValueError):
        pass
    os._exit(130)  # the shell's status for an interrupt


@contextmanager
def ctrl_c_ends_the_imports():
    """Inside the block, in a command (`starting_a_command`), Ctrl-C ends the process with one line; after
    it, Ctrl-C is what it was. A Ctrl-C that was ignored (a shell's background job) stays ignored; signal
    handlers can only be set from the main thread."""
    previous = signal.getsignal(signal.SIGINT)
    guard = (starting_a_command() and previous is not signal.SIG_IGN
             and threading.current_thread() is threading.main_thread())
    if guard:
        signal.signal(signal.SIGINT, interrupted_while_importing)
    try:
        yield
    finally:
        if guard:
            signal.signal(signal.SIGINT, previous)
