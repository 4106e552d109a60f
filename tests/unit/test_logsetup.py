"""Log formats (``--zap-encoder``) and the request id on request-scoped lines."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import uuid
from collections.abc import Iterator, Sequence

import pytest

from epp.api.openai import LLMRequest
from epp.datastore import Endpoint, EndpointPool
from epp.kvcache.match import PrefixMatch
from epp.observability.logsetup import (
    ConsoleFormatter,
    JsonFormatter,
    RequestIdFilter,
    configure_logging,
)
from epp.observability.metrics import EppMetrics
from epp.requestcontrol.director import Director
from tests.unit.test_extproc_stream import FirstN, admission

BODY = json.dumps({"model": "m", "prompt": "hello"}).encode()


class FailingProducer:
    """A prefix producer that always fails: the director logs a warning inside route()."""

    name = "broken-producer"

    async def produce(self, request: LLMRequest | None,
                      candidates: Sequence[Endpoint]) -> PrefixMatch | None:
        logging.getLogger("epp.kvcache.fake").info("tokenizing")  # a line from below
        raise RuntimeError("tokenizer is gone")


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """Everything the ``epp`` loggers write, as JSON lines, through the real handler setup."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdFilter())
    logger = logging.getLogger("epp")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield out
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def records(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


@pytest.mark.asyncio
async def test_every_line_logged_while_routing_carries_the_request_id(
        json_lines: io.StringIO) -> None:
    pool = EndpointPool()
    pool.upsert(Endpoint("e", "10.0.0.1:8000"))
    director = Director(pool, FirstN(1), admission(), EppMetrics(),
                        producers=[FailingProducer()])
    given = {":path": "/v1/completions", "x-request-id": "req-42"}
    missing = {":path": "/v1/completions"}
    # Each request is routed in its own task, as both transports do.
    await asyncio.create_task(director.route(given, BODY, None))
    await asyncio.create_task(director.route(missing, BODY, None))
    logging.getLogger("epp.elsewhere").info("not in a request")
    lines = records(json_lines)
    first = [r for r in lines if r.get("request_id") == "req-42"]
    assert {r["logger"] for r in first} == {"epp.kvcache.fake", "epp.requestcontrol.director"}
    failure = next(r for r in first if r["logger"] == "epp.requestcontrol.director")
    assert failure["level"] == "warning" and "tokenizer is gone" in str(failure["msg"])
    assert "RuntimeError" in str(failure["error"])  # the traceback rides along
    second = [r for r in lines if r["msg"] == "tokenizing"][1]
    generated = str(second["request_id"])
    assert uuid.UUID(generated).version == 4
    outside = lines[-1]
    assert outside["msg"] == "not in a request" and "request_id" not in outside


def test_json_lines_have_the_zap_fields_and_extras(json_lines: io.StringIO) -> None:
    logging.getLogger("epp.test").warning("pool %s changed", "p", extra={"endpoints": 3})
    (line,) = json_lines.getvalue().splitlines()
    record = json.loads(line)
    assert list(record)[:4] == ["ts", "level", "logger", "msg"]
    assert record["msg"] == "pool p changed" and record["endpoints"] == 3
    assert record["level"] == "warning" and str(record["ts"]).endswith("Z")


def test_console_lines_stay_readable_and_name_the_request() -> None:
    record = logging.LogRecord("epp.x", logging.INFO, __file__, 1, "routed %s", ("a",), None)
    record.request_id = "req-7"
    text = ConsoleFormatter().format(record)
    assert text.endswith("INFO epp.x: routed a request_id=req-7")
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_configure_logging_installs_one_handler_at_the_level() -> None:
    root, epp_logger = logging.getLogger(), logging.getLogger("epp")
    saved = (list(root.handlers), root.level, epp_logger.level)
    out = io.StringIO()
    try:
        configure_logging("json", logging.WARNING, out)
        logging.getLogger("epp.t").info("hidden")
        logging.getLogger("epp.t").warning("shown")
        assert [json.loads(x)["msg"] for x in out.getvalue().splitlines()] == ["shown"]
        # -v above the default: the picker's DEBUG lines, not every library's.
        configure_logging("json", logging.DEBUG, out)
        logging.getLogger("epp.t").debug("ours")
        logging.getLogger("hpack.hpack").debug("a frame")
        logging.getLogger("hpack.hpack").info("a notice")
        assert [json.loads(x)["msg"] for x in out.getvalue().splitlines()][1:] == [
            "ours", "a notice"]
        with pytest.raises(ValueError, match="encoder"):
            configure_logging("xml", logging.INFO, out)
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
        epp_logger.setLevel(saved[2])
