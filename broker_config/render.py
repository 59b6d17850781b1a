"""What a Mosquitto broker of the platform is (``BrokerSpec``) and the files that configure it (``render``).

The text of the three files is produced by pure functions (``conf_text``, ``password_file_text``, ``acl_text``);
``render`` only validates and writes them. The ACL comes from ``mhp_wire.topics`` so that the topic tree and the
broker's rules cannot drift apart.
"""

from __future__ import annotations

import base64
import hashlib
import os
import pwd
import secrets
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from string import Template
from typing import Literal

from mhp_wire import topics
from mhp_wire.secretfile import write_private

from .errors import BrokerConfigError

BrokerKind = Literal["hub", "retailer"]

CONF_NAME = "mosquitto.conf"
PASSWORD_NAME = "passwords"
ACL_NAME = "acl"
LOG_NAME = "mosquitto.log"
DB_NAME = "mosquitto.db"

PBKDF2_ITERATIONS = 210_000
"""Iterations of the password hashes (``$7$``: PBKDF2-HMAC-SHA512, Mosquitto 2.0's format, which reads the count
from each hash): OWASP's figure for PBKDF2-HMAC-SHA512 (``mosquitto_passwd`` of 2.0 writes only 101). The price:
Mosquitto checks the password at every CONNECT on its one thread, ~0.1-0.3 s of CPU per login on a small machine."""
GENERATED_PASSWORD_ITERATIONS = 1_000
"""For brokers whose every password comes from :func:`generate_password` (256 bits of entropy, which no iteration
count makes any harder to guess): the tests, ``mhp-stack`` and the fleet experiments, where hundreds to thousands
of logins (and hashes to write) at :data:`PBKDF2_ITERATIONS` would stall the broker for seconds to minutes."""
_SALT_BYTES = 12

_PARTY_KIND: dict[str, topics.PartyKind] = {"hub": "retailers", "retailer": "gateways"}
_DEFAULT_LOG_TYPES = ("error", "warning", "notice", "information")


@dataclass(frozen=True, slots=True)
class Identity:
    """An MQTT username and its password (the password is kept out of ``repr``)."""

    username: str
    password: str = field(repr=False)


def generate_password() -> str:
    """A new random password (URL-safe, 256 bits of entropy)."""
    return secrets.token_urlsafe(32)


@dataclass(frozen=True, slots=True)
class Delegate:
    """A second login of one party: ``identity`` gets exactly the rights of ``party_id`` (its ``down`` and ``up``
    subtrees and ``public``), under a username of its own, so that it holds a connection and a persistent session
    of its own. A retailer's bridge partitions log in to the hub broker this way (``retailer_bridge.partition``):
    the broker's ``use_username_as_clientid`` would otherwise let two processes of one retailer kick each other."""

    identity: Identity
    party_id: str


@dataclass(frozen=True, slots=True)
class BrokerTls:
    """The broker's TLS listener: its CA, certificate and key (PEM files; see ``broker_config.tls``).

    ``require_certificate``: clients must also present a certificate signed by ``cafile`` (mutual TLS), on top of
    their username and password.
    """

    cafile: Path
    certfile: Path
    keyfile: Path
    require_certificate: bool = False


