"""`StageError`: a stage cannot produce a meaningful output from its inputs (not a bug).

The run stops with a message that says what was wrong and where to look, and the CLI exits
non-zero without a traceback. Example: an iteration whose judge produced no preference pairs
must not go on to train on nothing.
"""


class StageError(RuntimeError):
    """A stage refused its inputs; the message names the stage, iteration and the evidence."""
