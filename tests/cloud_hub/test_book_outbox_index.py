"""The request book's queued messages keep an index by request (issue 14, fourth round): every operation the book
uses leaves ``has``/``of`` agreeing with a scan of every queued message, which is what they replace on each row
write."""

from __future__ import annotations

import random

from cloud_hub.book import OutboxItem, _Outbox


def _item(msg_id: str, request_id: str) -> OutboxItem:
    return OutboxItem(msg_id, request_id, "r1", "request", b"{}")


def _agrees(box: _Outbox, requests: list[str]) -> None:
    for rid in requests:
        scanned = [i for i in box.values() if i.request_id == rid]
        assert box.has(rid) == bool(scanned), rid
        assert sorted(i.msg_id for i in box.of(rid)) == sorted(i.msg_id for i in scanned), rid


def test_every_operation_keeps_the_index_in_step_with_a_scan() -> None:
    rng = random.Random(14)
    box = _Outbox()
    requests = [f"q{k}" for k in range(6)]
    for step in range(3000):
        op = rng.choice(["set", "set", "del", "pop", "pop_missing", "setdefault", "update", "move"])
        mid = f"m{rng.randrange(40)}"
        rid = rng.choice(requests)
        if op == "set":
            box[mid] = _item(mid, rid)
        elif op == "del" and mid in box:
            del box[mid]
        elif op == "pop":
            popped = box.pop(mid, None)
            assert popped is None or popped.msg_id == mid
        elif op == "pop_missing":
            assert box.pop("never", None) is None
        elif op == "setdefault":
            kept = box.setdefault(mid, _item(mid, rid))
            assert kept is box[mid]
        elif op == "update":
            box.update({mid: _item(mid, rid), f"{mid}x": _item(f"{mid}x", rid)})
        elif op == "move" and mid in box:  # the same id queued again for another request replaces it
            box[mid] = _item(mid, rid)
        if step % 97 == 0:
            _agrees(box, requests)
    _agrees(box, requests)
    box.clear()
    assert not box and not any(box.has(r) for r in requests)


def test_a_request_without_queued_messages_has_none() -> None:
    box = _Outbox()
    box["a"] = _item("a", "q1")
    box["b"] = _item("b", "q1")
    del box["a"]
    assert box.has("q1") and [i.msg_id for i in box.of("q1")] == ["b"]
    box.pop("b")
    assert not box.has("q1") and box.of("q1") == []
