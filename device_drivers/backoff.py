"""The back-off policy of failing devices: :class:`mhp_wire.backoff.Backoff` (one mechanism, one place; the hub's
webhook deliveries use the same one)."""

from mhp_wire.backoff import Backoff

__all__ = ["Backoff"]
