"""The one exception type sftjobs raises for anything the user can fix.

The CLI turns it into a one-paragraph message on stderr and exit code 2; anything
else is a bug and keeps its traceback.
"""


class SftjobsError(Exception):
    """A user-facing error: the message says what is wrong (file, key or line) and what to do."""


class StepStopped(Exception):
    """A step that stopped on a signal (time limit, preemption, cancel) after saving what it needs to resume.

    Not a failure: the runtime records it as STOPPED, leaves the steps after it queued, and exits with
    EXIT_STOPPED; the requeued (or resumed) job carries on from the saved checkpoint.
    """


EXIT_STOPPED = 75  # EX_TEMPFAIL: "try again later"
