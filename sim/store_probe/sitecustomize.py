"""Loaded by every Python process started with this directory on ``PYTHONPATH`` (see ``sim.store_probe``): when
``MHP_PROBE_DIR`` is set, wraps the bridge store's methods to log each call once the store's module is imported."""

from __future__ import annotations

import builtins
import functools
import os
import sys
import time
from typing import Any

_DIR = os.environ.get("MHP_PROBE_DIR")
_WRAPPED = ("accept_request", "due_commands", "mark_sent", "apply_reports", "postpone_hub_resends", "due_outbox",
            "mark_outbox_sent", "next_hub_due", "next_gateway_due", "ack_outbox")


def _install(cls: Any, log: Any) -> None:
    for name in _WRAPPED:
        method = getattr(cls, name)

        def wrapped(*args: Any, _m: Any = method, _n: str = name, **kwargs: Any) -> Any:
            async def timed() -> Any:
                t0 = time.time()
                try:
                    return await _m(*args, **kwargs)
                finally:
                    log.write(f"{_n} {t0:.4f} {time.time():.4f}\n")
            return timed()

        setattr(cls, name, functools.wraps(method)(wrapped))


if _DIR:
    _log = open(os.path.join(_DIR, f"probe-{os.getpid()}.log"), "a", buffering=1)
    _import = builtins.__import__

    _done: list[bool] = []

    def _hook(*args: Any, **kwargs: Any) -> Any:
        module = _import(*args, **kwargs)
        store = sys.modules.get("retailer_bridge.store")
        if not _done and store is not None and hasattr(store, "BridgeStore"):  # once, nested imports included
            _done.append(True)
            builtins.__import__ = _import
            _install(store.BridgeStore, _log)
        return module

    builtins.__import__ = _hook
