"""The wire contract shared by every component: topic tree, message models, version, and the MQTT adapter."""

from mhp_wire.messages import WIRE_VERSION

__all__ = ["WIRE_VERSION"]
