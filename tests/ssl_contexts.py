"""One default TLS client context for the whole test process instead of one per ``httpx`` client.

Every ``httpx.AsyncClient``/``httpx.Client`` builds an ``ssl.SSLContext`` when it is made, even for plain
``http://``: it parses certifi's whole CA bundle, about 65 ms on this machine. A hub in a test makes three (its
webhook deliveries, the OpenADR 3 notifier, the test's own client), so a few hundred hub tests spent minutes
there (see docs/performance.md, "The test suite's time"). This plugin makes the *default* case, ``verify=True``
without a client certificate, build that context once per ``trust_env`` and CA location (``SSL_CERT_FILE``,
``SSL_CERT_DIR``, read by httpx when ``trust_env``) and hand the same one to every client. The context is the one
httpx would have built (same CA bundle, same checks); nothing in the code under test or the suite changes it
afterwards except the ALPN list httpcore sets per connection, which is ``["http/1.1"]`` for every client here
(none uses HTTP/2). Any other ``verify``/``cert`` (the TLS tests' own CAs)
goes to httpx untouched. Only this process is affected: the hubs, bridges and gateways the suite starts as
processes build their own contexts as in production.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable
from typing import Any

import httpx._config
import httpx._transports.default

_original: Callable[..., ssl.SSLContext] = httpx._config.create_ssl_context
_cache: dict[tuple[bool, str | None, str | None], ssl.SSLContext] = {}


def create_ssl_context(verify: Any = True, cert: Any = None, trust_env: bool = True) -> ssl.SSLContext:
    """httpx's ``create_ssl_context``; the default case built once per ``trust_env`` and CA location, shared."""
    if verify is not True or cert:
        return _original(verify=verify, cert=cert, trust_env=trust_env)
    key = (True, os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR")) if trust_env else (False, None, None)
    ctx = _cache.get(key)
    if ctx is None:
        ctx = _cache[key] = _original(verify=verify, cert=cert, trust_env=trust_env)
    return ctx


httpx._config.create_ssl_context = create_ssl_context  # type: ignore[assignment]
httpx._transports.default.create_ssl_context = create_ssl_context  # type: ignore[assignment]
