"""Run a command in its own process group, streaming its output lines, with a deadline.

Guarantees: the command never outlives the coroutine that runs it. On the deadline, on
cancellation (``asyncio.CancelledError``) and when the line callback raises, the whole
process group is stopped (SIGTERM, so a build CLI can cancel its remote build; SIGKILL after
5 s; then SIGKILL again for anything the command left behind in its group) and reaped before
the exception propagates. Output is read as bytes from one pipe (stdout and stderr merged),
so a line longer than 16 KiB reaches the callback in pieces instead of exhausting memory.

It runs as an asyncio subprocess: the event loop keeps running meanwhile (in a flow, the
key lock's lease renewal). If the worker itself is SIGKILLed the command is orphaned; a
build step re-run after resumption pushes the same tag again, which is harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable, Mapping, Sequence

__all__ = ["ProcessStartError", "run_process_group"]

_READ_BYTES = 65536
_MAX_LINE_BYTES = 16 * 1024
_STOP_GRACE_SECONDS = 5.0


class ProcessStartError(Exception):
    """The command could not be started (not found, not executable); the message says why."""


async def run_process_group(
    argv: Sequence[str],
    env: Mapping[str, str],
    on_line: Callable[[bytes], None],
    timeout: float,
) -> int:
    """Run ``argv`` to its end, passing each line of its output to ``on_line``.

    Args:
        argv: the command (``argv[0]`` an executable path).
        env: its whole environment.
        on_line: called with each line (without its newline); an exception it raises stops
            the command and propagates.
        timeout: seconds until the command is stopped.

    Returns:
        The exit status; negative when a signal killed it (``-9``: SIGKILL).

    Raises:
        ProcessStartError: the command could not be started.
        TimeoutError: ``timeout`` passed (the command has been stopped).
        asyncio.CancelledError: the coroutine was cancelled (the command has been stopped).
    """
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=dict(env),
            start_new_session=True,
        )
    except OSError as exc:
        raise ProcessStartError(f"cannot run '{argv[0]}': {exc.strerror}") from None
    try:
        async with asyncio.timeout(timeout):
            assert process.stdout is not None
            await _pump(process.stdout, on_line)
            return await process.wait()
    finally:
        if process.returncode is None:
            await _stop(process)


async def _pump(stream: asyncio.StreamReader, on_line: Callable[[bytes], None]) -> None:
    buffer = b""
    while chunk := await stream.read(_READ_BYTES):
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            on_line(line)
        while len(buffer) > _MAX_LINE_BYTES:
            on_line(buffer[:_MAX_LINE_BYTES])
            buffer = buffer[_MAX_LINE_BYTES:]
    if buffer:
        on_line(buffer)


async def _stop(process: asyncio.subprocess.Process) -> None:
    _signal_group(process.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), _STOP_GRACE_SECONDS)
    except TimeoutError:
        _signal_group(process.pid, signal.SIGKILL)
        await process.wait()
    _signal_group(process.pid, signal.SIGKILL)


def _signal_group(pid: int, signum: signal.Signals) -> None:
    # The group may be gone already (ProcessLookupError); never signal anything else.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signum)
