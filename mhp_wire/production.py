"""The production profile: what every service's settings refuse when ``environment = "production"``.

Each service names its own secrets, MQTT links and listeners; the rules and the wording live here, so that the hub,
the bridges, the gateways and the DSO page refuse the same things the same way, and list every problem at once.
"""

from __future__ import annotations

from collections.abc import Mapping


def production_problems(*, secrets: Mapping[str, str] | None = None,
                        mqtt_ca_files: Mapping[str, object | None] | None = None,
                        listeners: Mapping[str, bool] | None = None,
                        https_urls: Mapping[str, str | None] | None = None) -> list[str]:
    """Every way the given settings break the production profile (an empty list: none).

    ``secrets``: setting name -> value, each must be set; ``mqtt_ca_files``: setting name -> the CA file of an MQTT
    link, each must be set (the link is then TLS, verifying chain and host name); ``listeners``: a description of an
    HTTP listener -> whether it is served over TLS or behind a TLS proxy; ``https_urls``: setting name -> an outgoing
    URL (``None``: not used), each must be ``https://``.
    """
    problems = [f"{name} must be set" for name, value in (secrets or {}).items() if not value]
    problems += [f"{name} must be set: MQTT links are TLS-only" for name, ca in (mqtt_ca_files or {}).items()
                 if not ca]
    problems += [f"the {what} must be served over TLS" for what, ok in (listeners or {}).items() if not ok]
    problems += [f"{name} must be an https:// URL" for name, url in (https_urls or {}).items()
                 if url is not None and not url.lower().startswith("https://")]
    return problems


def production_error(problems: list[str]) -> str:
    """One message listing every problem (settings validation reports them all at once)."""
    return ('environment "production" refuses to start: ' + "; ".join(problems)
            + ' (environment "development" allows plain links on a private machine)')
