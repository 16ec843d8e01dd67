"""Errors the command line turns into a message and an exit status."""


class UsageError(Exception):
    """Bad input from the user: the message names the problem and the fix. Exit status 2."""

    exit_code = 2


class BuildFailed(Exception):
    """A layer failed to build or failed its checks. Exit status 1."""

    exit_code = 1

    def __init__(self, layer: str, reason: str, output: str = ""):
        self.layer = layer
        self.reason = reason
        self.output = output
        super().__init__(f"layer {layer!r}: {reason}")
