"""One exception type for bad user input: the CLI prints its message on one line and exits non-zero."""


class HfllmError(Exception):
    """A problem with the user's input (recipe, file, model, data). The message names the thing and the fix.
    The CLI exits with `exit_code` (2)."""

    exit_code = 2


class TrainingHalted(HfllmError):
    """A run stopped by its health checks (non-finite loss or gradients, a loss spike with `spike_action: stop`, or
    weights that may not be saved): nothing non-finite was written. The CLI exits with code 3 (docs/reliability.md)."""

    exit_code = 3