@dataclass(kw_only=True)
class BrokerSpec:
    """Everything needed to configure and run one Mosquitto broker of the platform.

    ``privileged`` is the hub on the hub broker and the bridge on a retailer broker; it and every
    ``extra_privileged`` identity (a simulator, an observer) may read and write the whole v1 tree.
    ``parties`` are the retailers on the hub broker and the gateways on a retailer broker; each gets only the
    rules of ``mhp_wire.topics.acl_patterns``.
    """

    kind: BrokerKind
    port: int
    data_dir: Path
    privileged: Identity
    parties: list[Identity] = field(default_factory=list)
    extra_privileged: list[Identity] = field(default_factory=list)
    delegates: list[Delegate] = field(default_factory=list)
    """Second logins of parties (:class:`Delegate`): each gets the rights of its party, and no more."""
    host: str = "127.0.0.1"
    tls: BrokerTls | None = None
    """With it, the listener speaks MQTT over TLS only (TLS 1.2 or later); ``None``: plain MQTT."""
    max_inflight_messages: int = 1000
    max_queued_messages: int = 100_000
    """Per client; Mosquitto's default of 1000 drops messages under fan-out (delivery.md). 0 = no limit."""
    max_queued_bytes: int = 64 * 1024 * 1024
    """Per client, the bytes of QoS 1/2 messages queued beyond those in flight (with ``max_queued_messages``,
    whichever is reached first); beyond it Mosquitto drops, as there. 64 MiB holds ~100,000 ordinary messages but
    only 256 of the largest, so one offline client cannot make the broker hold 100,000 x 256 KiB. 0 = no limit."""
    max_packet_size: int = 256 * 1024
    """Whole MQTT packet in bytes; a client sending a larger one is disconnected."""
    password_iterations: int = PBKDF2_ITERATIONS
    """PBKDF2 iterations of the password file's hashes; :data:`GENERATED_PASSWORD_ITERATIONS` only where every
    password is generated."""
    autosave_interval: int = 10
    """Seconds between persistence snapshots (also written on SIGTERM, never on SIGKILL)."""
    use_username_as_clientid: bool = True
    """Replace every client id by the username (the default). Without it, any user who knows another's client id
    (they are predictable: ``bridge``, ``hub-1``, a gateway id) can disconnect it and take over, and so empty, its
    persistent session. The price: each username holds one connection at a time, so a hub replica or a second
    process of one party needs an identity of its own (``extra_privileged``); the stack, the fleet simulator and
    the scale-out experiment already log in that way. ``False`` only for a broker whose users all trust each
    other."""
    log_types: tuple[str, ...] = _DEFAULT_LOG_TYPES
    run_as_user: str | None = None
    """User Mosquitto switches to when started as root; ``None`` = the current user (it must read data_dir)."""
    environment: Literal["development", "production"] = "development"
    """``production`` refuses a plain-MQTT listener (``tls`` None): every link of a production broker is TLS."""

    @property
    def party_kind(self) -> topics.PartyKind:
        """``retailers`` on the hub broker, ``gateways`` on a retailer broker."""
        return _PARTY_KIND[self.kind]

    @property
    def privileged_identities(self) -> list[Identity]:
        """The privileged identity followed by the extra privileged ones."""
        return [self.privileged, *self.extra_privileged]

    @property
    def identities(self) -> dict[str, Identity]:
        """Every identity of this broker by username."""
        return {i.username: i for i in [*self.privileged_identities, *self.parties, *self.delegate_identities]}

    @property
    def delegate_identities(self) -> list[Identity]:
        """The identities of :attr:`delegates`."""
        return [d.identity for d in self.delegates]

    @property
    def conf_path(self) -> Path:
        """Where ``render`` writes ``mosquitto.conf``."""
        return self.data_dir / CONF_NAME

    @property
    def password_path(self) -> Path:
        """Where ``render`` writes the password file."""
        return self.data_dir / PASSWORD_NAME

    @property
    def acl_path(self) -> Path:
        """Where ``render`` writes the ACL file."""
        return self.data_dir / ACL_NAME

    @property
    def log_path(self) -> Path:
        """The broker's log file."""
        return self.data_dir / LOG_NAME

    @property
    def db_path(self) -> Path:
        """The broker's persistence snapshot."""
        return self.data_dir / DB_NAME


