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
