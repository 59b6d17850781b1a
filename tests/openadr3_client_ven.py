"""A VEN written with ``openadr3-client`` (ElaadNL, PyPI; pinned by scripts/setup.sh), run by the conformance test
as a subprocess under the side venv ``.venv-openadr3`` (openadr3-client needs Python >= 3.12, the project 3.11).

It imports only openadr3-client and the standard library, never the project: it is a client nobody here wrote,
driven through its own public API (``VirtualEndNodeHttpClientFactory``, OpenADR 3.1.0). One phase per run, the
arguments as one JSON object on stdin, the results as one JSON object on stdout; every call's failure is reported
as ``{"error": type, "message": ...}`` in its place rather than raised, so the test sees which call a client and
the facade disagree on.

Phases:

- ``join``: discover the token URL (``GET /auth/server``, the 3.1 discovery the client does when it is given no
  token URL), register the VEN (``POST /vens``), read the programs, the notifiers and the VEN's MQTT event topics,
  subscribe ``callback_url`` to events of ``program_id`` and list the subscriptions.
- ``events``: list the events (all, and of ``program_id``), read ``event_id`` if given, with the client's own
  3.1.0 API and models (and the raw JSON through its session); then the same through its OpenADR 3.0.1 VEN at
  ``base_url_301`` (the facade's 3.0 shape of ``targets``).
- ``report``: post a report on ``event_id`` for each of ``resources`` (``X_MHP_OUTCOME`` and ``DEMAND``), then
  list the reports of that event.
- ``probe``: read another VEN's objects by id (``event_id``, ``ven_id``): each must be refused.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

# The test's hub speaks plain HTTP on 127.0.0.1; OAuthlib (under the client's token manager) refuses a token URL
# that is not https unless told otherwise. Only this test VEN sets it; the client's own HTTPS-only sessions are
# relaxed through its documented ``allow_insecure_http`` below.
os.environ.setdefault("OAUTHLIB_INSECURE_TRANSPORT", "1")

from openadr3_client._models.common.interval import Interval
from openadr3_client._models.common.interval_period import IntervalPeriod
from openadr3_client.oadr310.models.report.report import NewReport, ReportResource
from openadr3_client.oadr310.models.report.report_payload import ReportPayload, ReportPayloadType
from openadr3_client.oadr310.models.subscriptions.subscription import (
    NewSubscription,
    Object,
    ObjectOperation,
    Operation,
)
from openadr3_client.oadr310.models.ven.ven import NewVenVenRequest
from openadr3_client.ven.http_factory import VirtualEndNodeHttpClientFactory
from openadr3_client.version import OADRVersion


def _dump(obj: Any) -> Any:
    if isinstance(obj, (list, tuple)):
        return [_dump(o) for o in obj]
    if hasattr(obj, "model_dump"):
        return obj.model_dump(by_alias=True, mode="json")
    return obj


def _call(results: dict[str, Any], name: str, fn: Callable[[], Any]) -> Any:
    """Run one client call; its result (as JSON) or its failure goes into ``results[name]``."""
    try:
        got = fn()
    except Exception as exc:  # every failure is a finding for the test, reported with its type
        response = getattr(exc, "response", None)
        results[name] = {"error": type(exc).__name__, "message": str(exc)[:2000],
                         "status": getattr(response, "status_code", None),
                         "body": response.text[:2000] if response is not None else None}
        return None
    results[name] = {"ok": _dump(got)}
    return got


def _get(session: Any, url: str, params: dict[str, str]) -> Any:
    response = session.get(url, params=params)
    response.raise_for_status()
    return response.json()


def main() -> int:
    args = json.load(sys.stdin)
    phase = args["phase"]
    client = VirtualEndNodeHttpClientFactory.create_http_ven_client(
        vtn_base_url=args["base_url"], client_id=args["client_id"], client_secret=args["client_secret"],
        token_url=None, scopes=args["scopes"],
        allow_insecure_http=True, version=OADRVersion.OADR_310)
    results: dict[str, Any] = {"version": client.version.value,
                               "token_url": client.auth.get_auth_server().token_url}
    if phase == "join":
        _call(results, "auth_server", client.auth.get_auth_server)
        _call(results, "create_ven", lambda: client.vens.create_ven(NewVenVenRequest(ven_name=args["client_id"])))
        _call(results, "programs", lambda: client.programs.get_programs(target=None, pagination=None))
        _call(results, "notifiers", client.notifiers.get_notifiers)
        _call(results, "event_topics", lambda: client.notifiers.get_event_topics_for_ven(args["client_id"]))
        _call(results, "create_subscription", lambda: client.subscriptions.create_subscription(NewSubscription(
            client_name=f"ven-{args['client_id']}", program_id=args["program_id"], object_operations=(ObjectOperation(
                objects=(Object.EVENT,), operations=(Operation.POST, Operation.PUT, Operation.DELETE),
                callback_url=args["callback_url"], bearer_token=args["bearer_token"]),))))
        _call(results, "subscriptions", lambda: client.subscriptions.get_subscriptions(
            pagination=None, program_id=None, client_name=None, objects=None))
    elif phase == "events":
        _call(results, "events", lambda: client.events.get_events(target=None, pagination=None, program_id=None))
        # The raw JSON too, through the client's own authenticated session: the test checks the wire shape.
        session, base = client.events.session, client.events.base_url
        _call(results, "raw_events", lambda: _get(session, f"{base}/events", {}))
        _call(results, "raw_events_of_program", lambda: _get(session, f"{base}/events",
                                                             {"programID": args["program_id"]}))
        if args.get("event_id"):
            _call(results, "event", lambda: client.events.get_event_by_id(args["event_id"]))
            _call(results, "raw_event", lambda: _get(session, f"{base}/events/{args['event_id']}", {}))
        # The same events through the client's OpenADR 3.0.1 VEN (3.0's targets): its own API and models accept them.
        legacy = VirtualEndNodeHttpClientFactory.create_http_ven_client(
            vtn_base_url=args["base_url_301"], client_id=args["client_id"], client_secret=args["client_secret"],
            token_url=results["token_url"], scopes=args["scopes"], version=OADRVersion.OADR_301)
        _call(results, "events_301", lambda: legacy.events.get_events(
            target=None, pagination=None, program_id=args["program_id"]))
        if args.get("event_id"):
            _call(results, "event_301", lambda: legacy.events.get_event_by_id(args["event_id"]))
    elif phase == "report":
        at = datetime.now(UTC).replace(microsecond=0)
        report = NewReport(program_id=args["program_id"], event_id=args["event_id"],
                           client_name=f"ven-{args['client_id']}", resources=tuple(ReportResource(
                               resource_name=name, interval_period=IntervalPeriod(start=at,
                                                                                  duration=timedelta(minutes=1)),
                               intervals=(Interval(id=0, payloads=(
                                   ReportPayload(type=ReportPayloadType("X_MHP_OUTCOME"), values=("executed",)),
                                   ReportPayload(type=ReportPayloadType.DEMAND, values=(args["demand_kw"],)))),))
                               for name in args["resources"]))
        results["at"] = at.isoformat()
        _call(results, "create_report", lambda: client.reports.create_report(report))
        _call(results, "reports", lambda: client.reports.get_reports(
            pagination=None, program_id=None, event_id=args["event_id"], client_name=None))
    elif phase == "probe":
        _call(results, "event", lambda: client.events.get_event_by_id(args["event_id"]))
        _call(results, "ven", lambda: client.vens.get_ven_by_id(args["ven_id"]))
    else:
        results["error"] = f"unknown phase {phase!r}"
    json.dump(results, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
