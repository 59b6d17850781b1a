"""The OpenADR 3.1 VTN's answers as response models, named after the spec's objects, so that the OpenAPI
description shows every answer of ``/openadr3/3.1.0``.

The routes build these answers as plain JSON objects (``cloud_hub.openadr3.mapping``, the stored reports and
subscriptions) and the models must pass every one on UNCHANGED, byte for byte (the VENs, toadr3 among them, parse
them): the spec's main fields are typed at the JSON level (a date-time or a duration stays the string it was,
numbers are not coerced), every other field is allowed (``extra="allow"``), the routes leave out the fields an
answer did not have (``response_model_exclude_unset``), and :class:`OadrObject` answers the fields in the order
they were given, not in the order the model names them.
"""

from __future__ import annotations

from typing import Any, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    ModelWrapValidatorHandler,
    PrivateAttr,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)


class OadrObject(BaseModel):
    """An OpenADR object whose named fields are the spec's; any other field is passed on as it is, and all of
    them in the order the answer gave them."""

    model_config = ConfigDict(extra="allow")
    _order: tuple[str, ...] = PrivateAttr(default=())

    @model_validator(mode="wrap")
    @classmethod
    def _remember_order(cls, data: Any, handler: ModelWrapValidatorHandler[Self]) -> Self:
        obj = handler(data)
        if isinstance(data, dict):
            obj._order = tuple(data)
        return obj

    # No return annotation on purpose: with one, pydantic would describe the answer by it (a bare object) in the
    # OpenAPI description instead of by the model's fields.
    @model_serializer(mode="wrap")
    def _in_given_order(self, handler: SerializerFunctionWrapHandler):
        out = handler(self)
        if not self._order or not isinstance(out, dict):
            return out
        return {**{k: out[k] for k in self._order if k in out}, **out}


# -- the parts objects are made of ------------------------------------------------------------------------------

class ValuesMap(OadrObject):
    """A ``type`` and its ``values`` (targets, attributes, payloads)."""

    type: str
    values: list[Any]


class IntervalPeriod(OadrObject):
    """When: ``start`` (RFC 3339) and ``duration`` (ISO 8601), both as given."""

    start: str | None = None
    duration: str | None = None


class Interval(OadrObject):
    """One interval of an event: its ``id``, an optional own period and its payloads."""

    id: int
    intervalPeriod: IntervalPeriod | None = None
    payloads: list[ValuesMap]


class EventPayloadDescriptor(OadrObject):
    """What an event's (or a program's) payloads of one type mean."""

    objectType: str | None = None
    payloadType: str
    units: str | None = None
    currency: str | None = None


class ReportDescriptor(OadrObject):
    """A report an event asks for."""

    payloadType: str
    readingType: str | None = None
    units: str | None = None


class ObjectOperation(OadrObject):
    """A subscription's callback: the objects and operations it is called for."""

    callbackUrl: str
    objects: list[str]
    operations: list[str]
    bearerToken: str | None = None


# -- the objects --------------------------------------------------------------------------------------------

class Program(OadrObject):
    """A program: the tariff calendar (PRICE) or one kind of the hub's flexibility requests."""

    id: str
    objectType: str
    createdDateTime: str | None = None
    modificationDateTime: str | None = None
    programName: str
    programLongName: str | None = None
    programType: str | None = None
    bindingEvents: bool | None = None
    payloadDescriptors: list[EventPayloadDescriptor] | None = None


class Event(OadrObject):
    """An event: one hub request (its ``id`` is the request id) or the network tariff."""

    id: str
    objectType: str
    programID: str
    createdDateTime: str | None = None
    modificationDateTime: str | None = None
    eventName: str | None = None
    priority: int | None = None
    # OpenADR 3.0's {type, values} (at /openadr3/3.0.1) or 3.1's strings (at /openadr3/3.1.0).
    targets: list[ValuesMap] | list[str] | None = None
    payloadDescriptors: list[EventPayloadDescriptor] | None = None
    reportDescriptors: list[ReportDescriptor] | None = None
    intervalPeriod: IntervalPeriod | None = None
    intervals: list[Interval]


class Ven(OadrObject):
    """A VEN: a retailer (or aggregator), named by its retailer id."""

    id: str
    objectType: str
    venName: str
    clientID: str | None = None
    createdDateTime: str | None = None
    modificationDateTime: str | None = None
    attributes: list[dict[str, Any]] | None = None


class Resource(OadrObject):
    """A resource of a VEN: a client it supplies now."""

    id: str
    objectType: str
    resourceName: str
    venID: str
    attributes: list[ValuesMap] | None = None


class Report(OadrObject):
    """A VEN's report on one event, as stored (its resources as the VEN sent them)."""

    id: str
    objectType: str
    createdDateTime: str | None = None
    modificationDateTime: str | None = None
    programID: str
    eventID: str
    clientName: str
    clientID: str | None = None
    reportName: str | None = None
    resources: list[dict[str, Any]]


class Subscription(OadrObject):
    """A VEN's webhook subscription to its objects' changes."""

    id: str
    objectType: str
    createdDateTime: str | None = None
    modificationDateTime: str | None = None
    clientName: str
    programID: str | None = None
    objectOperations: list[ObjectOperation]
    targets: list[dict[str, Any]] | list[str] | None = None


class MqttNotifier(OadrObject):
    """The MQTT notifier: the hub broker's URIs, how messages are serialized and how a VEN logs in."""

    URIS: list[str]
    serialization: str
    authentication: dict[str, Any] | None = None


class Notifiers(OadrObject):
    """The notifiers this VTN supports."""

    WEBHOOK: bool
    MQTT: MqttNotifier | None = None


class NotifierTopics(OadrObject):
    """The MQTT topics of one object kind, by operation (``CREATE``, ``UPDATE``, ``DELETE``, ``ALL``)."""

    topics: dict[str, str]


class AuthServerInfo(OadrObject):
    """Where to get a token."""

    tokenURL: str


class ClientCredentialResponse(OadrObject):
    """The answer of a client-credentials token request (RFC 6749 5.1)."""

    access_token: str
    token_type: str
    expires_in: int | None = None
    scope: str | None = None


class OAuthError(OadrObject):
    """An error of the token endpoint (RFC 6749 5.2): ``error`` and ``error_description``."""

    error: str
    error_description: str | None = None
