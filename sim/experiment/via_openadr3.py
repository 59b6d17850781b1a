"""The emergency fan-out through the hub's standard door: N OpenADR 3 VENs on the MQTT notifier.

``mhp-sim experiment fanout --via openadr3`` runs this after our own chain (and beside ``--peer openleadr``), into
``OUT/via-openadr3``. The hub (``cloud-hub serve``) and its Mosquitto run as processes, as in the other
experiments. Each VEN is a retailer principal with one client; it logs in to the hub broker with its own identity,
subscribes to its own events topic (``GET /notifiers/mqtt/topics/vens/{id}/events``, scoped by the broker's ACL)
and, on each CREATE, posts a report (``X_MHP_OUTCOME`` = ``executed``) over HTTP with its bearer token, as a VEN
acknowledging an event would. All VENs live in this one process (gmqtt through ``mhp_wire.mqtt``; their CPU is
the experiment's, not the product's).

Per run: the DSO's ``POST /v1/emergencies`` for every client; the time from the POST by which 50, 90, 99 and 100 %
of the VENs had their notification, and by which 50 … 100 % of the reports were accepted (201); missing and
duplicate notifications; CPU seconds of the hub and its broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from broker_config.launcher import BrokerSpec, MosquittoProcess, generate_password
from cloud_hub.openadr3 import BASE_PATH
from cloud_hub.tokens import TokenBook
from mhp_wire.mqtt import MqttEndpoint, MqttLink
from sim.experiment.base import BaseParams, Experiment, proc_sample
from sim.experiment.fanout import QUANTILES, time_to_fraction

REPORT_CONCURRENCY = 32
"""Reports in flight at once (the VENs share one HTTP connection pool)."""


class OpenAdr3Fanout(Experiment):
    """N VENs (one client each) on the hub's OpenADR 3 MQTT notifier; :meth:`run` returns the results."""

    def __init__(self, vens: int, out: Path, runs: int, timeout_s: float) -> None:
        super().__init__(BaseParams(out=out, clients=vens, retailers=vens))
        self.runs, self.timeout_s = runs, timeout_s
        self.client_of = {r: self.client_ids[i] for i, r in enumerate(self.retailer_ids)}
        self.notified: dict[str, dict[str, float]] = {}
        """request id -> VEN -> when its notification arrived (epoch seconds); duplicates counted apart."""
        self.duplicates = 0
        self.reported: dict[str, dict[str, float]] = {}
        self.report_errors: list[str] = []

    def log(self, text: str) -> None:
        """A progress line."""
        print(f"[fanout via openadr3] {text}", flush=True)

    def run(self) -> dict[str, Any]:
        """Start, measure, stop, write; returns the results."""
        (self.work / "logs").mkdir(parents=True, exist_ok=True)
        passwords = {r: generate_password() for r in self.retailer_ids}
        spec = self._broker_spec(passwords)
        started = time.time()
        self.log(f"{len(self.retailer_ids)} VENs, {self.runs} run(s)")
        try:
            with MosquittoProcess(spec) as broker:
                if broker.pid is not None:
                    self.pids["broker"] = broker.pid
                try:
                    runs = asyncio.run(self._via_async(broker.port, spec, passwords))
                finally:
                    self._stop_all()
        finally:
            self._stop_all()
        results = {"vens": len(self.retailer_ids), "runs": runs, "wall_s": round(time.time() - started, 3),
                   "summary": summarize(runs)}
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "results.json").write_text(json.dumps(results, indent=1))
        return results

    async def _via_async(self, port: int, spec: BrokerSpec, passwords: dict[str, str]) -> list[dict[str, Any]]:
        hub_url, tokens = await self.start_hub(port, spec)
        await self._register(hub_url, tokens)
        book = TokenBook(self.work / "hub-tokens.json")
        ven_tokens = {r: book.issue(f"retailer:{r}") for r in self.retailer_ids}
        async with httpx.AsyncClient(base_url=hub_url, timeout=60) as http:
            topic_of = {}
            for r in self.retailer_ids:  # each VEN joins and asks for its own topics, as docs/openadr3.md says
                joined = await http.post(f"{BASE_PATH}/vens", json={"venName": r},
                                         headers={"Authorization": f"Bearer {ven_tokens[r]}"})
                joined.raise_for_status()
                got = await http.get(f"{BASE_PATH}/notifiers/mqtt/topics/vens/{r}/events",
                                     headers={"Authorization": f"Bearer {ven_tokens[r]}"})
                got.raise_for_status()
                topic_of[r] = got.json()["topics"]["CREATE"]
            queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
            async with contextlib.AsyncExitStack() as stack:
                t0 = time.monotonic()
                for r in self.retailer_ids:
                    await stack.enter_async_context(self._ven(port, r, passwords[r], topic_of[r], queue))
                self.log(f"{len(self.retailer_ids)} VENs connected in {time.monotonic() - t0:.1f} s")
                reporters = [asyncio.create_task(self._reporter(http, queue, ven_tokens), name=f"ven-reporter-{k}")
                             for k in range(REPORT_CONCURRENCY)]
                try:
                    return [await self._one_run(http, tokens["dso"], n + 1) for n in range(self.runs)]
                finally:
                    for task in reporters:
                        task.cancel()
                    await asyncio.gather(*reporters, return_exceptions=True)

    @contextlib.asynccontextmanager
    async def _ven(self, port: int, ven: str, password: str, topic: str,
                   queue: asyncio.Queue[tuple[str, str]]) -> AsyncIterator[MqttLink]:
        async def handle(topic_in: str, payload: bytes, retained: bool) -> None:
            at = time.time()
            note = json.loads(payload)
            rid = str(note["object"]["id"])
            seen = self.notified.setdefault(rid, {})
            if ven in seen:
                self.duplicates += 1
                return
            seen[ven] = at
            queue.put_nowait((ven, rid))

        link = MqttLink(MqttEndpoint("127.0.0.1", port, ven, password), client_id=ven, subscriptions=[topic],
                        handler=handle, clean_start=True, session_expiry_s=0)
        async with link:
            yield link

    async def _reporter(self, http: httpx.AsyncClient, queue: asyncio.Queue[tuple[str, str]],
                        ven_tokens: dict[str, str]) -> None:
        while True:
            ven, rid = await queue.get()
            client = self.client_of[ven]
            body = {"programID": "mhp-emergency", "eventID": rid, "clientName": ven, "resources": [
                {"resourceName": client, "intervals": [{"id": 0, "payloads": [
                    {"type": "X_MHP_OUTCOME", "values": ["executed"]}]}]}]}
            try:
                r = await http.post(f"{BASE_PATH}/reports", json=body,
                                    headers={"Authorization": f"Bearer {ven_tokens[ven]}"})
                if r.status_code == 201:
                    self.reported.setdefault(rid, {})[ven] = time.time()
                else:
                    self.report_errors.append(f"{ven}: {r.status_code} {r.text[:200]}")
            except httpx.HTTPError as exc:
                self.report_errors.append(f"{ven}: {exc}")

    def _cpu(self) -> dict[str, float]:
        out = {}
        for name, pid in self.pids.items():
            s = proc_sample(pid)
            if s is not None:
                out[name] = s["cpu_s"]
        return out

    async def _one_run(self, http: httpx.AsyncClient, dso_token: str, n: int) -> dict[str, Any]:
        total = len(self.retailer_ids)
        cpu_before = self._cpu()
        start = datetime.now(UTC) + timedelta(minutes=1)
        t_post = time.time()
        resp = await http.post("/v1/emergencies", headers={"Authorization": f"Bearer {dso_token}"}, json={
            "client_ids": self.client_ids, "start": start.isoformat(), "duration_s": 600, "power_limit_kw": 2.0})
        resp.raise_for_status()
        rid = resp.json()["request_id"]
        post_ms = round((time.time() - t_post) * 1000, 3)
        while time.time() - t_post < self.timeout_s:
            if len(self.reported.get(rid, {})) >= total:
                break
            await asyncio.sleep(0.05)
        cpu_after = self._cpu()
        notified = sorted(t - t_post for t in self.notified.get(rid, {}).values())
        reported = sorted(t - t_post for t in self.reported.get(rid, {}).values())
        run: dict[str, Any] = {"run": n, "request_id": rid, "vens": total, "post_ms": post_ms,
                               "notified": len(notified), "reported": len(reported),
                               "missing_notifications": total - len(notified),
                               "cpu_s": {k: round(cpu_after[k] - cpu_before.get(k, 0.0), 3) for k in cpu_after}}
        for q in QUANTILES:
            run[f"notified_t{q}_s"] = time_to_fraction(notified, total, q)
            run[f"reported_t{q}_s"] = time_to_fraction(reported, total, q)
        self.log(f"run {n}/{self.runs}: {len(notified)}/{total} notified, 100 % by {run['notified_t100_s']} s; "
                 f"{len(reported)} reports accepted, 100 % by {run['reported_t100_s']} s; CPU s "
                 f"{json.dumps(run['cpu_s'])}")
        return run


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Best and worst of the runs."""
    done = [r["notified_t100_s"] for r in runs if r["notified_t100_s"] is not None]
    rep = [r["reported_t100_s"] for r in runs if r["reported_t100_s"] is not None]
    return {"runs": len(runs), "all_notified_every_run": all(r["missing_notifications"] == 0 for r in runs),
            "all_reported_every_run": all(r["reported"] == r["vens"] for r in runs),
            "notified_t100_s_best": min(done, default=None), "notified_t100_s_worst": max(done, default=None),
            "reported_t100_s_best": min(rep, default=None), "reported_t100_s_worst": max(rep, default=None)}


def run_openadr3_fanout(vens: int, out: Path, runs: int, timeout_s: float = 60.0) -> dict[str, Any]:
    """The fan-out to ``vens`` OpenADR 3 VENs, ``runs`` times; writes ``out/results.json``."""
    experiment = OpenAdr3Fanout(vens, out, runs, timeout_s)
    results = experiment.run()
    results["duplicates"] = experiment.duplicates
    results["report_errors"] = experiment.report_errors[:20]
    (Path(out) / "results.json").write_text(json.dumps(results, indent=1))
    return results
