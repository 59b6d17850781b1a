"""The customers' accounts for the personal area: passwords, sessions, login throttling and their schedules.

Everything lives in the bridge's SQLite file (tables ``customer_*``) behind its own :class:`SqliteThread`, so a
password check (scrypt, deliberately slow) never runs on the event loop and login attempts are strictly serialised:
a burst of parallel guesses cannot slip past the lock-out. Stored are only what cannot be used to sign in:

* passwords as ``scrypt$N$r$p$salt$hash`` (random 16-byte salt, N=2**17 for new ones, compared in constant time;
  a hash keeps verifying with the parameters stored in it, and one cheaper than today's cost is replaced at the
  customer's next sign-in);
* sessions by the SHA-256 of their token (the token itself is only in the customer's cookie), each with its own
  CSRF token, an absolute expiry and an idle timeout.

A customer's schedule is the latest settings of each appliance; every change makes a new version of the whole
schedule (all of that customer's appliances), which is what the gateway gets as a :class:`Schedule`.

No e-mail address goes into a log: :meth:`Accounts.pseudonym` names a sign-in in the log by a keyed hash of the
address (its key is random and kept in the same file, so the name is stable across restarts but cannot be
reversed by hashing guessed addresses without that file).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mhp_wire.messages import ApplianceSchedule, Schedule, decode, encode
from mhp_wire.passwords import ScryptCost, hash_cost, hash_password, verify_password
from mhp_wire.sqlite import SqliteThread

SCHEMA = """
CREATE TABLE IF NOT EXISTS customer_accounts (
    client_id TEXT PRIMARY KEY, email TEXT NOT NULL UNIQUE COLLATE NOCASE, password_hash TEXT NOT NULL,
    created_at REAL NOT NULL, password_changed_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS customer_sessions (
    token_hash TEXT PRIMARY KEY, client_id TEXT NOT NULL, csrf_token TEXT NOT NULL, created_at REAL NOT NULL,
    last_seen REAL NOT NULL, expires_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS customer_sessions_client ON customer_sessions(client_id);
CREATE TABLE IF NOT EXISTS customer_login_failures (
    key TEXT PRIMARY KEY, failures INTEGER NOT NULL, first_at REAL NOT NULL, locked_until REAL NOT NULL);
CREATE TABLE IF NOT EXISTS customer_appliances (
    client_id TEXT NOT NULL, device TEXT NOT NULL, version INTEGER NOT NULL, settings TEXT NOT NULL,
    updated_at REAL NOT NULL, PRIMARY KEY (client_id, device));
CREATE TABLE IF NOT EXISTS customer_secrets (name TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS customer_schedules (
    client_id TEXT PRIMARY KEY, version INTEGER NOT NULL, msg_id TEXT NOT NULL, gateway_id TEXT NOT NULL,
    payload BLOB NOT NULL, created_at REAL NOT NULL, queued INTEGER NOT NULL DEFAULT 0);
"""

MIN_PASSWORD_CHARS = 10
MAX_PASSWORD_CHARS = 1024


class AccountError(ValueError):
    """An account cannot be created or changed as asked; ``str()`` says why."""


# -- passwords (pure): the scrypt helpers live in mhp_wire.passwords (the DSO console uses them too) -------


def check_password(password: str) -> str:
    """``password`` if it is acceptable as a new password, else :class:`AccountError`."""
    if len(password) < MIN_PASSWORD_CHARS:
        raise AccountError(f"a password needs at least {MIN_PASSWORD_CHARS} characters")
    if len(password) > MAX_PASSWORD_CHARS:
        raise AccountError(f"a password may have at most {MAX_PASSWORD_CHARS} characters")
    return password


def check_email(email: str) -> str:
    """``email`` stripped, if it looks like an e-mail address, else :class:`AccountError`."""
    email = email.strip()
    local, at, domain = email.rpartition("@")
    if not (at and local and "." in domain and len(email) <= 254) or any(c.isspace() for c in email):
        raise AccountError(f"{email!r} is not an e-mail address")
    return email


def token_hash(token: str) -> str:
    """What is stored of a session token."""
    return hashlib.sha256(token.encode()).hexdigest()


# -- login throttling (pure) ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ThrottlePolicy:
    """``max_failures`` failed sign-ins within ``window_s`` lock a key for ``lockout_s``."""

    max_failures: int
    window_s: float
    lockout_s: float


@dataclass(frozen=True, slots=True)
class FailureRecord:
    """Failed sign-ins counted for one key (an account's e-mail or a client address)."""

    failures: int
    first_at: float
    locked_until: float = 0.0


def locked_for(record: FailureRecord | None, now: float) -> float:
    """Seconds the key stays locked (0: not locked)."""
    return 0.0 if record is None else max(0.0, record.locked_until - now)


def after_failure(record: FailureRecord | None, now: float, policy: ThrottlePolicy) -> FailureRecord:
    """The record after one more failed sign-in at ``now``."""
    if record is None or now - record.first_at > policy.window_s or 0 < record.locked_until <= now:
        record = FailureRecord(0, now)
    failures = record.failures + 1
    locked_until = now + policy.lockout_s if failures >= policy.max_failures else record.locked_until
    return FailureRecord(failures, record.first_at, locked_until)


# -- what the personal area gets ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Session:
    """A signed-in customer."""

    client_id: str
    csrf_token: str
    expires_at: float


@dataclass(frozen=True, slots=True)
class LoginResult:
    """The answer to a sign-in: ``client_id`` when it succeeded, ``locked_for_s`` when throttled."""

    client_id: str | None = None
    locked_for_s: float = 0.0


@dataclass(frozen=True, slots=True)
class StoredSchedule:
    """A customer's latest schedule version and whether it went to the gateway's outbox."""

    version: int
    msg_id: str
    gateway_id: str
    created_at: float
    queued: bool
    schedule: Schedule


@dataclass(frozen=True, slots=True)
class StoredAppliance:
    """One appliance's latest settings and the schedule version in which they last changed."""

    settings: ApplianceSchedule
    version: int
    updated_at: float


class Accounts:
    """The personal area's accounts, sessions, throttling and schedules, in the bridge's SQLite file."""

    def __init__(self, path: Path | str, *, cost: ScryptCost = ScryptCost(), session_ttl_s: float = 12 * 3600,
                 idle_timeout_s: float = 3600, account_policy: ThrottlePolicy = ThrottlePolicy(5, 900, 300),
                 address_policy: ThrottlePolicy = ThrottlePolicy(30, 900, 300)) -> None:
        self.sql = SqliteThread(path, SCHEMA, name="bridge-accounts")
        self.cost = cost
        self.session_ttl_s = session_ttl_s
        self.idle_timeout_s = idle_timeout_s
        self.account_policy = account_policy
        self.address_policy = address_policy
        self._dummy_hash = ""
        self._log_key = b""

    async def open(self) -> None:
        """Open (and create) the tables."""
        await self.sql.open()
        self._dummy_hash = await self.sql.call(hash_password, secrets.token_urlsafe(16), self.cost)

        def log_key(db: sqlite3.Connection) -> bytes:
            db.execute("INSERT OR IGNORE INTO customer_secrets VALUES ('log_pseudonym_key', ?)",
                       (secrets.token_bytes(32),))
            return bytes(db.execute("SELECT value FROM customer_secrets WHERE name='log_pseudonym_key'").fetchone()[0])

        self._log_key = await self.sql.tx(log_key)

    def pseudonym(self, email: str) -> str:
        """How the log names a sign-in's e-mail address: ``acct-`` and a keyed hash (the same for any case)."""
        assert self._log_key, "the accounts are not open"
        digest = hmac.new(self._log_key, _account_key(email).encode(), hashlib.sha256).hexdigest()
        return "acct-" + digest[:12]

    async def close(self) -> None:
        """Close the database."""
        await self.sql.close()

    # -- accounts -------------------------------------------------------------------------------------------

    async def add(self, client_id: str, email: str, password: str) -> None:
        """Create the account of ``client_id``; :class:`AccountError` if it or the e-mail already has one."""
        email, password = check_email(email), check_password(password)
        hashed = await self.sql.call(hash_password, password, self.cost)
        now = time.time()

        def op(db: sqlite3.Connection) -> None:
            try:
                db.execute("INSERT INTO customer_accounts VALUES (?,?,?,?,?)", (client_id, email, hashed, now, now))
            except sqlite3.IntegrityError:
                raise AccountError(f"{client_id} or {email} already has an account") from None

        await self.sql.tx(op)

    async def set_password(self, client_id: str, password: str) -> None:
        """Change a password; the account's sessions end and its lock-out is lifted."""
        password = check_password(password)
        hashed = await self.sql.call(hash_password, password, self.cost)

        def op(db: sqlite3.Connection) -> None:
            row = db.execute("SELECT email FROM customer_accounts WHERE client_id=?", (client_id,)).fetchone()
            if row is None:
                raise AccountError(f"{client_id} has no account")
            db.execute("UPDATE customer_accounts SET password_hash=?, password_changed_at=? WHERE client_id=?",
                       (hashed, time.time(), client_id))
            db.execute("DELETE FROM customer_sessions WHERE client_id=?", (client_id,))
            db.execute("DELETE FROM customer_login_failures WHERE key=?", (_account_key(row[0]),))

        await self.sql.tx(op)

    async def account(self, client_id: str) -> dict[str, Any] | None:
        """An account's row (with its password hash), or None."""
        return await self.sql.read(lambda db: _row(db.execute(
            "SELECT * FROM customer_accounts WHERE client_id=?", (client_id,)).fetchone()))

    async def login(self, email: str, password: str, address: str) -> LoginResult:
        """Check a sign-in, throttled per account and per client address; never says which part was wrong."""
        return await self.sql.call(self._login, email.strip(), password, address, time.time())

    def _login(self, email: str, password: str, address: str, now: float) -> LoginResult:
        # Runs on the worker thread from start to end: sign-ins are checked one after the other.
        db = self.sql.db
        keys = ((_account_key(email), self.account_policy), ("address:" + address, self.address_policy))
        records = {key: _failure(db, key) for key, _ in keys}
        wait = max(locked_for(records[key], now) for key, _ in keys)
        if wait > 0:
            return LoginResult(locked_for_s=wait)
        row = db.execute("SELECT client_id, password_hash FROM customer_accounts WHERE email=?",
                         (email,)).fetchone() if len(password) <= MAX_PASSWORD_CHARS else None
        ok = verify_password(password[:MAX_PASSWORD_CHARS], row[1] if row else self._dummy_hash)
        if ok and row is not None:
            db.execute("DELETE FROM customer_login_failures WHERE key=?", (keys[0][0],))
            stored = hash_cost(row[1])
            if stored is not None and (stored.n, stored.r, stored.p) < (self.cost.n, self.cost.r, self.cost.p):
                db.execute("UPDATE customer_accounts SET password_hash=? WHERE client_id=?",
                           (hash_password(password, self.cost), row[0]))
            return LoginResult(client_id=row[0])
        updated = [(key, after_failure(records[key], now, policy)) for key, policy in keys]
        db.executemany("INSERT OR REPLACE INTO customer_login_failures VALUES (?,?,?,?)",
                       [(k, r.failures, r.first_at, r.locked_until) for k, r in updated])
        return LoginResult(locked_for_s=max(locked_for(r, now) for _, r in updated))

    # -- sessions -------------------------------------------------------------------------------------------

    async def new_session(self, client_id: str) -> tuple[str, Session]:
        """A fresh session (and its CSRF token); the token goes into the cookie, only its hash is kept."""
        token, csrf, now = secrets.token_urlsafe(32), secrets.token_urlsafe(32), time.time()
        session = Session(client_id, csrf, now + self.session_ttl_s)

        def op(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM customer_sessions WHERE expires_at<=? OR last_seen<=?",
                       (now, now - self.idle_timeout_s))
            db.execute("INSERT INTO customer_sessions VALUES (?,?,?,?,?,?)",
                       (token_hash(token), client_id, csrf, now, now, session.expires_at))

        await self.sql.tx(op)
        return token, session

    async def session(self, token: str) -> Session | None:
        """The live session of this cookie token (its idle timer restarts), or None."""
        now = time.time()

        def op(db: sqlite3.Connection) -> Session | None:
            cur = db.execute(
                "UPDATE customer_sessions SET last_seen=? WHERE token_hash=? AND expires_at>? AND last_seen>? "
                "RETURNING client_id, csrf_token, expires_at",
                (now, token_hash(token), now, now - self.idle_timeout_s))
            row = cur.fetchone()
            return Session(row[0], row[1], row[2]) if row else None

        return await self.sql.tx(op)

    async def end_session(self, token: str) -> None:
        """Sign out: the session is deleted."""
        await self.sql.tx(lambda db: db.execute("DELETE FROM customer_sessions WHERE token_hash=?",
                                                (token_hash(token),)))

    # -- schedules ------------------------------------------------------------------------------------------

    async def appliances(self, client_id: str) -> dict[str, StoredAppliance]:
        """The latest settings of each of this customer's scheduled appliances."""
        return await self.sql.read(lambda db: {r["device"]: StoredAppliance(
            ApplianceSchedule.model_validate_json(r["settings"]), r["version"], r["updated_at"])
            for r in db.execute("SELECT * FROM customer_appliances WHERE client_id=? ORDER BY device",
                                (client_id,))})

    async def latest(self, client_id: str) -> StoredSchedule | None:
        """This customer's latest schedule version, or None."""
        return await self.sql.read(lambda db: _stored(db.execute(
            "SELECT * FROM customer_schedules WHERE client_id=?", (client_id,)).fetchone()))

    async def save(self, client_id: str, gateway_id: str, appliance: ApplianceSchedule) -> Schedule:
        """Store an appliance's new settings as the next version of the customer's schedule; that schedule."""
        now = time.time()

        def op(db: sqlite3.Connection) -> Schedule:
            row = db.execute("SELECT version FROM customer_schedules WHERE client_id=?", (client_id,)).fetchone()
            version = (row[0] if row else 0) + 1
            db.execute("INSERT OR REPLACE INTO customer_appliances VALUES (?,?,?,?,?)",
                       (client_id, appliance.device, version, appliance.model_dump_json(), now))
            settings = [ApplianceSchedule.model_validate_json(r[0]) for r in db.execute(
                "SELECT settings FROM customer_appliances WHERE client_id=? ORDER BY device", (client_id,))]
            schedule = Schedule(client_id=client_id, version=version, appliances=settings)
            db.execute("INSERT OR REPLACE INTO customer_schedules VALUES (?,?,?,?,?,?,0)",
                       (client_id, version, schedule.msg_id, gateway_id, encode(schedule), now))
            return schedule

        return await self.sql.tx(op)

    async def mark_queued(self, client_id: str, version: int) -> None:
        """The schedule version is in the gateway's outbox (the relay re-sends it from there)."""
        await self.sql.tx(lambda db: db.execute(
            "UPDATE customer_schedules SET queued=1 WHERE client_id=? AND version=?", (client_id, version)))

    async def unqueued(self) -> list[StoredSchedule]:
        """Latest schedules that were stored but never reached the gateway's outbox (a crash in between)."""
        return await self.sql.read(lambda db: [s for s in (_stored(r) for r in db.execute(
            "SELECT * FROM customer_schedules WHERE queued=0")) if s is not None])


def _account_key(email: str) -> str:
    return "account:" + email.strip().lower()


def _row(row: sqlite3.Row | None) -> dict[str, Any] | None:
    return dict(row) if row else None


def _failure(db: sqlite3.Connection, key: str) -> FailureRecord | None:
    row = db.execute("SELECT failures, first_at, locked_until FROM customer_login_failures WHERE key=?",
                     (key,)).fetchone()
    return FailureRecord(row[0], row[1], row[2]) if row else None


def _stored(row: sqlite3.Row | None) -> StoredSchedule | None:
    if row is None:
        return None
    schedule = decode(row["payload"])
    assert isinstance(schedule, Schedule)
    return StoredSchedule(row["version"], row["msg_id"], row["gateway_id"], row["created_at"], bool(row["queued"]),
                          schedule)
