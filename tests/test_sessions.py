"""How the server's shutdown ends a stream's reading (`server.sessions`): between messages,
never halfway through taking one, and never in place of a client that left."""

from __future__ import annotations

import asyncio

import pytest

from server.sessions import Session, SessionEnded


async def _read(session: Session, incoming: asyncio.Queue, gate: asyncio.Event) -> list[int]:
    """A stream's reader: each message it reads is taken once `gate` opens (as a stream's
    take waits for room in its queue of answers); returns what it took."""
    taken: list[int] = []
    while True:
        try:
            message = await session.receive(incoming.get)
        except SessionEnded:
            return taken
        await gate.wait()
        taken.append(message)


async def test_a_message_being_taken_when_the_session_ends_is_taken() -> None:
    session, incoming, gate = Session(lambda _: None), asyncio.Queue(), asyncio.Event()
    for message in (1, 2, 3):
        incoming.put_nowait(message)
    reader = asyncio.create_task(_read(session, incoming, gate))
    await asyncio.sleep(0.01)  # 1 is read; taking it waits
    session.end()
    gate.set()
    assert await reader == [1]  # 1 was read and is taken; 2 and 3 were never read
    assert incoming.qsize() == 2


async def test_a_session_waiting_for_a_message_ends_at_once() -> None:
    session, gate = Session(lambda _: None), asyncio.Event()
    gate.set()
    incoming: asyncio.Queue = asyncio.Queue()
    incoming.put_nowait(1)
    reader = asyncio.create_task(_read(session, incoming, gate))
    await asyncio.sleep(0.01)  # 1 taken, waiting for the next
    session.end()
    assert await asyncio.wait_for(reader, 1.0) == [1]


async def test_a_client_that_leaves_as_the_session_ends_still_cancels_the_reader() -> None:
    session, gate = Session(lambda _: None), asyncio.Event()
    reader = asyncio.create_task(_read(session, asyncio.Queue(), gate))
    await asyncio.sleep(0.01)
    session.end()
    reader.cancel()  # the client's stream closed at the same moment: nothing to answer
    with pytest.raises(asyncio.CancelledError):
        await reader


async def test_a_session_ended_before_it_reads_reads_nothing() -> None:
    closed: list[Session] = []
    session = Session(closed.append)
    session.end()
    incoming: asyncio.Queue = asyncio.Queue()
    incoming.put_nowait(1)
    assert await _read(session, incoming, asyncio.Event()) == []
    session.close()
    assert closed == [session]
