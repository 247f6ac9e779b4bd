"""Driving an AnalyticsBuffer on trio's virtual clock from synchronous Hypothesis rules.

Hypothesis rules cannot be async, so a machine runs the buffer in a blocking
portal whose trio loop has a ``MockClock`` with no autojump (autojump would
race through every timer while Hypothesis chooses the next step). Each rule
is one :meth:`VirtualTimeMachine.run` that ends by *settling*: every task
runs until all are blocked, and the clock moves only when a rule jumps it.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Final

import anyio
import anyio.abc
import trio
import trio.lowlevel
import trio.to_thread
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, run_state_machine_as_test
from trio.testing import MockClock, wait_all_tasks_blocked

from analytics_buffer import AnalyticsBuffer

MAX_VIRTUAL_WAIT: Final = 100.0
"""A flush or a shutdown that takes longer than this in virtual time is stuck."""


async def settle() -> None:
    """Let every task run until all are blocked, without moving the clock."""
    limiter = trio.to_thread.current_default_thread_limiter()
    while True:
        await wait_all_tasks_blocked()
        if limiter.borrowed_tokens == 0:
            return
        # A worker thread (a dead-letter append) is running; wait a little real time.
        await wait_all_tasks_blocked(cushion=0.001)


async def hold_open(
    buffer: AnalyticsBuffer, *, task_status: anyio.abc.TaskStatus[anyio.Event]
) -> None:
    """Enter ``buffer`` and keep it open until the event handed to ``task_status`` is set.

    Run with ``portal.start_task``: it returns once the buffer is entered.
    """
    stop = anyio.Event()
    async with buffer:
        task_status.started(stop)
        await stop.wait()


class VirtualTimeMachine(RuleBasedStateMachine):
    """A state machine whose buffer lives in a trio portal on a virtual clock."""

    def __init__(self, base_dir: Path) -> None:
        super().__init__()
        self.data_dir = Path(tempfile.mkdtemp(dir=base_dir))
        self.clock = MockClock()  # rate 0, no autojump: time moves only by jump()
        self._portal_cm: AbstractContextManager[BlockingPortal] = start_blocking_portal(
            "trio", backend_options={"clock": self.clock}
        )
        self.portal = self._portal_cm.__enter__()
        self._lifetime: Future[None] | None = None
        self._stop: anyio.Event | None = None

    def run(self, action: Callable[[], Awaitable[None]]) -> None:
        """Run ``action`` in the event loop, then settle."""

        async def step() -> None:
            await action()
            await settle()

        self.portal.call(step)

    def run_sync(self, action: Callable[[], None]) -> None:
        """Run a synchronous ``action`` in the event loop, then settle."""

        async def call() -> None:
            action()

        self.run(call)

    async def drive_until(self, done: Callable[[], bool], what: str) -> None:
        """Jump the clock from deadline to deadline until ``done()``."""
        start = trio.current_time()
        while True:
            await settle()
            if done():
                return
            delay = trio.lowlevel.current_statistics().seconds_to_next_deadline
            assert delay < math.inf, f"{what}: deadlocked (no pending deadline)"
            assert trio.current_time() - start < MAX_VIRTUAL_WAIT, f"{what}: stuck"
            if delay > 0:
                self.clock.jump(delay)

    async def advance_by(self, seconds: float) -> None:
        """Let ``seconds`` of virtual time pass, stopping at every deadline on the way."""
        target = trio.current_time() + seconds
        await settle()
        while True:
            delay = trio.lowlevel.current_statistics().seconds_to_next_deadline
            if trio.current_time() + delay > target:
                break
            if delay > 0:
                self.clock.jump(delay)
            await settle()
        if target > trio.current_time():
            self.clock.jump(target - trio.current_time())

    def run_until_done(self, action: Callable[[], Awaitable[None]], what: str) -> None:
        """Run ``action`` in the event loop, jumping the clock until it has returned."""
        done = anyio.Event()

        async def act() -> None:
            await action()
            done.set()

        async def drive() -> None:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(act)
                await self.drive_until(done.is_set, what)

        self.run(drive)

    def start_buffer(self, buffer: AnalyticsBuffer) -> None:
        """Enter ``buffer`` in the portal; it runs until :meth:`stop_buffer`."""
        self._lifetime, self._stop = self.portal.start_task(hold_open, buffer)
        self.run(settle)

    @property
    def buffer_running(self) -> bool:
        return self._lifetime is not None and not self._lifetime.done()

    def stop_buffer(self) -> None:
        """Leave the buffer's ``async with`` (its shutdown flush runs on the virtual clock)."""
        lifetime = self._lifetime
        assert lifetime is not None

        async def stop() -> None:
            assert self._stop is not None
            self._stop.set()
            await self.drive_until(lifetime.done, "shutdown")

        self.portal.call(stop)
        lifetime.result()  # re-raise what stopped the buffer, if anything

    def close(self) -> None:
        """Stop the portal, letting time run so cancelling cannot hang."""
        try:
            self.portal.call(setattr, self.clock, "autojump_threshold", 0.0)
            self.portal.call(self.portal.stop, True)
        finally:
            self._portal_cm.__exit__(None, None, None)
            shutil.rmtree(self.data_dir, ignore_errors=True)


def run_machine(machine: type[VirtualTimeMachine], base_dir: Path, *, steps: int) -> None:
    """Run ``machine`` (built with ``base_dir``) as a test: 200 derandomized examples."""

    class Machine(machine):  # type: ignore[misc,valid-type]
        def __init__(self) -> None:
            super().__init__(base_dir)

    run_state_machine_as_test(
        Machine,
        settings=settings(
            max_examples=200,
            stateful_step_count=steps,
            derandomize=True,
            database=None,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
            report_multiple_bugs=False,
        ),
    )
