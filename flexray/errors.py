"""User-facing errors: one line, exit code 2, never a traceback."""


class FlexrayError(Exception):
    """A mistake in user input (config, data path, checkpoint, device report).

    The CLI prints ``str(err)`` on one line and exits with code 2.
    """

    exit_code = 2
