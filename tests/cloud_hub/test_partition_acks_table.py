"""The pure decision of when a partitioned bridge's acknowledgements acknowledge a message, and its wire form
(``cloud_hub.partition_acks``, ``mhp_wire.messages.Ack.partition``): tables of cases."""

from __future__ import annotations

import json

import pytest

from cloud_hub.partition_acks import acknowledged
from cloud_hub.replicas import ReplicaMessage
from mhp_wire.messages import Ack, AckPartition, WireError, decode, encode


def p(index: int, of: int) -> AckPartition:
    return AckPartition(index=index, of=of)


@pytest.mark.parametrize(("acks", "complete_after"), [
    ([None], [True]),  # an unpartitioned bridge: at once, as before
    ([p(0, 1)], [True]),  # one partition of one
    ([p(0, 2), p(1, 2)], [False, True]),
    ([p(1, 2), p(1, 2), p(0, 2)], [False, False, True]),  # a partition's repeated ack counts once
    ([p(0, 3), p(2, 3), p(0, 3), p(1, 3)], [False, False, False, True]),
    ([p(0, 2), p(1, 3), p(2, 3)], [False, False, False]),  # counts never mix (a retailer re-partitioned 2 -> 3)
    ([p(0, 2), p(1, 3), p(1, 2)], [False, False, True]),
    ([p(0, 2), None], [False, True]),  # an unpartitioned bridge's ack is the whole retailer's
])
def test_a_message_is_acknowledged_when_every_partition_has(acks: list[AckPartition | None],
                                                            complete_after: list[bool]) -> None:
    seen: dict[int, frozenset[int]] = {}
    got = []
    for a in acks:
        seen, complete = acknowledged(seen, a)
        got.append(complete)
    assert got == complete_after


def test_acknowledged_does_not_change_what_it_is_given() -> None:
    seen = {2: frozenset({0})}
    after, complete = acknowledged(seen, p(1, 2))
    assert complete and after == {2: frozenset({0, 1})} and seen == {2: frozenset({0})}


@pytest.mark.parametrize(("partition", "says"), [
    ({"index": 2, "of": 2}, "must be below its count"),
    ({"index": -1, "of": 2}, "greater than or equal to 0"),
    ({"index": 0, "of": 0}, "greater than or equal to 1"),
    ({"index": 0, "of": 65}, "less than or equal to 64"),
    ({"index": 0}, "of"),
    ({"index": 0, "of": 2, "extra": 1}, "extra"),
])
def test_an_impossible_partition_is_refused_with_a_clear_error(partition: dict[str, int], says: str) -> None:
    wire = json.dumps({"type": "ack", "ack_ids": ["m1"], "partition": partition}).encode()
    with pytest.raises(WireError, match=says):
        decode(wire)


def test_the_partition_is_absent_from_an_unpartitioned_ack_and_round_trips_when_present() -> None:
    plain = json.loads(encode(Ack(ack_ids=["m1"])))
    assert "partition" not in plain, "today's receivers see today's acknowledgement"
    assert decode(json.dumps({**plain, "partition": None}).encode()) == Ack.model_validate(plain)
    partitioned = Ack(ack_ids=["m1"], partition=p(1, 2))
    assert json.loads(encode(partitioned))["partition"] == {"index": 1, "of": 2}
    assert decode(encode(partitioned)) == partitioned


def test_a_forwarded_ack_between_hub_replicas_carries_the_partition() -> None:
    msg = ReplicaMessage(type="ack", sender="a", retailer_id="r1", ack_ids=["m1"], partition=p(1, 2))
    back = ReplicaMessage.model_validate(json.loads(msg.model_dump_json(exclude_none=True)))
    assert back.partition == p(1, 2)
    plain = ReplicaMessage(type="ack", sender="a", retailer_id="r1", ack_ids=["m1"])
    assert "partition" not in json.loads(plain.model_dump_json(exclude_none=True))
