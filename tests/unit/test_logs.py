"""Secrets never reach a log line."""

from __future__ import annotations

import io
import json
import sys

from controlplane import logs


def test_passwords_in_urls_and_secret_fields_are_masked(monkeypatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    logs.configure("INFO", "json")
    logs.get_logger("t").info("connecting", url="amqp://guest:hunter2@broker:5672/vh", api_key="k-123",
                              authorization="Bearer k-123", note="plain")
    line = json.loads(out.getvalue().strip().splitlines()[-1])
    assert "hunter2" not in out.getvalue() and "k-123" not in out.getvalue()
    assert line["url"] == "amqp://guest:***@broker:5672/vh"
    assert line["api_key"] == "***" and line["authorization"] == "***" and line["note"] == "plain"