# Complexity (C901, PLR0912): one check per branch: every configuration error is reported at once (STYLE.md 7).
def validate(spec: BrokerSpec) -> list[str]:  # noqa: C901, PLR0912
    """Every problem of ``spec`` (an empty list when it can be rendered)."""
    errors: list[str] = []
    if spec.kind not in _PARTY_KIND:
        errors.append(f"kind must be 'hub' or 'retailer', not {spec.kind!r}")
    if not 1 <= spec.port <= 65535:
        errors.append(f"port must be 1-65535, not {spec.port}")
    if spec.tls is not None:
        if not isinstance(spec.tls, BrokerTls):
            errors.append("tls must be a BrokerTls or None: any other tls is not implemented")
        else:
            for name in ("cafile", "certfile", "keyfile"):
                path = Path(getattr(spec.tls, name))
                if any(c.isspace() for c in str(path.absolute())):
                    errors.append(f"tls.{name} must not contain whitespace (Mosquitto config lines): {str(path)!r}")
                elif not path.is_file():
                    errors.append(f"tls.{name}: no such file {str(path)!r}")
    if not spec.host or any(c.isspace() for c in spec.host):
        errors.append(f"host must be a non-empty address without spaces, not {spec.host!r}")
    if any(c.isspace() for c in str(spec.data_dir)):
        errors.append(f"data_dir must not contain whitespace (Mosquitto config lines): {str(spec.data_dir)!r}")
    for name in ("max_inflight_messages", "max_queued_messages", "max_queued_bytes", "max_packet_size",
                 "autosave_interval"):
        if getattr(spec, name) < 0:
            errors.append(f"{name} must be >= 0, not {getattr(spec, name)}")
    if spec.password_iterations < 1:
        errors.append(f"password_iterations must be >= 1, not {spec.password_iterations}")
    if spec.run_as_user is not None and not spec.run_as_user.strip():
        errors.append("run_as_user must be a user name or None")
    if spec.environment == "production" and spec.tls is None:
        errors.append('environment "production" refuses a plain MQTT listener: give tls (--tls-cafile, '
                      "--tls-certfile, --tls-keyfile)")
    elif spec.environment not in ("development", "production"):
        errors.append(f"environment must be 'development' or 'production', not {spec.environment!r}")

    seen: set[str] = set()
    roles = ([(i, True) for i in spec.privileged_identities] + [(i, False) for i in spec.parties]
             + [(i, False) for i in spec.delegate_identities])
    parties = {i.username for i in spec.parties}
    for d in spec.delegates:
        if d.party_id not in parties:
            errors.append(f"delegate {d.identity.username!r}: {d.party_id!r} is not a party of this broker")
    for identity, privileged in roles:
        role = "privileged identity" if privileged else f"party ({spec.party_kind})"
        try:
            topics.check_id(identity.username)
        except topics.TopicError as exc:
            errors.append(f"{role}: {exc}")
        else:
            if not privileged and identity.username in topics.RESERVED_IDS:
                errors.append(
                    f"{role} {identity.username!r}: reserved name ({', '.join(sorted(topics.RESERVED_IDS))}) "
                    "is only for privileged identities"
                )
        if identity.username in seen:
            errors.append(f"username {identity.username!r} is given more than once")
        seen.add(identity.username)
        if not identity.password:
            errors.append(f"{role} {identity.username!r}: empty password")
    return errors


