"""Second logins of a party (``broker_config.render.Delegate``), against a real Mosquitto 2.0: what a retailer's
bridge partitions use at the hub broker (issue 14, item 3). A delegate of ``r1`` has ``r1``'s rights and no more,
and holds a connection of its own next to ``r1``'s (``use_username_as_clientid`` would make one login kick the
other). Negative checks use the sentinel pattern of ``test_acl.py``."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker_config.errors import BrokerConfigError
from broker_config.launcher import BrokerSpec, Identity, generate_password
from broker_config.render import Delegate, acl_text, render
from mhp_wire import topics
from tests.broker_fixtures import MosquittoFactory

from .conftest import ConnectAs
from .test_acl import NOT_AUTHORIZED, assert_code, assert_success, until_sentinel


def test_a_delegate_has_its_partys_rights_beside_it_and_no_more(mosquitto_factory: MosquittoFactory,
                                                                connect_as: ConnectAs) -> None:
    broker = mosquitto_factory("hub", ["r1", "r2"], "hub",
                               delegates=[Delegate(Identity("r1.p1", generate_password()), "r1")])
    hub = connect_as(broker, "hub")
    r1 = connect_as(broker, "r1")
    p1 = connect_as(broker, "r1.p1")
    for client in (r1, p1):
        assert_success(client.subscribe(topics.down("retailers", "r1")))
    assert_success(p1.subscribe(topics.down("retailers", "r2")))  # granted, but never delivers (the ACL, per message)
    assert_success(hub.subscribe(topics.all_up("retailers")))
    # Both logins of r1 stay connected and each gets r1's messages; r2's never reach the delegate.
    assert_success(hub.publish(topics.down("retailers", "r2"), b"for r2"))
    assert_success(hub.publish(topics.down("retailers", "r1"), b"sentinel"))
    for client in (r1, p1):
        assert [m.payload for m in until_sentinel(client)] == [b"sentinel"]
    # The delegate writes r1's up subtree (its presence included), not r2's.
    assert_code(p1.publish(topics.up("retailers", "r2"), b"as r2"), NOT_AUTHORIZED)
    assert_success(p1.publish(topics.status("retailers", "r1"), b"online"))
    assert_success(p1.publish(topics.up("retailers", "r1"), b"sentinel"))
    got = until_sentinel(hub)
    assert [(m.topic, m.payload) for m in got] == [(topics.status("retailers", "r1"), b"online"),
                                                  (topics.up("retailers", "r1"), b"sentinel")]
    assert not r1.disconnected.is_set() and not p1.disconnected.is_set()


def test_the_acl_names_the_party_in_place_of_the_username(tmp_path: Path) -> None:
    spec = BrokerSpec(kind="hub", port=1883, data_dir=tmp_path, privileged=Identity("hub", "x"),
                      parties=[Identity("r1", "y")], delegates=[Delegate(Identity("r1.p1", "z"), "r1")])
    block = acl_text(spec).split("user r1.p1\n", 1)[1].splitlines()
    assert block == [f"topic {a} {t.replace('%u', 'r1')}" for a, t in topics.acl_patterns("retailers")]


@pytest.mark.parametrize(("delegate", "says"), [
    (Delegate(Identity("r1.p1", "z"), "r9"), "'r9' is not a party of this broker"),
    (Delegate(Identity("r1", "z"), "r1"), "username 'r1' is given more than once"),
    (Delegate(Identity("hub", "z"), "r1"), "reserved name"),
    (Delegate(Identity("r1.p1", ""), "r1"), "empty password"),
])
def test_a_bad_delegate_is_refused_with_a_clear_error(tmp_path: Path, delegate: Delegate, says: str) -> None:
    spec = BrokerSpec(kind="hub", port=1883, data_dir=tmp_path, privileged=Identity("hub", "x"),
                      parties=[Identity("r1", "y")], delegates=[delegate])
    with pytest.raises(BrokerConfigError, match=says):
        render(spec)
