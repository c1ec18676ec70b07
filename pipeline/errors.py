"""Errors a user can act on. Each renders as one line, with no traceback."""


class PipelineError(Exception):
    """A problem the user can fix; the message is the whole story."""


class SpecError(PipelineError):
    """An image spec or profile is wrong. Names the file, the image and the key."""

    def __init__(self, path, image: str | None, key: str | None, problem: str):
        where = str(path)
        if image:
            where += f": image {image!r}"
        if key:
            where += f": key {key!r}"
        super().__init__(f"{where}: {problem}")


class InventoryError(PipelineError):
    """A node inventory is wrong. Names the file, the node and the field."""

    def __init__(self, path, node: str | None, field: str | None, problem: str):
        parts = [str(path), f"node {node!r}" if node else "", f"field {field!r}" if field else "", problem]
        super().__init__(": ".join(part for part in parts if part))


class ToolMissing(PipelineError):
    """A host command is not installed."""


def exit_status(returncode: int) -> str:
    """How a command ended, as a reader wants it: "exit 2", or "killed by SIGTERM" where
    subprocess reports a signal as a negative return code."""
    if returncode >= 0:
        return f"exit {returncode}"
    import signal

    try:
        return f"killed by {signal.Signals(-returncode).name}"
    except ValueError:
        return f"killed by signal {-returncode}"


class CommandFailed(PipelineError):
    """A subprocess exited non-zero."""

    def __init__(self, argv: list[str], returncode: int, detail: str = ""):
        import shlex

        self.argv = argv
        self.returncode = returncode
        message = f"command failed ({exit_status(returncode)}): {shlex.join(argv)}"
        if detail:
            message += f": {detail}"
        super().__init__(message)


class CommandTimedOut(PipelineError):
    """A subprocess ran past its deadline and was stopped."""

    def __init__(self, argv: list[str], timeout: float):
        import shlex

        self.argv = argv
        self.timeout = timeout
        super().__init__(f"command stopped after its deadline of {timeout:g} s: {shlex.join(argv)}")
