"""``cloud-hub serve`` tunes its garbage collector as the bridge's process does (issue 14, sixth round): start-up's
objects frozen, young collections rarer. Checked on the real process (its own log line, written after the tuning
with the process's own figures), since the tuning is process-wide and the test process must keep its own."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import httpx

from broker_config.launcher import die_with_parent
from mhp_wire.gc_tuning import YOUNG_THRESHOLD
from tests.broker_fixtures import MosquittoFactory
from tests.cloud_hub.test_restart import HubProcess, wait_ready

LINE = re.compile(r"garbage collector tuned for throughput: (\d+) start-up objects frozen, young collections every "
                  r"(\d+) new objects")


class _InfoHub(HubProcess):
    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "cloud_hub.cli", "--log-level", "INFO", "serve",
                                          "--config", str(self.config)], stdout=out, stderr=subprocess.STDOUT,
                                         preexec_fn=die_with_parent())


async def test_the_hub_process_freezes_its_start_up_state_and_serves(tmp_path: Path,
                                                                     mosquitto_factory: MosquittoFactory) -> None:
    broker = mosquitto_factory("hub", ["r1"], "hub")
    hub = _InfoHub(tmp_path, broker)
    hub.start()
    try:
        async with httpx.AsyncClient(base_url=hub.url, timeout=10) as http:
            await wait_ready(http)
            served = await http.get("/v1/requests", headers={"Authorization": f"Bearer {hub.tokens['dso']}"})
        assert served.status_code == 200
        found = LINE.search(hub.log.read_text())
        assert found is not None, hub.log.read_text()
        assert int(found.group(2)) == YOUNG_THRESHOLD
        assert int(found.group(1)) > 10_000  # the imported modules at least: all of them frozen
    finally:
        hub.stop()
