"""Fixtures of the task tests."""

from __future__ import annotations

import pytest

import worker.settings as settings_module


@pytest.fixture(autouse=True)
def _settings_restored(monkeypatch) -> None:
    """Tests install their own settings; the ones installed before (a session fixture's)
    are back afterwards."""
    monkeypatch.setattr(settings_module, "_current", settings_module._current)
