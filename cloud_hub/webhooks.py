"""Webhooks: the change feed's events POSTed to a subscriber's URL, HMAC-signed, retried with back-off.

Each subscription has one delivery worker, a follower of :class:`~cloud_hub.feed.ChangeFeed` with its owner's view
(neutral as the SSE stream is). It delivers one event at a time, in order; a failed delivery is retried with
:class:`mhp_wire.backoff.Backoff` until a 2xx answer or ``max_age_s``, then dropped and counted. After each event it
stores the subscription's cursor (the last event id handled), so a restarted hub resumes every subscription from
the event log: delivery is at least once (an event delivered just before a crash is delivered again; receivers
deduplicate by ``X-MHP-Event-Id``).

A target must not resolve to a loopback, private, link-local, multicast or reserved address (unless
``allow_private``): checked when the subscription is created and again before every delivery (DNS can change).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import KW_ONLY, dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx

from cloud_hub.authz import Principal
from cloud_hub.feed import ChangeFeed, FeedItem
from cloud_hub.metrics import HubMetrics
from cloud_hub.store import HubStore
from mhp_wire.backoff import Backoff
from mhp_wire.messages import new_id
from mhp_wire.production import production_problems

log = logging.getLogger(__name__)


def public(sub: dict[str, Any]) -> dict[str, Any]:
    """A subscription as its owner reads it (never its secret)."""
    out = {"subscription_id": sub["subscription_id"], "url": sub["url"], "events": sub["events"],
           "created_at": datetime.fromtimestamp(sub["created_at"], UTC).isoformat()}
    if sub.get("request_id"):
        out["request_id"] = sub["request_id"]
    return out

Resolver = Callable[[str, int], Awaitable[list[str]]]
EVENT_KINDS = ("request",)


class TargetRefused(ValueError):
    """A webhook URL the hub will not call (HTTP 422 at creation; a failed attempt at delivery)."""


def sign(secret: str, body: bytes) -> str:
    """The ``X-MHP-Signature`` of a delivery: ``sha256=`` and the hex HMAC-SHA256 of the raw body."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


async def resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (the system resolver)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


def _literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def refused_address(text: str) -> str | None:
    """Why an address may not be a webhook target (None: it may): loopback, private, link-local, multicast,
    reserved or unspecified; an IPv4-mapped IPv6 address is judged as the IPv4 address it carries."""
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for what in ("loopback", "private", "link_local", "multicast", "reserved", "unspecified"):
        if getattr(ip, f"is_{what}"):
            return f"{ip} is a {what.replace('_', '-')} address"
    if not ip.is_global:
        return f"{ip} is not a public address"
    return None


