"""What a retailer's message to the hub says about clients' outcomes, whether one ``outcome`` or an ``outcomes``
message (many clients of one request): tests that follow clients' outcomes read either through this."""

from __future__ import annotations

from mhp_wire.messages import Message, Outcome, OutcomeReport, Outcomes
from tests.mqtt_party import Party


def client_outcomes(msg: Message) -> list[Outcome]:
    """Each client's outcome in ``msg`` as an :class:`Outcome` carrying ``msg``'s ``msg_id`` (empty: no outcome)."""
    if isinstance(msg, Outcome):
        return [msg]
    if isinstance(msg, Outcomes):
        return [Outcome(msg_id=msg.msg_id, sent_at=msg.sent_at, request_id=msg.request_id, client_id=r.client_id,
                        state=r.state, detail=r.detail, trace=r.trace, revision=r.revision)
                for r in msg.reports if isinstance(r, OutcomeReport)]
    return []


async def no_outcomes(party: Party, within: float) -> None:
    """Assert that no ``outcome`` nor ``outcomes`` message arrives at ``party`` within ``within`` seconds."""
    try:
        while True:
            msg = await party.next(timeout=within)
            assert not client_outcomes(msg), f"unexpected outcome(s): {msg}"
    except TimeoutError:
        return
