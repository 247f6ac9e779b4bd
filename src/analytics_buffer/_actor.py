"""Actors in the GenServer shape, on anyio.

An actor is a task that owns private state and reads a bounded
:class:`~analytics_buffer._mailbox.Mailbox`. Other tasks talk to it only
through its :class:`ActorRef`:

* :meth:`ActorRef.cast` queues a message and returns at once (never awaits);
  an exception while handling it crashes the actor, and the supervisor
  decides what happens next;
* :meth:`ActorRef.call` queues a message and awaits the reply; an exception
  raised while handling it is re-raised in the caller, and the actor goes on;
* :meth:`Actor.send_after` schedules a message to the actor itself
  (``Process.send_after``), delivered to :meth:`Actor.handle_info`.

Callbacks: :meth:`Actor.init`, :meth:`Actor.handle_call`,
:meth:`Actor.handle_cast` (or, for throughput, :meth:`Actor.handle_casts`
with a run of consecutive casts), :meth:`Actor.handle_info` and
:meth:`Actor.terminate`. Unknown messages are logged and dropped.

The mailbox belongs to the ref, not to the actor instance, so it survives a
restart; messages taken but not handled before a crash are carried over.
"""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Iterator
from typing import Any, Final, Generic, TypeVar, final

import anyio
from anyio.abc import TaskGroup

from ._exceptions import ActorDeadError, CallTimeout
from ._mailbox import Mailbox, MailboxStatistics

__all__ = (
    "Actor",
    "ActorRef",
    "Reply",
    "Timer",
    "fail_pending_calls",
    "request_stop",
    "run_actor",
)

log = logging.getLogger("analytics_buffer.actor")

T = TypeVar("T")

_NOT_SET: Final = object()


@final
class Reply(Generic[T]):
    """The one-shot answer to a call: the actor sends a value or fails it.

    An actor may keep a reply and answer later (GenServer's ``noreply``),
    even from another actor it hands the work to. Only the first answer
    counts; later ones are ignored.
    """

    __slots__ = ("_error", "_event", "_value")

    def __init__(self) -> None:
        self._event = anyio.Event()
        self._value: Any = _NOT_SET
        self._error: BaseException | None = None

    @property
    def done(self) -> bool:
        """Whether an answer has been given."""
        return self._event.is_set()

    def send(self, value: T) -> None:
        """Answer with ``value``."""
        if not self._event.is_set():
            self._value = value
            self._event.set()

    def fail(self, error: BaseException) -> None:
        """Answer by raising ``error`` in the caller."""
        if not self._event.is_set():
            self._error = error
            self._event.set()

    async def wait(self) -> T:
        """Wait for the answer; return the value or raise the error."""
        await self._event.wait()
        if self._error is not None:
            raise self._error
        value: T = self._value
        return value


@final
class _Call:
    __slots__ = ("message", "reply")

    def __init__(self, message: object, reply: Reply[Any]) -> None:
        self.message = message
        self.reply = reply


@final
class _Info:
    __slots__ = ("message",)

    def __init__(self, message: object) -> None:
        self.message = message


@final
class _Stop:
    """Asks the actor to finish: everything queued before it is handled first."""


_STOP: Final = _Stop()
_CONTROL: Final = frozenset({_Call, _Info, _Stop})


@final
class ActorRef:
    """The address of an actor: what other tasks hold to talk to it.

    :param name: used in logs and errors
    :param capacity: the mailbox bound
    """

    def __init__(self, name: str, capacity: int) -> None:
        self.name = name
        self.mailbox: Mailbox[object] = Mailbox(capacity)
        self.alive = False

    def __repr__(self) -> str:
        return f"<ActorRef {self.name} alive={self.alive}>"

    def cast(self, message: object) -> None:
        """Queue ``message`` for :meth:`Actor.handle_cast`; never waits.

        :raises MailboxFull: when the mailbox is at its bound
        :raises ActorDeadError: when the actor has stopped for good
        """
        self.mailbox.send_nowait(message)

    async def send(self, message: object) -> None:
        """Like :meth:`cast`, but wait for room when the mailbox is full."""
        await self.mailbox.send(message)

    def info(self, message: object) -> None:
        """Queue ``message`` for :meth:`Actor.handle_info`; never waits."""
        self.mailbox.send_nowait(_Info(message))

    async def call(self, message: object, *, timeout: float | None = 5.0) -> Any:
        """Send ``message`` to :meth:`Actor.handle_call` and return its reply.

        :param timeout: seconds to wait for the reply (``None``: no limit)
        :raises CallTimeout: when no reply comes in time
        :raises ActorDeadError: when the actor stops before replying
        """
        reply: Reply[Any] = Reply()
        try:
            with anyio.fail_after(math.inf if timeout is None else timeout):
                await self.mailbox.send(_Call(message, reply))
                return await reply.wait()
        except TimeoutError as exc:
            if isinstance(exc, CallTimeout | ActorDeadError):
                raise
            raise CallTimeout(f"{self.name} did not reply within {timeout} s") from None

    def statistics(self) -> MailboxStatistics:
        """Return the mailbox's statistics."""
        return self.mailbox.statistics()


@final
class Timer:
    """A pending :meth:`Actor.send_after`; cancel it to stop the message."""

    __slots__ = ("_scope",)

    def __init__(self, scope: anyio.CancelScope) -> None:
        self._scope = scope

    def cancel(self) -> None:
        """Stop the message from being sent, if it has not been already."""
        self._scope.cancel()


