"""The one exception type for mistakes a user can fix (a wrong path, a broken file, a bad option).

`main.py` prints such an error as a single line and exits with status 2. Beside it only Ctrl-C and what
the system refuses (a full disk, a name too long: `tinyavl.cli.run_command`) end in one line; anything
else is a bug in tinyavl and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input: the message says what is wrong and how to fix it."""
