"""Calls to the SuperLink that survive its passing failures.

Flower 1.42's ServerApp side gives up on the first 500 (its HTTP retry covers 502-504 and
dropped connections only), and a SuperLink whose SQLite state is busy answers 500
("database is locked"). :class:`RetryingGrid` retries such calls with bounded exponential
back-off and full jitter, and lets permanent errors (authentication, a version mismatch, a
malformed request, a stopped run) through at once. A pull is retried with the same message
ids; a reply is confirmed to the SuperLink only once it has been read, so a retried pull
finds it again, and the round loop folds each reply once, when it is returned. The
ServerApp's heartbeat, which Flower sends from its own thread, is kept alive the same way
(:func:`shield_heartbeat`).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable
from typing import TypeVar

import httpx
from flwr.app import Message
from flwr.serverapp import Grid

from server.liveness import Pulse

log = logging.getLogger("flwr.ark.server")
T = TypeVar("T")


def transient(exc: BaseException) -> bool:
    """Whether a failed SuperLink call may succeed when tried again."""
    if isinstance(exc, httpx.HTTPStatusError):
        code = exc.response.status_code
        return (code >= 500 and code != 501) or code in (408, 429)
    if isinstance(exc, httpx.TransportError):
        return True
    return "database is locked" in str(exc)


class RetryingGrid:
    """A ``Grid`` whose push, pull and node listing are retried on transient failures.

    Args:
        grid: The Grid Flower gave the ServerApp.
        give_up_s: Longest time one call keeps trying before its last error is raised.
        base_s: First back-off; it doubles up to ``cap_s``, each wait drawn from [0, it].
        cap_s: Longest single wait.
        seed: Seeds the jitter (tests).
        pulse: Beaten on every try, so that ark-server sees the ServerApp move.
    """

    def __init__(self, grid: Grid, *, give_up_s: float = 600.0, base_s: float = 0.5,
                 cap_s: float = 30.0, seed: int | None = None,
                 pulse: Pulse | None = None) -> None:
        self.grid, self.pulse = grid, pulse
        shield_heartbeat(grid)
        self.give_up_s, self.base_s, self.cap_s = give_up_s, base_s, cap_s
        self.retries = 0  # failed calls that were tried again, over the run
        self._rng = random.Random(seed)

    def __getattr__(self, name: str):
        return getattr(self.grid, name)  # the rest of the Grid, as it is

    def get_node_ids(self) -> list[int]:
        return self._call("get-nodes", lambda: list(self.grid.get_node_ids()))

    def push_messages(self, messages: Iterable[Message]) -> list[str | None]:
        msgs = list(messages)
        return self._call("push-messages", lambda: list(self.grid.push_messages(msgs)))

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        ids = list(message_ids)
        return self._call("pull-messages", lambda: list(self.grid.pull_messages(ids)))

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        deadline = time.monotonic() + self.give_up_s
        ceiling, tries = self.base_s, 0
        while True:
            if self.pulse is not None:
                self.pulse.beat()
            try:
                return fn()
            except Exception as e:  # noqa: BLE001 - classified below; permanent ones re-raised
                tries += 1
                wait = self._rng.uniform(0, ceiling)
                if not transient(e) or time.monotonic() + wait > deadline:
                    if transient(e):
                        log.error("SuperLink %s still failing after %d tries over %.0f s: %s",
                                  what, tries, self.give_up_s, e)
                    raise
                self.retries += 1
                log.warning("SuperLink %s failed (%s); try %d again in %.1f s", what,
                            _short(e), tries + 1, wait)
                time.sleep(wait)
                ceiling = min(2 * ceiling, self.cap_s)


def shield_heartbeat(grid: object) -> bool:
    """Keep Flower's ServerApp heartbeat alive across transient SuperLink errors.

    Flower 1.42's heartbeat thread retries a 503/504 or a dropped connection but dies on a
    500, after which the SuperLink stops hearing from the ServerApp and ends its run. Its
    heartbeat function calls ``grid._runtime_client.SendTaskHeartbeat`` afresh each time, so
    wrapping that one method turns a transient error into the dropped connection Flower
    retries (with its own back-off, up to 20 s). Returns whether there was one to wrap.
    """
    client = getattr(grid, "_runtime_client", None)
    send = getattr(client, "SendTaskHeartbeat", None)
    if send is None or getattr(send, "ark_shielded", False):
        return False

    def send_retried(request: object) -> object:
        try:
            return send(request)
        except httpx.TransportError:
            raise
        except Exception as e:  # noqa: BLE001 - only transient errors are recast
            if not transient(e):
                raise
            log.warning("SuperLink heartbeat failed (%s); Flower tries it again", _short(e))
            raise httpx.TransportError(f"heartbeat: {_short(e)}") from e

    send_retried.ark_shielded = True  # type: ignore[attr-defined]
    client.SendTaskHeartbeat = send_retried  # type: ignore[union-attr]
    return True


def _short(exc: BaseException) -> str:
    if isinstance(exc, httpx.HTTPStatusError):
        return f"HTTP {exc.response.status_code}"
    return f"{type(exc).__name__}: {str(exc)[:120]}"
