"""Routes own HTTP: every route of the running hub declares a response model for every answer it gives, and the
domain errors (``cloud_hub.errors``) carry the status and code each is answered with."""

from __future__ import annotations

from typing import Any

import pytest

from cloud_hub.errors import (
    Conflict,
    Forbidden,
    HubError,
    IdempotencyConflict,
    InvalidBody,
    KeyInProgress,
    NotFound,
    OwnerUnavailable,
    RateLimited,
    StoreUnavailable,
)
from tests.hub_fixtures import IN_FORCE_SINCE, HubHandle, hub

__all__ = ["hub"]

BODILESS = {"204"}
"""Statuses answered without a body."""
ERRORS_OF_EVERY_API_ROUTE = {"401", "422", "429", "503"}
"""Every ``/v1`` route checks a token (401), validates its input (422), rate-limits the principal (429) and may
find storage unavailable (503)."""


def _refs(schema: dict[str, Any]) -> list[str]:
    """The component schemas ``schema`` names, directly, as one of its alternatives or as the items of a list."""
    found = [schema["$ref"]] if "$ref" in schema else []
    if schema.get("type") == "array":
        found += _refs(schema.get("items", {}))
    for alternative in schema.get("anyOf", []) + schema.get("allOf", []) + schema.get("oneOf", []):
        found += _refs(alternative)
    return found


def _problems(spec: dict[str, Any]) -> list[str]:
    problems = []
    schemas = spec["components"]["schemas"]
    for path, operations in spec["paths"].items():
        for method, op in operations.items():
            answers = op.get("responses", {})
            if not any(s.startswith("2") for s in answers):
                problems.append(f"{method.upper()} {path}: no success answer declared")
            if path.startswith("/v1/") and not ERRORS_OF_EVERY_API_ROUTE <= set(answers):
                problems.append(f"{method.upper()} {path}: errors {sorted(ERRORS_OF_EVERY_API_ROUTE - set(answers))}"
                                " not declared")
            for status, answer in answers.items():
                where = f"{method.upper()} {path} {status}"
                content = answer.get("content", {})
                if status in BODILESS:
                    if content:
                        problems.append(f"{where}: declares a body")
                    continue
                if not content:
                    problems.append(f"{where}: no body declared")
                for media, body in content.items():
                    schema = body.get("schema", {})
                    if media == "application/json":
                        refs = _refs(schema)
                        if not refs:
                            problems.append(f"{where}: no response model ({schema})")
                        for ref in refs:
                            if ref.rsplit("/", 1)[-1] not in schemas:
                                problems.append(f"{where}: {ref} is not described")
                    elif schema.get("type") != "string":
                        problems.append(f"{where}: {media} without a schema")
    return problems


async def test_every_route_declares_a_response_model_for_every_status(hub: HubHandle) -> None:
    spec = (await hub.http.get("/openapi.json")).json()
    assert len(spec["paths"]) >= 20, sorted(spec["paths"])
    assert _problems(spec) == []
    errors = spec["components"]["schemas"]["ErrorBody"]["properties"]
    assert {"error", "message", "problems", "retry_after_s"} <= set(errors)
    invalid = spec["paths"]["/v1/emergencies"]["post"]["responses"]["422"]["content"]["application/json"]
    assert _refs(invalid["schema"]) == ["#/components/schemas/ErrorBody"], "422 is our body, not FastAPI's"


async def test_the_declared_models_pass_answers_on_unchanged(hub: HubHandle) -> None:
    """An answer that goes through its response model keeps fields the model does not name, and its numbers."""
    await hub.setup_registry({"c1": "r1"})
    client = await hub.http.get("/v1/clients/c1", headers=hub.auth("dso"))
    assert client.status_code == 200, client.text
    # The registry fixture's valid_from (tests/hub_fixtures.py): a start of supply in the past, it cannot expire.
    assert client.json() == {"client_id": "c1", "retailer_id": "r1", "contracted_power_kw": 6.9, "feeder_id": "f1",
                             "suppliers": [{"retailer_id": "r1", "valid_from": IN_FORCE_SINCE}]}
    r = await hub.http.put("/v1/clients/c2", headers=hub.auth("dso"), json={"retailer_id": "r2",
                                                                          "contracted_power_kw": 3})
    assert r.status_code == 201, r.text
    assert set(r.json()) == {"client_id", "retailer_id", "contracted_power_kw", "feeder_id", "suppliers",
                             "customer_change_request_id"}


@pytest.mark.parametrize(("error", "status", "code", "retry_header"), [
    (Forbidden("no"), 403, "forbidden", None),
    (NotFound("no"), 404, "not_found", None),
    (Conflict("no"), 409, "conflict", None),
    (IdempotencyConflict("no"), 409, "conflict", None),
    (KeyInProgress("wait"), 409, "in_progress", "1"),
    (InvalidBody([{"field": "start", "message": "bad"}]), 422, "invalid", None),
    (RateLimited("dso", 2.5), 429, "rate_limited", "3"),
    (OwnerUnavailable("later"), 503, "owner_unavailable", "1"),
    (StoreUnavailable("disk full"), 503, "storage_unavailable", None),
])
def test_each_error_carries_its_status_code_and_retry(error: HubError, status: int, code: str,
                                                      retry_header: str | None) -> None:
    assert (error.status, error.code) == (status, code)
    assert error.body()["error"] == code
    assert error.headers().get("Retry-After") == retry_header
    if retry_header is not None:
        assert error.body()["retry_after_s"] == error.wait_s()


def test_storage_errors_keep_their_cause_out_of_the_answer() -> None:
    body = StoreUnavailable("/var/lib/hub.db is locked").body()
    assert body == {"error": "storage_unavailable",
                    "message": "storage is unavailable; nothing was stored, retry later", "retry_after_s": 1}


def test_invalid_bodies_list_their_problems() -> None:
    body = InvalidBody([{"field": "", "message": "give client_ids"}]).body()
    assert body == {"error": "invalid", "message": "invalid request: body: give client_ids",
                    "problems": [{"field": "", "message": "give client_ids"}]}


@pytest.mark.parametrize(("code", "expected"), [
    ("forbidden", Forbidden), ("not_found", NotFound), ("conflict", Conflict), ("in_progress", KeyInProgress),
    ("owner_unavailable", OwnerUnavailable), ("storage_unavailable", StoreUnavailable),
    ("invalid", OwnerUnavailable),  # carries problems it cannot rebuild from a code: the owner is unavailable
    ("no-such-code", OwnerUnavailable), ("", OwnerUnavailable),
])
def test_an_error_another_replica_answered_is_rebuilt_from_its_code(code: str, expected: type[HubError]) -> None:
    error = HubError.from_code(code, "as the owner said")
    assert type(error) is expected
    assert str(error) == "as the owner said"
