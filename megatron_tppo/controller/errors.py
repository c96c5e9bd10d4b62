"""Why a run stopped on its own (no Ray import: the entry point catches these cheaply)."""


class RunAborted(RuntimeError):
    """The run cannot go on; the message says why. The latest whole checkpoint can resume it."""


class ActorDiedError(RunAborted):
    """A Ray actor of the run died (or stopped answering); the message names which one."""


class NonFiniteLossError(RunAborted):
    """Too many consecutive updates had a NaN/inf loss (``algorithm.max_nonfinite_updates``)."""
