"""Give-up hooks: what a service does when one of its calls ends without success.

Restate keeps a failed invocation's state; a deploy must still leave its deployment ``failed``
(SPEC §3: "a call that gives up always leaves its resource in a terminal state"). A flow
declares ``@service_flow(name, on_give_up=hook)``; the kernel then runs ``hook(parameters,
reason)`` whenever a call whose parameters were accepted ends without success:

- the body raised (a terminal error, or a retryable one whose step retries ran out): the hook
  runs in the same process, before the run is marked Failed;
- the reconciler gives up resuming a run that crashed again and again (SIGKILL, OOM, a lost
  host): it tags the run ``ctrl:give-up`` and reschedules it once more; that attempt runs only
  the hook and ends Failed with the reason;
- the run was cancelled while running (by the API, through the ``ctrl-warm`` worker): the same
  give-up attempt, ending Cancelled.

Crash-safe: the hook runs inside the flow run, so a process killed in the middle of the hook
is resumed like any other and runs it again; a hook must therefore be idempotent (set a
status, write a message). A call refused at parameter validation accepted nothing and runs no
hook (nothing was written, SPEC §5 scenario 4).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from worker.kernel.errors import TerminalError

__all__ = [
    "CANCELLED_REASON",
    "GIVE_UP_PREFIX",
    "GIVE_UP_TAG",
    "GaveUpError",
    "GiveUpHook",
    "give_up_hook",
    "has_give_up_hook",
    "register_give_up_hook",
]

GIVE_UP_TAG = "ctrl:give-up"
GIVE_UP_PREFIX = "giving up: "
CANCELLED_REASON = "cancelled while running"

GiveUpHook = Callable[[dict[str, Any], str], None]
"""``hook(parameters, reason)``: the call's parameters as given, and why it ends."""

_HOOKS: dict[str, GiveUpHook] = {}


class GaveUpError(TerminalError):
    """The call ended without success; its give-up hook ran. The message is the reason."""


def register_give_up_hook(flow_name: str, hook: GiveUpHook) -> None:
    """Make ``hook`` the give-up hook of the flow named ``flow_name``."""
    _HOOKS[flow_name] = hook


def give_up_hook(flow_name: str) -> GiveUpHook | None:
    """The give-up hook of a flow, if it has one."""
    return _HOOKS.get(flow_name)


def has_give_up_hook(flow_name: str) -> bool:
    """True when the flow declared a give-up hook (its module must be imported)."""
    return flow_name in _HOOKS
