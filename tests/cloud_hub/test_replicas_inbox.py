"""A hub replica's inbox (``mhp/v1/hub/replicas/{id}/in``): an ``outcome`` is a header line and the retailer's bytes
unchanged; the whole-JSON form of the release before is read for one release (docs/protocol.md, "Between hub
replicas"; docs/decisions.md, "An outcome forwarded between hub replicas fits the packet")."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from cloud_hub.metrics import HubMetrics
from cloud_hub.replicas import ACK_IDS_PER_FORWARD, ReplicaMessage, Replicas, TooBigToForward, outcome_frame, read_inbox
from mhp_wire import topics
from mhp_wire.messages import BRIDGE_OUTCOME_BYTES, SEND_PAYLOAD_BYTES, Ack, encode, replica_outcome_header
from tests.cloud_hub.test_replicas_forward_size import batch, packet_room


def test_the_inbox_reads_the_framed_outcome_verbatim_and_the_whole_json_form_of_the_release_before() -> None:
    """During a rolling upgrade a replica of the release before still forwards an outcome as one JSON object, its
    payload a JSON string: read for one release. Anything else after a header line is refused."""
    payload = batch("q-1", 2_000)[1]
    msg, got = read_inbox(outcome_frame("b", "r1", payload))
    assert (msg.type, msg.sender, msg.retailer_id, got) == ("outcome", "b", "r1", payload)
    old = ReplicaMessage(type="outcome", sender="b", retailer_id="r1", payload=payload.decode())
    assert b"\n" not in old.model_dump_json(exclude_none=True).encode()
    assert read_inbox(old.model_dump_json(exclude_none=True).encode())[1] == payload
    ack = ReplicaMessage(type="ack", sender="b", retailer_id="r1", ack_ids=["m1"])
    assert read_inbox(ack.model_dump_json(exclude_none=True).encode()) == (ack, None)
    with pytest.raises(ValueError, match="payload line"):
        read_inbox(ack.model_dump_json(exclude_none=True).encode() + b"\n" + payload)
    with pytest.raises(ValueError, match="payload line"):
        read_inbox(old.model_dump_json(exclude_none=True).encode() + b"\n" + payload)


def test_what_a_bridge_sends_fits_once_framed_by_a_replica_with_the_longest_ids() -> None:
    longest = "x" * 64
    payload = b" " * BRIDGE_OUTCOME_BYTES
    frame = outcome_frame(longest, "y" * 64, payload)
    assert len(frame) == SEND_PAYLOAD_BYTES and frame.endswith(payload)
    assert frame[:-len(payload)] == replica_outcome_header(longest, "y" * 64)
    refused = TooBigToForward(262_109, 261_990)
    assert "262109 bytes too big to forward" in str(refused) and "at most 261990 bytes" in str(refused)


class Recording:
    """The replica's MQTT link, recording what it publishes (the messages and their sizes are the subject here; a
    real broker's refusal of an oversize packet is shown in ``test_replicas_forward_size.py``)."""

    connected = True

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    async def publish(self, topic: str, payload: bytes, **_: Any) -> None:
        self.sent.append((topic, payload))


async def test_an_ack_filling_a_retailers_packet_is_forwarded_in_messages_that_fit_with_the_longest_ids() -> None:
    """A replica forwards the ids of an ``ack`` it did not send to the other replicas, in its own message. With
    replica ids of 64 characters (a longer inbox topic, a longer ``sender``) and a retailer's ``ack`` filling its
    packet with the shortest ``msg_id`` and ``sent_at``, the forwarded message grew ~100 bytes past the packet, and
    Mosquitto would cut the replica's link (review of s11-rep). Now only ids of the platform's form go, in parts of
    ``ACK_IDS_PER_FORWARD``, each fitting the packet; an id of another form (one long one) is not forwarded."""
    me, peer, retailer = "a" * 64, "b" * 64, "r1"
    up = topics.up("retailers", retailer)
    replicas = Replicas(me, None, HubMetrics())  # type: ignore[arg-type]  (forwarding reads no book)
    replicas.link = link = Recording()  # type: ignore[assignment]
    replicas.presence[peer] = "online"
    at = datetime.now(UTC).replace(microsecond=0)  # the shortest ``sent_at`` spelling
    base = len(encode(Ack(msg_id="m", sent_at=at, ack_ids=["x"])))
    long_id = Ack(msg_id="m", sent_at=at, ack_ids=["x" * (packet_room(up) - base + 1)])
    ids = [f"{i:064d}" for i in range((packet_room(up) - base) // 67)]
    many = Ack(msg_id="m", sent_at=at, ack_ids=ids)
    assert len(encode(long_id)) == packet_room(up) and packet_room(up) - 67 < len(encode(many)) <= packet_room(up)
    for ack in (long_id, many):
        await replicas.forward_acks(retailer, ack.ack_ids)
    assert [len(ReplicaMessage.model_validate_json(p).ack_ids or []) for _, p in link.sent] == [
        ACK_IDS_PER_FORWARD, len(ids) - ACK_IDS_PER_FORWARD], "the long id not forwarded, the others in two parts"
    assert all(t == topics.replica_in(peer) and len(p) <= packet_room(t) for t, p in link.sent)
    assert sorted(i for _, p in link.sent for i in ReplicaMessage.model_validate_json(p).ack_ids or []) == ids
