"""A one-for-one supervisor for actors, in the shape of OTP's.

* Children start in order, each with ``TaskGroup.start``, so an ``init``
  failure reaches whoever entered the supervisor.
* Children stop in reverse order (a buffer stops before the writer it flushes
  into). A child gets ``shutdown`` seconds to handle what is already queued
  and terminate; if it overruns, it is cancelled and its ``terminate`` gets
  one more ``shutdown`` seconds for a best-effort flush.
* A crashed child is restarted alone (one_for_one) on the same mailbox,
  after its ``terminate`` ran with the crash as reason. ``temporary``
  children are never restarted.
* More than ``max_restarts`` restarts within ``max_seconds`` (a sliding
  window on the loop clock) means something is deeply wrong: the supervisor
  stops the other children in order and raises
  :class:`~analytics_buffer.RestartIntensityExceeded` instead of looping.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, final

import anyio
from anyio.abc import TaskGroup

from ._actor import Actor, ActorRef, fail_pending_calls, request_stop, run_actor
from ._exceptions import ActorDeadError, RestartIntensityExceeded

__all__ = ("ChildSpec", "Restart", "Supervisor")

log = logging.getLogger("analytics_buffer.supervisor")

Restart = Literal["permanent", "transient", "temporary"]


@dataclass(frozen=True)
class ChildSpec:
    """How to start and stop one child.

    :param id: unique name of the child (and of its ref)
    :param factory: makes a fresh actor instance, for the start and each restart
    :param restart: ``permanent`` and ``transient`` children are restarted
        after a crash, ``temporary`` ones are not
    :param shutdown: seconds the child gets to stop
    :param mailbox_size: bound of the child's mailbox
    """

    id: str
    factory: Callable[[], Actor]
    restart: Restart = "permanent"
    shutdown: float = 5.0
    mailbox_size: int = 1024


@final
class _Child:
    def __init__(self, spec: ChildSpec) -> None:
        self.spec = spec
        self.ref = ActorRef(spec.id, spec.mailbox_size)
        self.scope = anyio.CancelScope()
        self.done = anyio.Event()
        self.stopping = False


@final
class Supervisor:
    """Starts, watches and stops a list of actors; an async context manager.

    :param children: started in this order, stopped in the reverse order
    :param max_restarts: restarts allowed within ``max_seconds``
    :param max_seconds: the sliding window for ``max_restarts``
    :param on_restart: called with the child id and the crash before each restart
    """

    def __init__(
        self,
        children: Sequence[ChildSpec],
        *,
        max_restarts: int = 3,
        max_seconds: float = 5.0,
        on_restart: Callable[[str, Exception], None] | None = None,
    ) -> None:
        ids = [spec.id for spec in children]
        if len(set(ids)) != len(ids):
            raise ValueError(f"child ids must be unique, got {ids}")
        self._children = [_Child(spec) for spec in children]
        self._max_restarts = max_restarts
        self._max_seconds = max_seconds
        self._on_restart = on_restart
        self._restart_times: deque[float] = deque()
        self._task_group: TaskGroup | None = None

    def ref(self, child_id: str) -> ActorRef:
        """Return the ref of the child named ``child_id``."""
        for child in self._children:
            if child.spec.id == child_id:
                return child.ref
        raise KeyError(child_id)

    async def __aenter__(self) -> Supervisor:
        task_group = anyio.create_task_group()
        await task_group.__aenter__()
        self._task_group = task_group
        started: list[_Child] = []
        try:
            for child in self._children:
                await task_group.start(self._supervise, child)
                started.append(child)
        except BaseException:
            await self._stop_children(started)
            self._release_mailboxes()
            task_group.cancel_scope.cancel()
            await task_group.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool | None:
        assert self._task_group is not None
        try:
            await self._stop_children(self._children)
        finally:
            self._release_mailboxes()
        try:
            return await self._task_group.__aexit__(exc_type, exc, traceback)
        except BaseExceptionGroup as group:
            if exc is not None and len(group.exceptions) == 1 and group.exceptions[0] is exc:
                return None  # the body's own exception leaves as itself
            raise

    async def _supervise(
        self, child: _Child, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        spec = child.spec
        try:
            with child.scope:
                reason = await run_actor(
                    spec.factory(), child.ref, shutdown=spec.shutdown, task_status=task_status
                )
                # Also while stopping: the stop request still waits behind the backlog.
                while reason is not None and spec.restart != "temporary":
                    self._count_restart(child, reason)
                    reason = await self._restart(child)
                if reason is not None:
                    log.error("%s crashed and is temporary: not restarted", spec.id)
        except RestartIntensityExceeded:
            others = [c for c in self._children if c is not child]
            with anyio.CancelScope(shield=True):
                await self._stop_children(others)
            raise
        finally:
            child.done.set()

    async def _restart(self, child: _Child) -> Exception | None:
        try:
            return await run_actor(child.spec.factory(), child.ref, shutdown=child.spec.shutdown)
        except Exception as exc:
            log.exception("%s failed to restart", child.spec.id)
            return exc

    def _count_restart(self, child: _Child, reason: Exception) -> None:
        now = anyio.current_time()
        window = self._restart_times
        while window and window[0] <= now - self._max_seconds:
            window.popleft()
        if len(window) >= self._max_restarts:
            raise RestartIntensityExceeded(
                f"{child.spec.id} crashed after {len(window)} restarts within "
                f"{self._max_seconds} s (max_restarts={self._max_restarts})"
            ) from reason
        window.append(now)
        log.warning("restarting %s after %r", child.spec.id, reason)
        if self._on_restart is not None:
            self._on_restart(child.spec.id, reason)

    async def _stop_children(self, children: Sequence[_Child]) -> None:
        for child in reversed(children):
            if child.done.is_set():
                continue
            child.stopping = True
            with anyio.CancelScope(shield=True):
                with anyio.move_on_after(child.spec.shutdown):
                    await request_stop(child.ref)
                    await child.done.wait()
                if not child.done.is_set():
                    log.error("%s overran its shutdown of %s s: cancelled", *_describe(child))
                    child.scope.cancel()
                    await child.done.wait()

    def _release_mailboxes(self) -> None:
        for child in self._children:
            # A timer that fired during the stop carries nothing to lose: only casts count.
            left = fail_pending_calls(
                child.ref.mailbox.drain_nowait(),
                ActorDeadError(f"{child.spec.id} has stopped"),
                keep_infos=False,
            )
            if left:
                log.error("%s stopped with %d unhandled messages", child.spec.id, len(left))
            child.ref.mailbox.release()


def _describe(child: _Child) -> tuple[str, float]:
    return child.spec.id, child.spec.shutdown