class Actor:
    """Base class of actors; override the callbacks you need.

    An instance lives from :meth:`init` to :meth:`terminate`; a restart makes
    a fresh instance on the same :class:`ActorRef`.
    """

    ref: ActorRef
    _task_group: TaskGroup

    async def init(self) -> None:
        """Prepare state; an exception here fails the start and reaches the starter."""

    async def handle_call(self, message: object, reply: Reply[Any]) -> None:
        """Answer a call through ``reply`` (now, or later by keeping it)."""
        log.warning("%s: dropped unknown call %r", self.ref.name, message)
        reply.fail(ValueError(f"{self.ref.name} does not understand {message!r}"))

    async def handle_cast(self, message: object) -> None:
        """Handle a cast; an exception crashes the actor."""
        log.warning("%s: dropped unknown cast %r", self.ref.name, message)

    async def handle_casts(self, messages: Iterator[object]) -> None:
        """Handle a run of consecutive casts; override to batch them.

        A cast taken from ``messages`` counts as delivered: if handling it
        raises, what the actor kept goes to :meth:`terminate` and the casts
        not yet taken go to the next instance.
        """
        for message in messages:
            await self.handle_cast(message)

    async def handle_info(self, message: object) -> None:
        """Handle a message from a timer or :meth:`ActorRef.info`."""
        log.warning("%s: dropped unknown info %r", self.ref.name, message)

    async def terminate(self, reason: BaseException | None) -> None:
        """Finish: flush what the actor holds. ``reason`` is the crash, or ``None``.

        It runs shielded from cancellation and bounded by the child's
        ``shutdown`` deadline.
        """

    def send_after(self, delay: float, message: object) -> Timer:
        """Deliver ``message`` to :meth:`handle_info` after ``delay`` seconds."""
        scope = anyio.CancelScope()
        self._task_group.start_soon(self._deliver_later, scope, delay, message)
        return Timer(scope)

    async def _deliver_later(self, scope: anyio.CancelScope, delay: float, message: object) -> None:
        with scope:
            await anyio.sleep(delay)
            await self.ref.mailbox.send(_Info(message))


_DRAIN_LIMIT: Final = 4096


async def _serve(actor: Actor, mailbox: Mailbox[object]) -> None:
    """Handle messages until a stop; a crash carries what followed over."""
    while True:
        batch = await mailbox.receive_batch(_DRAIN_LIMIT)
        index, count = 0, len(batch)
        try:
            while index < count:
                message = batch[index]
                kind = type(message)
                if kind not in _CONTROL:
                    end = index + 1
                    while end < count and type(batch[end]) not in _CONTROL:
                        end += 1
                    run = batch[index:end] if index or end < count else batch
                    index = end
                    casts = iter(run)
                    try:
                        await actor.handle_casts(casts)
                    except BaseException:
                        # The casts not yet taken wait for the next instance.
                        mailbox.carry_over(run[len(run) - operator.length_hint(casts) :])
                        raise
                elif isinstance(message, _Call):
                    index += 1
                    try:
                        await actor.handle_call(message.message, message.reply)
                    except Exception as exc:
                        message.reply.fail(exc)
                elif isinstance(message, _Info):
                    index += 1
                    await actor.handle_info(message.message)
                else:
                    mailbox.carry_over(batch[index + 1 :])
                    return
        except BaseException:
            mailbox.carry_over(batch[index:])
            raise


async def run_actor(
    actor: Actor,
    ref: ActorRef,
    *,
    shutdown: float,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> Exception | None:
    """Run one instance of an actor until it stops or crashes.

    Returns ``None`` after a requested stop, or the exception that crashed
    it. Either way :meth:`Actor.terminate` has run, shielded and bounded by
    ``shutdown`` seconds. Cancellation propagates after ``terminate``.
    """
    reason: Exception | None = None
    init_error: Exception | None = None
    async with anyio.create_task_group() as timers:
        actor.ref = ref
        actor._task_group = timers
        try:
            await actor.init()
        except Exception as exc:
            # Raised outside the task group, so the starter sees it unwrapped.
            init_error = exc
            timers.cancel_scope.cancel()
        else:
            ref.alive = True
            task_status.started()
            try:
                await _serve(actor, ref.mailbox)
            except Exception as exc:
                log.exception("%s crashed", ref.name)
                reason = exc
            finally:
                ref.alive = False
                with anyio.move_on_after(shutdown, shield=True):
                    await actor.terminate(reason)
                timers.cancel_scope.cancel()
    if init_error is not None:
        raise init_error
    return reason


async def request_stop(ref: ActorRef) -> None:
    """Queue a stop behind everything already in the mailbox."""
    await ref.mailbox.send(_STOP)


def fail_pending_calls(
    messages: list[object], error: Exception, *, keep_infos: bool = True
) -> list[object]:
    """Fail the calls among ``messages`` with ``error``; return the other messages.

    :param keep_infos: whether info messages (timers, notifications) are
        returned too; without them, what is returned is the casts
    """
    rest: list[object] = []
    for message in messages:
        if isinstance(message, _Call):
            message.reply.fail(error)
        elif isinstance(message, _Info):
            if keep_infos:
                rest.append(message.message)
        elif message is not _STOP:
            rest.append(message)
    return rest
