"""The two kinds of failure the CLI tells apart.

``UserError`` is a bad input (config, path, data, checkpoint): the CLI prints one line and exits 2.
``RunError`` is a failure while running (non-finite loss, out of memory, disk full): one line, exit 1.
"""


class UserError(Exception):
    """A problem with what the user gave us; the message names it in one line."""


class RunError(Exception):
    """A failure during a run; the message says what happened and what was kept."""


class Interrupted(Exception):
    """SIGINT/SIGTERM: the run stopped at a safe point with its state saved; ``--resume`` continues it (exit 130)."""
