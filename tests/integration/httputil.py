"""Tiny blocking HTTP client for the integration tests (stdlib only)."""

from __future__ import annotations

import http.client
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def request(url: str, method: str = "GET", body: bytes | dict[str, Any] | None = None,
            headers: dict[str, str] | None = None, timeout: float = 20.0) -> Reply:
    """One request on a fresh connection; returns status, lower-cased headers, body."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    hdrs = {"content-type": "application/json", **(headers or {})}
    try:
        conn.request(method, parts.path or "/", body=data, headers=hdrs)
        resp = conn.getresponse()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


def post(url: str, body: bytes | dict[str, Any], headers: dict[str, str] | None = None
         ) -> Reply:
    return request(url, "POST", body, headers)


def metric_samples(port: int) -> dict[str, float]:
    """Every sample of a ``/metrics`` page on 127.0.0.1, by its name and labels as
    written (``name{label="value"}``)."""
    text = request(f"http://127.0.0.1:{port}/metrics").body.decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out
