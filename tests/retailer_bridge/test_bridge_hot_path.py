"""The bridge's hot path without a model per message (issue 14, fourth round), through the real chain: real
Mosquitto brokers from broker_config/, the bridge's own process code, gateways played by MQTT test clients, real
SQLite.

A gateway's plain ``ack`` and ``outcome`` are read on the fast path and answered as before; anything invalid is
refused with exactly the error :func:`mhp_wire.messages.decode` gives, loses nothing, and the bridge keeps serving;
commands carry the cheap message ids; and a batch of gateways' reports builds no ``uuid4`` and no ``Outcome`` or
``Ack`` model per gateway.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from mhp_wire import messages, topics
from mhp_wire.messages import (
    Ack,
    ClientState,
    Command,
    EmergencyParams,
    ErrorReply,
    Outcome,
    Outcomes,
    RequestKind,
    WireError,
    decode,
    encode,
)
from retailer_bridge.relay import BridgeRelay
from retailer_bridge.store import CLOSED, BridgeStore, NewCommand
from tests.mqtt_party import Party, parties
from tests.retailer_bridge.test_bridge import Rig, request, rig  # noqa: F401  (the rig fixture)

HOSTILE = [
    b'{"v":1,"msg_id":"h1","sent_at":"%s","type":"outcome","request_id":"q1","client_id":"c1","state":"bogus"}',
    b'{"v":1,"msg_id":"h2","sent_at":"%s","type":"outcome","request_id":"q1","client_id":"c1","state":"executed",'
    b'"detail":{"available_kw":1e999}}',
    b'{"v":1,"msg_id":"h3","sent_at":"%s","type":"outcome","request_id":"q1","client_id":"c1","state":"executed",'
    b'"revision":0}',
    b'{"v":1,"msg_id":"h4","sent_at":"%s","type":"ack","ack_ids":[]}',
    b'{"v":1,"msg_id":"h5","sent_at":"2026-02-30T00:00:00Z","type":"ack","ack_ids":["m"]}',
    b'{"v":1,"msg_id":"h6","sent_at":"2026-01-01T00:00:00+00:60","type":"ack","ack_ids":["m"]}',
]


async def test_plain_reports_take_the_fast_path_and_invalid_ones_get_decodes_error(rig: Rig) -> None:  # noqa: F811
    now = datetime.now(UTC).isoformat().encode()
    with parties(Party(rig.hub_broker, "hub", topics.all_up("retailers")),
                 Party(rig.local, "gw-1", topics.down("gateways", "gw-1"))) as (hub, gw1):
        req = request(["c1"])
        await hub.publish(topics.down("retailers", "r1"), req)
        assert (await hub.next("ack")).ack_ids == [req.msg_id]  # type: ignore[union-attr]
        cmd = await gw1.next("command")
        assert isinstance(cmd, Command) and cmd.client_id == "c1" and cmd.request_id == "q1"
        assert len(cmd.msg_id) <= 42 and cmd.msg_id.count("-") == 1  # the per-process prefix and a counter
        # Garbage first: each refused with decode's own error, nothing of it stored, the command still open.
        for raw in HOSTILE:
            payload = raw.replace(b"%s", now)
            with pytest.raises(WireError) as expected:
                decode(payload)
            await gw1.publish(topics.up("gateways", "gw-1"), payload)
            err = await gw1.next("error")
            assert isinstance(err, ErrorReply) and err.code == "invalid" and err.message == str(expected.value)
        assert rig.bridge.relay.rejected["gateway_invalid"] == len(HOSTILE)
        states = {c["client_id"]: c["state"] for c in await rig.bridge.store.commands_of("q1")}
        assert states == {"c1": "sending"}
        # Then the gateway's plain acknowledgement and outcome: read on the fast path, answered, forwarded.
        await gw1.publish(topics.up("gateways", "gw-1"), Ack(ack_ids=[cmd.msg_id]))
        out = Outcome(request_id="q1", client_id="c1", state=ClientState.EXECUTED, detail={"shed": ["heater"]},
                      trace={"gateway_ms": 7, "waited_ms": 1.5})
        await gw1.publish(topics.up("gateways", "gw-1"), out)
        ack = await gw1.next("ack")
        assert isinstance(ack, Ack) and ack.ack_ids == [out.msg_id] and ack.partition is None
        seen: list[Any] = []
        while not any(getattr(m, "state", None) is ClientState.EXECUTED for m in seen):
            seen.append(await hub.next("outcome"))
        fwd = seen[-1]
        assert isinstance(fwd, Outcome) and fwd.client_id == "c1" and fwd.detail == {"shed": ["heater"]}
        assert fwd.trace["gateway_ms"] == 7.0 and fwd.trace["waited_ms"] == 1.5 and "retailer_ms" in fwd.trace
        received = rig.bridge.relay.received
        assert (received["gateway_ack"], received["gateway_outcome"]) == (1, 1)
        states = {c["client_id"]: c["state"] for c in await rig.bridge.store.commands_of("q1")}
        assert states == {"c1": CLOSED}


async def test_a_batch_of_reports_builds_no_model_and_no_uuid_per_gateway(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    n = 200
    store = BridgeStore(tmp_path / "b.db")
    await store.open()
    try:
        start = datetime.now(UTC) + timedelta(minutes=1)
        params = EmergencyParams(start=start, end=start + timedelta(minutes=5), power_limit_kw=1.0)
        cmds = [Command(request_id="q", client_id=f"c{i}", kind=RequestKind.EMERGENCY, params=params,
                        expires_at=params.end) for i in range(n)]
        now = datetime.now(UTC).timestamp()
        await store.accept_request([NewCommand("q", c.client_id, f"gw-{i}", c.msg_id, encode(c), now, now + 600)
                                    for i, c in enumerate(cmds)], [])
        relay = BridgeRelay("r1", {f"c{i}": f"gw-{i}" for i in range(n)}, store)
        reports = [(f"gw-{i}", encode(Ack(ack_ids=[c.msg_id])),
                    encode(Outcome(request_id="q", client_id=c.client_id, state=ClientState.EXECUTED)))
                   for i, c in enumerate(cmds)]
        built: dict[str, int] = {"uuid4": 0, "Outcome": 0, "Ack": 0}
        real_uuid4 = uuid.uuid4

        def counting_uuid4() -> uuid.UUID:
            built["uuid4"] += 1
            return real_uuid4()

        monkeypatch.setattr(messages.uuid, "uuid4", counting_uuid4)
        for cls in (Outcome, Ack):
            real_init = cls.__init__

            def counting_init(self: Any, *a: Any, __real: Any = real_init, __name: str = cls.__name__,
                              **kw: Any) -> None:
                built[__name] += 1
                __real(self, *a, **kw)

            monkeypatch.setattr(cls, "__init__", counting_init)
        # Through the relay's own inbound router (topic, rate limit, decode, handler), as gmqtt hands them over.
        await asyncio.gather(*(relay.on_local_message(topics.up("gateways", gid), p, False)
                               for gid, ack, out in reports for p in (ack, out)))
        assert built == {"uuid4": 0, "Outcome": 0, "Ack": 0}
        assert (relay.received["gateway_ack"], relay.received["gateway_outcome"]) == (n, n)
        counts = await store.counts()
        assert counts.get(CLOSED) == n and counts.get("sending", 0) == 0
        payloads = await store.sql.read(lambda db: [bytes(r[0]) for r in db.execute("SELECT payload FROM hub_outbox")])
        clients = set()
        for p in payloads:
            msg = decode(p)
            assert isinstance(msg, Outcomes | Outcome)
            entries = msg.reports if isinstance(msg, Outcomes) else [msg]
            clients |= {e.client_id for e in entries if e.state is ClientState.EXECUTED}  # type: ignore[union-attr]
        assert clients == {f"c{i}" for i in range(n)}
    finally:
        await store.close()
