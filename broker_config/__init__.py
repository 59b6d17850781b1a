"""Mosquitto configuration of the platform's two broker kinds (hub, retailer) and a launcher for real brokers.

Example::

    spec = BrokerSpec(kind="hub", port=1883, data_dir=Path("state/hub-broker"),
                      privileged=Identity("hub", generate_password()),
                      parties=[Identity("r1", generate_password())])
    with MosquittoProcess(spec) as broker:
        ...
"""

from .errors import BrokerConfigError, BrokerError, BrokerStartError, MosquittoNotFoundError
from .launcher import MosquittoProcess, find_mosquitto, live_processes
from .render import (
    GENERATED_PASSWORD_ITERATIONS,
    PBKDF2_ITERATIONS,
    BrokerKind,
    BrokerSpec,
    Identity,
    generate_password,
    hash_password,
    render,
)

__all__ = [
    "GENERATED_PASSWORD_ITERATIONS",
    "PBKDF2_ITERATIONS",
    "BrokerConfigError",
    "BrokerError",
    "BrokerKind",
    "BrokerSpec",
    "BrokerStartError",
    "Identity",
    "MosquittoNotFoundError",
    "MosquittoProcess",
    "find_mosquitto",
    "generate_password",
    "hash_password",
    "live_processes",
    "render",
]