async def check_target(url: str, *, production: bool, allow_private: bool, resolver: Resolver = resolve) -> None:
    """Raise :class:`TargetRefused` unless the hub may POST to ``url``: ``https://`` (``http://`` too outside
    production), a host, and (unless ``allow_private``) only public addresses behind it."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise TargetRefused(f"webhook url must be http:// or https://, not {parts.scheme or 'no scheme'}")
    problems = production_problems(https_urls={"webhook url": url}) if production else []
    if problems:
        raise TargetRefused("; ".join(problems) + " in production")
    if not parts.hostname:
        raise TargetRefused("webhook url has no host")
    if parts.username or parts.password:
        raise TargetRefused("webhook url must not carry credentials; the secret signs each delivery")
    if allow_private:
        return
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        addresses = [str(ipaddress.ip_address(parts.hostname))] if _literal(parts.hostname) else await resolver(
            parts.hostname, port)
    except (OSError, ValueError) as exc:
        raise TargetRefused(f"webhook host {parts.hostname!r} does not resolve: {exc}") from None
    if not addresses:
        raise TargetRefused(f"webhook host {parts.hostname!r} does not resolve")
    for address in addresses:
        why = refused_address(address)
        if why is not None:
            raise TargetRefused(f"webhook host {parts.hostname!r} resolves to {address}: {why}; such targets are "
                                f"refused unless the hub's webhook_allow_private is set")


@dataclass(slots=True)
class WebhookPolicy:
    """How deliveries are made and retried."""

    production: bool = False
    allow_private: bool = False
    timeout_s: float = 10.0
    retry_initial_s: float = 1.0
    retry_max_s: float = 300.0
    max_age_s: float = 86_400.0


@dataclass(eq=False)
class Webhooks:
    """The subscriptions' delivery workers."""

    store: HubStore
    feed: ChangeFeed
    metrics: HubMetrics
    policy: WebhookPolicy
    _: KW_ONLY
    resolver: Resolver = resolve
    now: Callable[[], float] = time.time
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    _workers: dict[str, asyncio.Task[None]] = field(default_factory=dict, init=False)
    _http: httpx.AsyncClient = field(init=False)

    def __post_init__(self) -> None:
        self._http = httpx.AsyncClient(timeout=self.policy.timeout_s, follow_redirects=False, trust_env=False)

    async def start(self) -> int:
        """Start a worker for every stored subscription (each resumes from its cursor); returns how many."""
        subs = await self.store.subscriptions()
        for sub in subs:
            self.run(sub)
        return len(subs)

    async def close(self) -> None:
        """Stop every worker and the HTTP client."""
        for sub_id in list(self._workers):
            await self.stop(sub_id)
        await self._http.aclose()

    def run(self, sub: dict[str, Any]) -> None:
        """Start the delivery worker of a subscription."""
        sid = sub["subscription_id"]
        self._workers[sid] = asyncio.create_task(self._worker(sub), name=f"webhook-{sid}")

    async def stop(self, subscription_id: str) -> None:
        """Stop a subscription's worker (before it is deleted)."""
        task = self._workers.pop(subscription_id, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def check(self, url: str) -> None:
        """Raise :class:`TargetRefused` unless ``url`` is a target the hub may call."""
        await check_target(url, production=self.policy.production, allow_private=self.policy.allow_private,
                           resolver=self.resolver)

    async def create(self, who: Principal, url: str, events: list[str], request_id: str | None, secret: str,
                     authorize: Callable[[Principal, str | None], Awaitable[None]]) -> dict[str, Any]:
        """A new subscription of ``who`` (``authorize(who, request_id)`` raises unless it may follow that request,
        or its feed when None), delivering from the next event on; the answer never holds the secret."""
        await authorize(who, request_id)
        unknown = sorted(set(events) - set(EVENT_KINDS))
        if unknown:
            raise ValueError(f"unknown event kinds {unknown}: expected {list(EVENT_KINDS)}")
        await self.check(url)
        sub = {"subscription_id": new_id(), "owner": str(who), "url": url, "events": sorted(set(events)),
               "request_id": request_id, "secret": secret, "created_at": self.now(), "cursor": self.feed.watermark}
        await self.store.put_subscription(sub)
        self.run(sub)
        return public(sub)

    async def _worker(self, sub: dict[str, Any]) -> None:
        sid = sub["subscription_id"]
        who = Principal.parse(sub["owner"])
        cursor = int(sub.get("cursor") or 0)
        while True:
            try:
                async for item in self.feed.follow(who, since=cursor, request_id=sub.get("request_id"),
                                                   keepalive_s=3600):
                    if item.kind == "keepalive":
                        continue
                    await self._deliver(sub, item)
                    cursor = max(cursor, item.event_id)
                    await self.store.set_subscription_cursor(sid, cursor)
            except asyncio.CancelledError:
                raise
            except Exception:  # a storage failure, say: the worker resumes from its cursor after a pause
                log.exception("webhook %s: delivery worker failed; resuming from event %d", sid, cursor)
                await self.sleep(self.policy.retry_initial_s)
            # the follower fell behind (its queue overflowed): resume from the cursor, from the log

    async def _deliver(self, sub: dict[str, Any], item: FeedItem) -> bool:
        """POST one event until a 2xx answer or the maximum age; returns whether it was delivered."""
        body = json.dumps(item.data if item.kind == "request" else {"event": item.kind, **item.data},
                          separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json", "X-MHP-Event-Id": str(item.event_id),
                   "X-MHP-Event": item.kind, "X-MHP-Signature": sign(sub["secret"], body),
                   "User-Agent": "mhp-hub-webhooks/1"}
        first = self.now()
        backoff = Backoff(initial_s=self.policy.retry_initial_s, max_s=self.policy.retry_max_s)
        while True:
            result = await self._attempt(sub["url"], body, headers)
            self.metrics.webhook_deliveries.labels(result).inc()
            if result == "delivered":
                return True
            age = self.now() - first
            if age >= self.policy.max_age_s:
                self.metrics.webhook_dropped.inc()
                log.warning("webhook %s: event %d dropped after %.0f s of failed deliveries (%s)",
                            sub["subscription_id"], item.event_id, age, result)
                return False
            delay = backoff.record_failure(self.now())
            await self.sleep(min(delay, max(0.0, self.policy.max_age_s - age)))

    async def _attempt(self, url: str, body: bytes, headers: dict[str, str]) -> str:
        try:
            await self.check(url)  # again at every delivery: the name may resolve elsewhere now
        except TargetRefused as exc:
            log.warning("webhook target refused at delivery: %s", exc)
            return "refused"
        stamped = {**headers, "X-MHP-Timestamp": datetime.fromtimestamp(self.now(), UTC).isoformat()}
        try:
            answer = await self._http.post(url, content=body, headers=stamped)
        except httpx.HTTPError as exc:
            log.debug("webhook delivery to %s failed: %s", url, exc)
            return "error"
        return "delivered" if 200 <= answer.status_code < 300 else f"status_{answer.status_code // 100}xx"
