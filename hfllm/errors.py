"""One exception type for bad user input: the CLI prints its message on one line and exits non-zero."""


class HfllmError(Exception):
    """A problem with the user's input (recipe, file, model, data). The message names the thing and the fix."""
