"""The hub's HTTP/1.1 protocol: uvicorn's httptools protocol, each fixed-length response written in one piece.

uvicorn writes a response's status line and headers when the app sends ``http.response.start`` and its body when
the app sends ``http.response.body``: two writes, so two ``send`` system calls and two TCP segments for each
answer, where the hub's answers (a POST's 202, a GET's request view) are a few hundred bytes each. Here a response
that declares its ``content-length`` (every JSON answer of the hub; not a stream such as ``/v1/events``, which keeps
uvicorn's own writes so its head leaves at once) has its head held back and written together with the first part of
its body. The bytes on the wire are the same; only how they are cut into writes changes
(docs/decisions.md, "One write per HTTP answer").

The hold sits between uvicorn's request cycle and the connection's transport, for one response at a time, and is
only taken by the ``send`` of a cycle this protocol started: anything else uvicorn writes (a 400 on an unparsable
request, ``100 Continue``, a 500 when the app fails before answering) goes straight out as before. When the app
fails between the head and the body, uvicorn closes the transport: the held head is written first, as it had been.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

Send = Callable[[Any], Awaitable[None]]


class _HeadHeld:
    """A transport that keeps the first write (a response's head) and writes it with the next one (its body)."""

    __slots__ = ("head", "transport")

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.head: bytes | None = None

    def write(self, data: bytes) -> None:
        head = self.head
        if head is None:  # the head: held
            self.head = bytes(data)
        elif head:  # the body's first part: written with the head
            self.head = b""
            self.transport.write(head + data)
        else:
            self.transport.write(data)

    def release(self) -> None:
        """Write a head still held (the body never came), at most once."""
        head, self.head = self.head, b""
        if head:
            self.transport.write(head)

    def close(self) -> None:
        self.release()
        self.transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


def _fixed_length(message: Any) -> bool:
    return any(name.lower() == b"content-length" for name, _ in message.get("headers", ()))


def one_write_send(cycle: RequestResponseCycle) -> Send:
    """``cycle``'s ``send``, a fixed-length response's head written with its body (module docstring)."""
    send = cycle.send
    held: list[_HeadHeld] = []

    async def one_write(message: Any) -> None:
        kind = message["type"]
        if (kind == "http.response.start" and not cycle.response_started and cycle.scope["method"] != "HEAD"
                and _fixed_length(message)):
            hold = _HeadHeld(cycle.transport)
            cycle.transport = hold  # type: ignore[assignment]
            held.append(hold)
            try:
                await send(message)
            finally:
                if hold.head is None:  # uvicorn refused the start (a bad header) before writing: nothing is held
                    cycle.transport = hold.transport
                    held.clear()
            return
        if not held or kind != "http.response.body":
            await send(message)
            return
        hold = held.pop()
        try:
            await send(message)  # the head and this part of the body, in one write
        finally:
            cycle.transport = hold.transport
            if not cycle.disconnected:
                hold.release()

    return one_write


class OneWriteHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol whose request cycles write each fixed-length response in one piece."""

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        cycle.send = one_write_send(cycle)  # type: ignore[method-assign,assignment]
        super()._start_asgi_task(cycle, app)
