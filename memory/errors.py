"""The service's own failures, each answered with one HTTP status by the app."""

from __future__ import annotations


class InvalidInput(ValueError):
    """A request that breaks a boundary rule (422); the message names the field and the rule."""


class NotFound(LookupError):
    """An unknown collection (404)."""


class Conflict(RuntimeError):
    """A request that is well formed but clashes with the stored state (409)."""


class InsufficientStorage(Exception):
    """A collection that would take the service beyond its memory budget (507)."""
