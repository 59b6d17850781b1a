"""Errors raised by ``broker_config``: configuration mistakes and broker process failures."""

from __future__ import annotations


class BrokerError(Exception):
    """Base class of every error raised by ``broker_config``."""


class BrokerConfigError(BrokerError, ValueError):
    """A ``BrokerSpec`` cannot be rendered; ``errors`` lists every problem found, not just the first."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = list(errors)
        super().__init__("invalid broker configuration:\n  - " + "\n  - ".join(self.errors))


class BrokerStartError(BrokerError):
    """Mosquitto could not be started, or did not accept connections in time."""


class MosquittoNotFoundError(BrokerStartError):
    """No ``mosquitto`` executable was found."""
