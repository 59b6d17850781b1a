"""The change feed: Server-Sent Events of request changes, and webhook subscriptions for the same events."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from cloud_hub import codec
from cloud_hub.api.deps import Caller, Service
from cloud_hub.api.models import Document, errors
from cloud_hub.authz import Principal
from cloud_hub.errors import NotFound
from cloud_hub.feed import ChangeFeed, FeedItem
from cloud_hub.service import HubService
from cloud_hub.webhooks import Webhooks, public

router = APIRouter(prefix="/v1", tags=["events"])

RequestId = Annotated[str, Path(max_length=64)]
SSE: dict[int | str, dict[str, Any]] = {200: {
    "description": "Server-Sent Events: `id`, `event` and one `data` line of JSON",
    "content": {"text/event-stream": {"schema": {"type": "string"}}}}}
"""The answer of an event stream (OpenAPI)."""
LastEventId = Annotated[str | None, Header(alias="Last-Event-ID", max_length=40)]


def frame(item: FeedItem) -> bytes:
    """One Server-Sent Events frame: ``id``, ``event`` and one ``data`` line of JSON (compact, UTF-8, the hub's
    codec); a comment for a keep-alive; ``retry`` for the first item of a stream (``open``)."""
    if item.kind == "keepalive":
        return b": keep-alive\n\n"
    if item.kind == "open":
        # The first line, once the follower is registered: a reader that has it gets every change stored after
        # it. The browser's EventSource reconnects after 1 s, with Last-Event-ID.
        return b"retry: 1000\n\n"
    data = codec.dumps(item.data)
    if b"\xe2\x80\xa8" in data or b"\xe2\x80\xa9" in data or b"\xc2\x85" in data:
        # orjson writes U+2028, U+2029 and U+0085 raw; a reader that splits lines as Python's str.splitlines does
        # (httpx's aiter_lines: the DSO console's relay) would cut the data line at them. Inside JSON they only
        # occur in strings, where the escape is the same text.
        data = data.replace(b"\xe2\x80\xa8", b"\\u2028").replace(b"\xe2\x80\xa9", b"\\u2029").replace(
            b"\xc2\x85", b"\\u0085")
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (item.event_id, item.kind.encode(), data)


def resume_point(last_event_id: str | None, since: str | None) -> int | None:
    """The id to resume after: the ``Last-Event-ID`` header (a reconnecting EventSource sends it), else ``since``."""
    text = last_event_id if last_event_id not in (None, "") else since
    if text is None or text == "":
        return None
    if not text.isdigit():
        raise ValueError(f"Last-Event-ID / since must be an event id (a non-negative integer), not {text!r}")
    return int(text)


def _stream(request: Request, who: Principal, since: int | None, request_id: str | None) -> StreamingResponse:
    feed: ChangeFeed = request.app.state.feed
    keepalive_s: float = request.app.state.settings.feed_keepalive_s

    async def body() -> AsyncIterator[bytes]:
        # The events queued when the stream wakes, in one chunk: one socket write and one pass through the ASGI
        # layers for all of them (a frame at a time was a tenth of the hub's CPU at 12,000 requests/min).
        async for batch in feed.follow_batches(who, since, request_id, keepalive_s, announce=True):
            yield b"".join(map(frame, batch))

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.get("/events", response_class=StreamingResponse, responses={**SSE, **errors(403)})
async def events(request: Request, who: Caller, service: Service, last_event_id: LastEventId = None,
                 since: Annotated[str | None, Query(max_length=40)] = None) -> StreamingResponse:
    """Server-Sent Events of the changes of every request the caller may follow (the DSO: those it issued; a
    retailer: those of its clients, showing only them)."""
    point = resume_point(last_event_id, since)
    await service.requests.may_follow(who, None)
    return _stream(request, who, point, None)


@router.get("/requests/{request_id}/events", response_class=StreamingResponse,
            responses={**SSE, **errors(403, 404)})
async def request_events(request_id: RequestId, request: Request, who: Caller, service: Service,
                         last_event_id: LastEventId = None,
                         since: Annotated[str | None, Query(max_length=40)] = None) -> StreamingResponse:
    """Server-Sent Events of one request's changes (its issuer; a retailer of some of its clients)."""
    point = resume_point(last_event_id, since)
    await service.requests.may_follow(who, request_id)
    return _stream(request, who, point, request_id)


class SubscriptionBody(BaseModel):
    """A webhook: where to POST the events, which ones, and the secret that signs them."""

    model_config = ConfigDict(extra="forbid")
    url: str = Field(min_length=8, max_length=2000)
    events: list[str] = Field(default_factory=lambda: ["request"], min_length=1, max_length=10)
    request_id: str | None = Field(None, min_length=1, max_length=64)
    secret: str = Field(min_length=16, max_length=200)


@router.post("/subscriptions", status_code=201, response_model=Document, responses=errors(403, 404))
async def create_subscription(body: SubscriptionBody, request: Request, who: Caller, service: Service
                              ) -> dict[str, Any]:
    """Subscribe a webhook to the events the caller may follow (the DSO; a retailer, for its own clients)."""
    service.requests.may_manage_subscription(who, None)
    hooks: Webhooks = request.app.state.webhooks
    return await hooks.create(who, body.url, body.events, body.request_id, body.secret,
                              service.requests.may_follow)


async def _owned(request: Request, who: Principal, service: HubService, subscription_id: str) -> dict[str, Any]:
    sub = await request.app.state.store.get_subscription(subscription_id)
    if sub is None:
        raise NotFound("no such subscription")
    service.requests.may_manage_subscription(who, sub["owner"])
    result: dict[str, Any] = sub
    return result


@router.get("/subscriptions/{subscription_id}", response_model=Document, responses=errors(404))
async def get_subscription(subscription_id: Annotated[str, Path(max_length=64)], request: Request, who: Caller,
                           service: Service) -> dict[str, Any]:
    """A subscription (its owner); never its secret."""
    return public(await _owned(request, who, service, subscription_id))


@router.delete("/subscriptions/{subscription_id}", status_code=204, responses=errors(404))
async def delete_subscription(subscription_id: Annotated[str, Path(max_length=64)], request: Request, who: Caller,
                              service: Service) -> Response:
    """Stop and remove a subscription (its owner)."""
    await _owned(request, who, service, subscription_id)
    hooks: Webhooks = request.app.state.webhooks
    await hooks.stop(subscription_id)
    await request.app.state.store.delete_subscription(subscription_id)
    return Response(status_code=204)
