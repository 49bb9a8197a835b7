"""Pins every private Prefect name the worker relies on (worker/prefect_private.py): after a
Prefect upgrade that renames or reshapes one, this fails here, in one place, and the worker
keeps running with the stock behaviour instead."""

from __future__ import annotations

import inspect

from worker import prefect_private


def test_every_private_name_still_exists_with_its_signature() -> None:
    """Each pinned name exists on Prefect 3.8.8's BaseWorker with the expected parameters."""
    for name, parameters in prefect_private.EXPECTED.items():
        assert prefect_private.signature_of(name) == parameters, name
        assert prefect_private.available(name)


def test_base_worker_still_calls_the_labels_step_before_starting_a_run() -> None:
    """The override only helps while BaseWorker calls that step on the way to run(): if a
    release moves it, the saving is gone and this says so."""
    from prefect.workers.base import BaseWorker

    source = inspect.getsource(BaseWorker)
    assert f"await self.{prefect_private.LABELS_METHOD}(flow_run.id)" in source


def test_a_missing_name_falls_back_to_the_stock_behaviour(monkeypatch) -> None:
    """A name Prefect no longer has is reported unavailable (the worker then does not
    override it) rather than raising."""
    monkeypatch.setitem(prefect_private.EXPECTED, "_gone_in_a_future_release", ["self"])
    assert prefect_private.signature_of("_gone_in_a_future_release") is None
    assert not prefect_private.available("_gone_in_a_future_release")
