"""The failures the CLI tells apart: ``UserError`` (bad input: one line, exit 2), ``RunError`` (a failure while
running: one line, exit 1) and ``Interrupted`` (exit 130)."""


class UserError(Exception):
    """A problem with what the user gave us (config, path, data, checkpoint); the message names it in one line."""


class RunError(Exception):
    """A failure during a run (non-finite loss, out of memory, disk full); the message says what was kept."""


class Interrupted(Exception):
    """SIGINT/SIGTERM: the run stopped at a safe point with its state saved; ``--resume`` continues it (exit 130)."""
