"""Which gateways' reports give the bridge a round-trip sample (``Applied.first_sent_at`` of
:meth:`BridgeStore.apply_reports`, which the relay feeds to its ``RoundTrip``), on a real SQLite store: a command
sent once and answered (by its ``ack``, its outcome, or both in one batch) gives one; a re-sent one gives none
(Karn's rule: its answer could be to either send)."""

from __future__ import annotations

from pathlib import Path

import pytest

from retailer_bridge.store import BridgeStore, Judged, NewCommand, delivered_msg_id


def _delivered(cmd: dict[str, object]) -> tuple[str, bytes]:
    return delivered_msg_id(str(cmd["msg_id"])), b"delivered"


def _outcome() -> Judged:
    """c1's terminal outcome, judged as the relay judges a batch (one call, a verdict per outcome)."""
    return Judged([("q", "c1")], lambda rows: [("final", b"executed")])


@pytest.mark.parametrize(("sends", "ack", "outcome", "samples"), [
    (1, True, False, [100.0]),   # the ack alone
    (1, False, True, [100.0]),   # the outcome alone stands for the ack
    (1, True, True, [100.0]),    # both in one batch: one sample, not two
    (2, True, False, []),        # re-sent: none (Karn's rule)
    (2, False, True, []),
    (2, True, True, []),
], ids=["once-ack", "once-outcome", "once-both", "resent-ack", "resent-outcome", "resent-both"])
async def test_a_report_gives_a_sample_only_for_a_command_sent_once(
        tmp_path: Path, sends: int, ack: bool, outcome: bool, samples: list[float]) -> None:
    store = BridgeStore(tmp_path / "b.db")
    await store.open()
    try:
        await store.accept_request([NewCommand("q", "c1", "gw-1", "cmd1", b"command", 0.0, 1e12)], [])
        for n in range(sends):
            await store.mark_sent([("cmd1", 200.0 + n)], now=100.0 + n)
        applied = await store.apply_reports([("gw-1", ["cmd1"])] if ack else [], _outcome() if outcome else None,
                                            _delivered)
        assert applied.first_sent_at == samples
        cmd = (await store.commands_of("q"))[0]
        assert cmd["attempts"] == sends and cmd["state"] == ("closed" if outcome else "delivered"), cmd
    finally:
        await store.close()


def _outcomes(*clients: str) -> Judged:
    """Terminal outcomes of these clients' commands of request q, in order, all judged final."""
    return Judged([("q", c) for c in clients], lambda rows: [("final", b"executed")] * len(rows))


async def test_samples_of_a_batch_count_each_command_once(tmp_path: Path) -> None:
    """Found in review of s14-bridge2 (which notes the samples while closing): two outcomes of one command in a
    batch give one sample; an ack of one command and the outcome of another, both sent once, give one each; an
    outcome closing a command that was delivered before the batch gives none (its ack gave it)."""
    store = BridgeStore(tmp_path / "b.db")
    await store.open()
    try:
        await store.accept_request([NewCommand("q", c, f"gw-{c}", f"cmd-{c}", b"command", 0.0, 1e12)
                                    for c in ("c1", "c2", "c3", "c4")], [])
        await store.mark_sent([(f"cmd-{c}", 200.0) for c in ("c1", "c2", "c3", "c4")], now=100.0)
        twice = await store.apply_reports([], _outcomes("c1", "c1"), _delivered)
        assert twice.first_sent_at == [100.0]
        mixed = await store.apply_reports([("gw-c2", ["cmd-c2"])], _outcomes("c3"), _delivered)
        assert mixed.first_sent_at == [100.0, 100.0]
        late = await store.apply_reports([], _outcomes("c2"), _delivered)  # c2 was delivered by its ack above
        assert late.first_sent_at == []
        states = {c["client_id"]: c["state"] for c in await store.commands_of("q")}
        assert states == {"c1": "closed", "c2": "closed", "c3": "closed", "c4": "sending"}
    finally:
        await store.close()
