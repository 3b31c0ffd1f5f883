"""The one exception type sftjobs raises for anything the user can fix.

The CLI turns it into a one-paragraph message on stderr and exit code 2; anything
else is a bug and keeps its traceback.
"""


class SftjobsError(Exception):
    """A user-facing error: the message says what is wrong (file, key or line) and what to do."""
