"""Ctrl-C and SIGTERM as exceptions, raised where the main thread is, except inside a block that
must not be cut: a checkpoint being written. Orbax writes a step with helper threads that wait for
the main thread's signal that the step is complete; an exception raised in the middle of
`CheckpointManager.save` leaves one of them waiting for ever, and the interpreter then hangs at
exit joining it. So a signal that arrives inside `uninterruptible()` is raised when the block ends."""

import contextlib
import signal


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a scheduler ending a job), raised as Ctrl-C's KeyboardInterrupt is, so that
    the process ends as Ctrl-C ends it: the checkpoints written, the tracker closed, where to go on said."""


_depth = 0  # of nested uninterruptible blocks
_pending: list[type[KeyboardInterrupt]] = []


def _raiser(exception: type[KeyboardInterrupt]):
    def handler(signum, frame):
        if _depth:
            _pending.append(exception)
        else:
            raise exception()

    return handler


def install() -> None:
    """Ctrl-C raises KeyboardInterrupt and SIGTERM Terminated, each held back by `uninterruptible()`
    (from the main thread, the only one that may set signal handlers)."""
    signal.signal(signal.SIGINT, _raiser(KeyboardInterrupt))
    signal.signal(signal.SIGTERM, _raiser(Terminated))


@contextlib.contextmanager
def uninterruptible():
    """The block runs to its end; a Ctrl-C or SIGTERM that came meanwhile is raised after it."""
    global _depth
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if not _depth and _pending:
            exception = _pending[0]
            _pending.clear()
            raise exception()
