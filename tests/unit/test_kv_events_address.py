"""The endpoints file's ``kvEvents`` address is checked when the file is read: a mistype
fails with the field named instead of silently ending that endpoint's subscriber."""

from __future__ import annotations

import pytest

from epp.discovery.static import EndpointsFileError, parse_endpoints


def endpoints_file(kv_events: str) -> str:
    return ("endpoints:\n  - name: vllm-0\n    address: 10.0.0.5:8000\n"
            f"    kvEvents: '{kv_events}'\n")


@pytest.mark.parametrize("address", [
    "tcp://10.0.0.5:5557",
    "tcp://[fd00::1]:5557",
    "tcp://*:5556",  # vLLM's own bind-all value, copied from its config
    "tcp://0.0.0.0:5557",
    "tcp://[::]:5557",
    "tcp://vllm-0.vllm.default.svc.cluster.local:5557",
    "tcp://localhost:1",
    "tcp://engine:65535",
])
def test_publisher_addresses_zmq_can_connect_to_are_accepted(address: str) -> None:
    (endpoint,) = parse_endpoints(endpoints_file(address))
    assert endpoint.kv_events == address


@pytest.mark.parametrize(("address", "problem"), [
    ("10.0.0.5:5557", "tcp://"),  # no scheme
    ("tcp//10.0.0.5:5557", "tcp://"),
    ("ipc:///tmp/kv", "tcp://"),
    ("tcp://10.0.0.5", "host and port"),
    ("tcp://:5557", "host and port"),
    ("tcp://10.0.0.5:55S7", "port '55S7'"),  # ZMQ would connect to port 55
    ("tcp://10.0.0.5:99999", "port '99999'"),  # ZMQ would accept it
    ("tcp://10.0.0.5:0", "port '0'"),
    ("tcp://10.0.0.5:", "port ''"),
    ("tcp://10.0.0.5:５５５７", "port"),  # full-width digits
    ("tcp://10.0.0.300:5557", "host '10.0.0.300'"),
    ("tcp://fd00::1:5557", "host 'fd00::1'"),  # IPv6 without brackets
    ("tcp://[fd00::zz]:5557", "host '[fd00::zz]'"),
    ("tcp://bad host:5557", "host 'bad host'"),
    ("tcp://-engine:5557", "host '-engine'"),
    ("tcp://engine..local:5557", "host 'engine..local'"),
])
def test_mistyped_publisher_addresses_name_the_field(address: str, problem: str) -> None:
    with pytest.raises(EndpointsFileError) as raised:
        parse_endpoints(endpoints_file(address))
    message = str(raised.value)
    assert "endpoints[0].kvEvents" in message and problem in message


def test_a_non_string_kv_events_names_the_field() -> None:
    text = "endpoints:\n  - address: 10.0.0.5:8000\n    kvEvents: 5557\n"
    with pytest.raises(EndpointsFileError, match=r"endpoints\[0\]\.kvEvents: .*got int"):
        parse_endpoints(text)
