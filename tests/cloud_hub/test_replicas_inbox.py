"""A hub replica's inbox (``mhp/v1/hub/replicas/{id}/in``): an ``outcome`` is a header line and the retailer's bytes
unchanged; the whole-JSON form of the release before is read for one release (docs/protocol.md, "Between hub
replicas"; docs/decisions.md, "An outcome forwarded between hub replicas fits the packet")."""

from __future__ import annotations

import pytest

from cloud_hub.replicas import ReplicaMessage, TooBigToForward, outcome_frame, read_inbox
from mhp_wire.messages import BRIDGE_OUTCOME_BYTES, SEND_PAYLOAD_BYTES, replica_outcome_header
from tests.cloud_hub.test_replicas_forward_size import batch


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
