"""The one exception type for mistakes a user can fix (a wrong path, a broken file, a bad option).

`main.py` prints such an error as a single line and exits with status 2; anything else is a bug in
tinyavl and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input: the message says what is wrong and how to fix it."""
