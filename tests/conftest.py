"""Shared helpers. The fixtures `ssl_config` and `ssl_run` come from ssltrain's own pytest plugin
(`ssltrain.testing`, registered through the `pytest11` entry point), the same ones plugin authors use.

Tests marked `cuda` need a GPU: without `-m` they are deselected (counted as "deselected", never as
passed); `pytest -m cuda` selects them (tools/gpu_check.py runs them on a GPU node).
`SSLTRAIN_TEST_RESULTS=FILE` appends one JSON line per test outcome as soon as it is known, so that a
run cut short by a time limit still leaves the results of the tests that finished."""
from __future__ import annotations

import json
import os

import pytest

from ssltrain.tiny import TINY, tiny_config


def make_config(*overrides: str, **kwargs):
    """`tiny_config` with the `dotted.key=value` overrides given positionally (the suite's short form)."""
    return tiny_config(overrides=overrides, **kwargs)


__all__ = ["TINY", "make_config"]


def pytest_collection_modifyitems(config, items):
    if config.option.markexpr:
        return
    cuda = [item for item in items if item.get_closest_marker("cuda")]
    if cuda:
        config.hook.pytest_deselected(items=cuda)
        items[:] = [item for item in items if not item.get_closest_marker("cuda")]


def _record(entry: dict) -> None:
    path = os.environ.get("SSLTRAIN_TEST_RESULTS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(entry) + "\n")


def pytest_collection_finish(session):
    _record({"collected": [item.nodeid for item in session.items]})


@pytest.hookimpl(trylast=True)
def pytest_runtest_logreport(report):
    if report.when == "call" or report.outcome != "passed":  # setup/teardown only when they fail or skip
        message = ""
        if report.skipped and isinstance(report.longrepr, tuple):
            message = report.longrepr[2]
        elif report.failed:
            crash = getattr(report.longrepr, "reprcrash", None)
            message = crash.message if crash is not None else str(report.longrepr).strip()[-300:]
        _record({"test": report.nodeid, "when": report.when, "outcome": report.outcome,
                 "seconds": round(report.duration, 3), "message": message[:300]})
