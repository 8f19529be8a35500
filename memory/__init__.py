"""The Memory service."""
