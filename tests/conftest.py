"""Shared pytest fixtures (each area adds its import here)."""

from tests.ls_server import ls_server  # noqa: F401
