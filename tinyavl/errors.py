"""The one exception type for mistakes a user can fix (a wrong path, a broken file, a bad option).

Every command (main.py, the trainers, the evaluations, the benchmarks) prints such an error as a single line
and exits with status 2: `tinyavl.cli.ended_in_one_line`, which also says what else ends in one line (Ctrl-C,
SIGTERM, what the system refuses: a full disk, memory that ran out). Anything else is a bug in tinyavl and
keeps its traceback. Beside it, what a user's setting counts as a number (`is_whole`, `is_real`).
"""
import numbers


class UserError(Exception):
    """A problem with the user's input: the message says what is wrong and how to fix it."""


def is_whole(x) -> bool:
    """An integer (a Python or numpy one), not a bool: True is not the count 1 here."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def is_real(x) -> bool:
    """A real number (a Python or numpy one), not a bool."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)