def hash_password(password: str, *, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS) -> str:
    """The Mosquitto 2.0 password-file hash of ``password``: ``$7$<iterations>$<b64 salt>$<b64 PBKDF2-SHA512>``."""
    salt = secrets.token_bytes(_SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def password_file_text(identities: list[Identity], iterations: int = PBKDF2_ITERATIONS) -> str:
    """A Mosquitto password file with one ``username:hash`` line per identity."""
    return "".join(f"{i.username}:{hash_password(i.password, iterations=iterations)}\n" for i in identities)


def acl_text(spec: BrokerSpec) -> str:
    """The Mosquitto ACL file of ``spec``.

    ``pattern`` lines apply to every authenticated user, the privileged ones included; they only ever grant a
    party its own ``down``/``up`` subtrees and ``public``, which a privileged user has anyway. The privileged
    identities get the whole v1 tree through their ``user`` blocks, plus read access to ``$SYS`` to watch the
    broker (e.g. ``$SYS/broker/publish/messages/dropped``). No ``topic`` line precedes the first ``user`` line:
    such lines would apply to anonymous clients, which are refused anyway.
    """
    lines = [
        f"# Mosquitto ACL of a Market Hub Platform {spec.kind} broker, generated by broker_config.render().",
        f"# Parties ({spec.party_kind}): these patterns apply to every user; %u is the MQTT username.",
    ]
    lines += [f"pattern {access} {topic}" for access, topic in topics.acl_patterns(spec.party_kind)]
    if spec.kind == "hub":
        lines.append(f"# {topics.REPLICAS}/#: hub replicas only (each replica one privileged identity below).")
    for identity in spec.privileged_identities:
        lines += [
            "",
            f"user {identity.username}",
            f"topic readwrite {topics.PRIVILEGED_ACL}",
            "topic read $SYS/#",
        ]
    for d in spec.delegates:  # a party's own patterns, with its id in place of %u
        lines += ["", f"# {d.identity.username}: a second login of {d.party_id} (its rights, no more).",
                  f"user {d.identity.username}"]
        lines += [f"topic {access} {topic.replace('%u', d.party_id)}"
                  for access, topic in topics.acl_patterns(spec.party_kind)]
    return "\n".join(lines) + "\n"


def _current_user() -> str:
    return pwd.getpwuid(os.geteuid()).pw_name


def tls_lines(tls: BrokerTls | None) -> str:
    """The listener's TLS settings for ``mosquitto.conf`` (a comment when ``tls`` is ``None``)."""
    if tls is None:
        return "# (none: BrokerSpec.tls is None, so the listener above speaks plain MQTT)"
    lines = [
        f"cafile {Path(tls.cafile).absolute()}",
        f"certfile {Path(tls.certfile).absolute()}",
        f"keyfile {Path(tls.keyfile).absolute()}",
        "tls_version tlsv1.2",
    ]
    if tls.require_certificate:
        lines.append("require_certificate true")
    return "\n".join(lines)


def conf_text(spec: BrokerSpec) -> str:
    """The ``mosquitto.conf`` of ``spec`` (paths made absolute), from the shared template."""
    data_dir = spec.data_dir.absolute()
    template = Template(resources.files(__package__).joinpath("mosquitto.conf.tmpl").read_text("utf-8"))
    return template.substitute(
        kind=spec.kind,
        password_file=data_dir / PASSWORD_NAME,
        acl_file=data_dir / ACL_NAME,
        port=spec.port,
        host=spec.host,
        max_inflight_messages=spec.max_inflight_messages,
        max_queued_messages=spec.max_queued_messages,
        max_queued_bytes=spec.max_queued_bytes,
        max_packet_size=spec.max_packet_size,
        use_username_as_clientid=str(spec.use_username_as_clientid).lower(),
        persistence_location=f"{data_dir}/",
        autosave_interval=spec.autosave_interval,
        log_file=data_dir / LOG_NAME,
        log_types="\n".join(f"log_type {t}" for t in spec.log_types),
        run_as_user=spec.run_as_user or _current_user(),
        tls=tls_lines(spec.tls),
    )


def render(spec: BrokerSpec) -> Path:
    """Validate ``spec``, write ``mosquitto.conf``, the password file and the ACL file into ``spec.data_dir``.

    The password and ACL files are mode 0600. Returns the path of ``mosquitto.conf``.
    Raises ``BrokerConfigError`` listing every problem of ``spec``.
    """
    errors = validate(spec)
    if errors:
        raise BrokerConfigError(errors)
    spec.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    identities = [*spec.privileged_identities, *spec.parties, *spec.delegate_identities]
    write_private(spec.password_path, password_file_text(identities, spec.password_iterations))
    write_private(spec.acl_path, acl_text(spec))
    write_private(spec.conf_path, conf_text(spec), 0o644)
    return spec.conf_path
