"""The actor runtime on trio's virtual clock: no real sleeps anywhere."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from trio.testing import MockClock, wait_all_tasks_blocked

from analytics_buffer import (
    Actor,
    ActorDeadError,
    CallTimeout,
    ChildSpec,
    MailboxFull,
    Reply,
    RestartIntensityExceeded,
    Supervisor,
)
from analytics_buffer._mailbox import Mailbox

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.parametrize(
        "anyio_backend",
        [pytest.param(("trio", {"clock": MockClock(autojump_threshold=0)}), id="trio-mock")],
    ),
]


class Boom(Exception):
    pass


class Recorder(Actor):
    """Keeps what it is sent; ``"boom"`` crashes it, ``"hang"`` blocks it."""

    def __init__(self, log: list[str], name: str = "recorder") -> None:
        self.log = log
        self.name = name
        self.held: list[object] = []

    async def init(self) -> None:
        self.log.append(f"init {self.name}")

    async def handle_cast(self, message: object) -> None:
        if message == "boom":
            raise Boom("crash requested")
        if message == "hang":
            await anyio.sleep_forever()
        self.held.append(message)
        self.log.append(f"cast {self.name} {message}")

    async def handle_call(self, message: object, reply: Reply[Any]) -> None:
        if message == "held":
            reply.send(list(self.held))
        elif message == "fail":
            raise ValueError("bad call")
        elif message == "never":
            pass  # keeps the reply unanswered
        else:
            await super().handle_call(message, reply)

    async def handle_info(self, message: object) -> None:
        self.log.append(f"info {self.name} {message} at {anyio.current_time():.1f}")

    async def terminate(self, reason: BaseException | None) -> None:
        self.log.append(f"terminate {self.name} {type(reason).__name__} held={self.held}")


async def test_call_returns_reply_and_errors_reach_the_caller() -> None:
    log: list[str] = []
    async with Supervisor([ChildSpec("a", lambda: Recorder(log))]) as sup:
        ref = sup.ref("a")
        ref.cast(1)
        assert await ref.call("held") == [1]
        with pytest.raises(ValueError, match="bad call"):
            await ref.call("fail")
        with pytest.raises(ValueError, match="does not understand"):
            await ref.call("unknown")
        # The actor went on after both errors.
        ref.cast(2)
        assert await ref.call("held") == [1, 2]


async def test_call_times_out_on_the_virtual_clock() -> None:
    log: list[str] = []
    async with Supervisor([ChildSpec("a", lambda: Recorder(log))]) as sup:
        start = anyio.current_time()
        with pytest.raises(CallTimeout, match=r"within 2\.5 s"):
            await sup.ref("a").call("never", timeout=2.5)
        assert anyio.current_time() - start == pytest.approx(2.5)


async def test_unknown_messages_are_dropped_without_crashing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log: list[str] = []
    async with Supervisor([ChildSpec("a", lambda: Actor())]) as sup:
        ref = sup.ref("a")
        ref.cast("what")
        ref.info("when")
        with pytest.raises(ValueError, match="does not understand"):
            await ref.call("who")
        assert ref.alive
    messages = [record.getMessage() for record in caplog.records]
    assert any("dropped unknown cast 'what'" in m for m in messages)
    assert any("dropped unknown info 'when'" in m for m in messages)
    assert not log


async def test_crash_flushes_then_restarts_on_the_same_mailbox() -> None:
    log: list[str] = []
    restarts: list[str] = []
    async with Supervisor(
        [ChildSpec("a", lambda: Recorder(log))],
        on_restart=lambda child, exc: restarts.append(f"{child}:{exc}"),
    ) as sup:
        ref = sup.ref("a")
        # One drain takes all four; the crash must not lose the two after it.
        for message in ("x", "boom", "y", "z"):
            ref.cast(message)
        assert await ref.call("held") == ["y", "z"]
    assert restarts == ["a:crash requested"]
    assert log[:3] == ["init recorder", "cast recorder x", "terminate recorder Boom held=['x']"]
    assert log[3] == "init recorder"
    assert log[-1] == "terminate recorder NoneType held=['y', 'z']"


async def test_restart_intensity_stops_the_others_in_reverse_order() -> None:
    log: list[str] = []
    specs = [
        ChildSpec("first", lambda: Recorder(log, "first")),
        ChildSpec("crasher", lambda: Recorder(log, "crasher")),
        ChildSpec("last", lambda: Recorder(log, "last")),
    ]
    with pytest.RaisesGroup(RestartIntensityExceeded):
        async with Supervisor(specs, max_restarts=2, max_seconds=5.0) as sup:
            crasher = sup.ref("crasher")
            for _ in range(3):
                crasher.cast("boom")
                await anyio.sleep(1.0)
            await anyio.sleep_forever()  # cancelled by the supervisor's failure
    terminations = [line.split()[1] for line in log if line.startswith("terminate")]
    assert terminations == ["crasher", "crasher", "crasher", "last", "first"]


async def test_crashes_spread_wider_than_the_window_are_tolerated() -> None:
    log: list[str] = []
    async with Supervisor(
        [ChildSpec("a", lambda: Recorder(log))], max_restarts=2, max_seconds=5.0
    ) as sup:
        ref = sup.ref("a")
        for _ in range(6):
            ref.cast("boom")
            await anyio.sleep(3.0)  # at most two crashes in any 5 s window
        assert ref.alive
    assert sum(line.startswith("init") for line in log) == 7


async def test_children_start_in_order_and_stop_in_reverse() -> None:
    log: list[str] = []
    names = ["clients", "buffers", "ingest"]
    specs = [ChildSpec(name, lambda name=name: Recorder(log, name)) for name in names]  # type: ignore[misc]
    async with Supervisor(specs):
        pass
    assert [line for line in log if line.startswith("init")] == [f"init {n}" for n in names]
    stops = [line.split()[1] for line in log if line.startswith("terminate")]
    assert stops == list(reversed(names))


async def test_stop_handles_what_was_queued_before_it() -> None:
    log: list[str] = []
    async with Supervisor([ChildSpec("a", lambda: Recorder(log))]) as sup:
        for message in range(5):
            sup.ref("a").cast(message)
    assert log[-1] == "terminate recorder NoneType held=[0, 1, 2, 3, 4]"


async def test_a_stuck_child_is_cancelled_at_its_shutdown_deadline() -> None:
    log: list[str] = []
    async with Supervisor([ChildSpec("a", lambda: Recorder(log), shutdown=3.0)]) as sup:
        sup.ref("a").cast("kept")
        sup.ref("a").cast("hang")
        start = anyio.current_time()
    # Cancelled at the deadline, and terminate still ran with what it held.
    assert anyio.current_time() - start == pytest.approx(3.0)
    assert log[-1] == "terminate recorder NoneType held=['kept']"


async def test_only_casts_left_at_a_stop_are_reported_as_unhandled(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log: list[str] = []
    async with Supervisor([ChildSpec("a", lambda: Recorder(log), shutdown=3.0)]) as sup:
        sup.ref("a").cast("hang")
        sup.ref("a").cast("never taken")
        sup.ref("a").info("a timer that fired")
    assert [r.getMessage() for r in caplog.records if "unhandled" in r.getMessage()] == [
        "a stopped with 1 unhandled messages"
    ]


async def test_init_failure_reaches_the_caller() -> None:
    class BadInit(Actor):
        async def init(self) -> None:
            raise Boom("no start")

    log: list[str] = []
    with pytest.raises(Boom, match="no start"):
        async with Supervisor([ChildSpec("ok", lambda: Recorder(log)), ChildSpec("bad", BadInit)]):
            pytest.fail("the body must not run")
    # The child that did start was stopped again.
    assert log == ["init recorder", "terminate recorder NoneType held=[]"]


async def test_send_after_delivers_at_the_time_and_cancel_stops_it() -> None:
    class Scheduler(Recorder):
        async def init(self) -> None:
            self.send_after(2.0, "two")
            self.send_after(4.0, "four").cancel()
            self.send_after(5.0, "five")

    log: list[str] = []
    async with Supervisor([ChildSpec("a", lambda: Scheduler(log))]):
        start = anyio.current_time()
        await anyio.sleep(6.0)
    infos = [line for line in log if line.startswith("info")]
    assert infos == [
        f"info recorder two at {start + 2:.1f}",
        f"info recorder five at {start + 5:.1f}",
    ]


async def test_calls_to_a_stopped_actor_fail_with_actor_dead() -> None:
    log: list[str] = []
    async with Supervisor([ChildSpec("a", lambda: Recorder(log))]) as sup:
        ref = sup.ref("a")
    assert not ref.alive
    with pytest.raises(ActorDeadError):
        await ref.call("held")
    with pytest.raises(ActorDeadError):
        ref.cast("late")


async def test_a_full_mailbox_refuses_casts() -> None:
    log: list[str] = []
    async with Supervisor([ChildSpec("a", lambda: Recorder(log), mailbox_size=2)]) as sup:
        ref = sup.ref("a")
        ref.cast("hang")  # keep the actor busy so nothing is taken
        await wait_all_tasks_blocked()
        ref.cast(1)
        ref.cast(2)
        with pytest.raises(MailboxFull, match="2 messages"):
            ref.cast(3)
        assert ref.statistics().queued == 2


async def test_offer_refuses_when_full_and_raises_when_closed() -> None:
    mailbox: Mailbox[int] = Mailbox(1)
    assert mailbox.offer(1) is True
    assert mailbox.offer(2) is False
    assert mailbox.statistics().queued == 1
    mailbox.release()
    with pytest.raises(ActorDeadError):
        mailbox.offer(3)


async def test_a_waiting_sender_hands_over_ahead_of_later_offers() -> None:
    mailbox: Mailbox[str] = Mailbox(1)
    mailbox.send_nowait("first")
    async with anyio.create_task_group() as tg:
        tg.start_soon(mailbox.send, "waited")
        await wait_all_tasks_blocked()
        assert mailbox.statistics().senders_waiting == 1
        assert await mailbox.receive_batch(1) == ["first"]
        # The waiting sender's message took the freed room before anyone else could.
        assert mailbox.offer("later") is False
    assert await mailbox.receive_batch(10) == ["waited"]
    assert mailbox.statistics() == (0, 1, 0)


async def test_a_cancelled_sender_withdraws_its_message() -> None:
    mailbox: Mailbox[str] = Mailbox(1)
    mailbox.send_nowait("first")
    with anyio.move_on_after(1.0):
        await mailbox.send("withdrawn")
    assert mailbox.statistics().senders_waiting == 0
    assert mailbox.drain_nowait() == ["first"]


async def test_release_wakes_waiting_senders_and_the_receiver_with_actor_dead() -> None:
    mailbox: Mailbox[str] = Mailbox(1)
    outcomes: list[str] = []

    async def expect_dead(action: Any) -> None:
        try:
            await action()
        except ActorDeadError:
            outcomes.append("dead")

    receiver: Mailbox[str] = Mailbox(1)
    mailbox.send_nowait("first")
    async with anyio.create_task_group() as tg:
        tg.start_soon(expect_dead, lambda: mailbox.send("blocked"))
        tg.start_soon(expect_dead, lambda: receiver.receive_batch(10))
        await wait_all_tasks_blocked()
        mailbox.release()
        receiver.release()
    assert outcomes == ["dead", "dead"]


async def test_receive_takes_at_most_the_limit_in_order() -> None:
    mailbox: Mailbox[int] = Mailbox(100)
    for number in range(10):
        mailbox.send_nowait(number)
    assert await mailbox.receive_batch(4) == [0, 1, 2, 3]
    mailbox.carry_over([3])
    assert await mailbox.receive_batch(4) == [3, 4, 5, 6]
    assert mailbox.drain_nowait() == [7, 8, 9]
