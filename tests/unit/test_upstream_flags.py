"""The upstream (llm-d-router) picker's flags and environment: the chart's arguments run
unchanged, Go syntax for booleans, durations and sizes, namespace resolution, and one
log line per flag that has no effect here."""

from __future__ import annotations

import argparse
import logging

import pytest

from epp import cli
from epp.config import ConfigError, EppSettings
from epp.config.goflags import parse_byte_size, parse_go_bool, parse_go_duration
from epp.datalayer import VLLM_METRICS, MetricSpec

# What the llm-d-router chart renders for one replica with tracing and metrics auth off
# (config/charts/routerlib/templates/_deployment.yaml), plus flags from router.epp.flags,
# which it renders as --key=value.
CHART_ARGS = [
    "--pool-name", "llm-pool", "--pool-namespace", "inference",
    "--pool-group", "inference.networking.k8s.io",
    "--zap-encoder", "json", "--config-file", "/config/default-plugins.yaml",
    "--ha-enable-leader-election", "--grpc-health-port", "9003",
    "--drain-timeout=45s", "--refresh-metrics-interval=50ms",
    "--metrics-staleness-threshold=2s", "--grpc-max-recv-msg-size=10MiB", "--v=4",
    "--emit-endpoint-scores=true", "--health-checking=false",
    "--tracing=false", "--metrics-endpoint-auth=false",
]


def settings(args: list[str], env: dict[str, str] | None = None,
             monkeypatch: pytest.MonkeyPatch | None = None) -> EppSettings:
    if monkeypatch is not None:
        for key in ("NAMESPACE", "POD_NAMESPACE", "KUBERNETES_SERVICE_HOST"):
            monkeypatch.delenv(key, raising=False)
        for key, value in (env or {}).items():
            monkeypatch.setenv(key, value)
    return cli.settings_from_args(cli.parse_args(args))


def test_the_charts_arguments_parse_into_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    s = settings(CHART_ARGS, monkeypatch=monkeypatch)
    args = cli.parse_args(CHART_ARGS)
    assert (s.pool_name, s.pool_namespace, s.pool_group) == (
        "llm-pool", "inference", "inference.networking.k8s.io")
    assert s.config_file == "/config/default-plugins.yaml" and s.health_port == 9003
    assert s.drain_timeout_s == 45.0
    assert s.metrics_scrape_interval_s == pytest.approx(0.05)
    assert s.metrics_stale_after_s == 2.0
    assert s.grpc_max_recv_msg_bytes == 10 * 2**20
    assert s.emit_endpoint_scores is True and s.tracing is False
    assert s.metrics_endpoint_auth is False
    assert s.engine_metrics == VLLM_METRICS
    assert cli.log_encoder_from_args(args) == "json"
    assert cli.log_level_from_args(args) == logging.DEBUG
    assert args.ha_enable_leader_election is True


@pytest.mark.parametrize(("given", "expected"), [
    ([], False), (["--tracing"], True), (["--tracing=true"], True), (["--tracing=false"], False),
    (["--tracing=1"], True), (["--tracing=F"], False), (["--tracing", "true"], True),
])
def test_go_booleans(given: list[str], expected: bool) -> None:
    assert cli.parse_args(["--endpoints-file", "x", *given]).tracing is expected


def test_a_bad_boolean_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.parse_args(["--tracing=yes"])
    assert info.value.code == 2
    assert "invalid boolean 'yes'" in capsys.readouterr().err


@pytest.mark.parametrize(("text", "seconds"), [
    ("30s", 30.0), ("50ms", 0.05), ("1m30s", 90.0), ("1h", 3600.0), ("1.5s", 1.5),
    ("250us", 250e-6), ("250\u00b5s", 250e-6), ("10ns", 1e-8), ("-2s", -2.0), ("0", 0.0),
    ("0.5", 0.5), ("2", 2.0),  # bare numbers: seconds, as this picker's flags took before
])
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "s", "30x", "1m30", "ms", "3 s", "1d", "--1s"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_go_duration(text)


def test_go_bool_spellings() -> None:
    assert [parse_go_bool(t) for t in ("1", "t", "T", "TRUE", "true", "True")] == [True] * 6
    assert [parse_go_bool(t) for t in ("0", "f", "F", "FALSE", "false", "False")] == [False] * 6
    with pytest.raises(ValueError):
        parse_go_bool("yes")


@pytest.mark.parametrize(("text", "size"), [
    ("10MiB", 10 * 2**20), ("25MB", 25 * 10**6), ("4194304", 4194304), ("1Gi", 2**30),
    ("512k", 512_000), ("1.5Mi", 3 * 2**19),
])
def test_byte_sizes(text: str, size: int) -> None:
    assert parse_byte_size(text) == size


@pytest.mark.parametrize("text", ["", "ten", "10XB", "-1", "1.5"])
def test_bad_byte_sizes(text: str) -> None:
    with pytest.raises(ValueError):
        parse_byte_size(text)


@pytest.mark.parametrize(("flag", "env", "expected"), [
    (["--pool-namespace", "flag-ns"], {"NAMESPACE": "a", "POD_NAMESPACE": "b"}, "flag-ns"),
    ([], {"NAMESPACE": "a", "POD_NAMESPACE": "b"}, "a"),
    ([], {"POD_NAMESPACE": "b"}, "b"),
    ([], {}, "default"),
])
def test_pool_namespace_resolution(flag: list[str], env: dict[str, str], expected: str,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    s = settings(["--pool-name", "p", *flag], env, monkeypatch)
    assert s.pool_namespace == expected


@pytest.mark.parametrize(("args", "env", "expected"), [
    (["--pool-name", "p"], {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}, True),  # upstream default
    (["--pool-name", "p", "--metrics-endpoint-auth=false"],
     {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}, False),
    (["--pool-name", "p"], {}, False),  # outside a pod: no service account to ask with
    (["--endpoints-file", "e.yaml"], {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}, False),
    (["--endpoints-file", "e.yaml", "--metrics-endpoint-auth"], {}, True),
])
def test_metrics_endpoint_auth_default(args: list[str], env: dict[str, str], expected: bool,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    assert settings(args, env, monkeypatch).metrics_endpoint_auth is expected


def test_only_the_inferencepool_group_is_accepted() -> None:
    with pytest.raises(ConfigError, match="--pool-group"):
        settings(["--pool-name", "p", "--pool-group", "inference.networking.x-k8s.io"])


def test_metric_flags_reach_the_settings() -> None:
    s = settings(["--endpoints-file", "e.yaml",
                  "--total-queued-requests-metric", "sglang:num_queue_reqs",
                  "--total-running-requests-metric", "sglang:num_running_reqs",
                  "--kv-cache-usage-percentage-metric", "sglang:token_usage{model_name=m}",
                  "--lora-info-metric=", "--cache-info-metric="])
    assert s.engine_metrics.waiting == MetricSpec(b"sglang:num_queue_reqs")
    assert s.engine_metrics.kv_cache_usage == MetricSpec(b"sglang:token_usage",
                                                         (("model_name", "m"),))
    assert s.engine_metrics.lora_info is None and s.engine_metrics.cache_info is None
    with pytest.raises(ConfigError, match="metric"):
        settings(["--endpoints-file", "e.yaml", "--total-queued-requests-metric", "q{a}"])


@pytest.mark.parametrize(("args", "level"), [
    ([], logging.INFO), (["-v", "2"], logging.INFO), (["-v", "3"], logging.DEBUG),
    (["-v5"], logging.DEBUG), (["--v=1"], logging.INFO), (["-v=4"], logging.DEBUG),
    (["--zap-log-level", "error"], logging.ERROR), (["--zap-log-level", "4"], logging.DEBUG),
    (["-v", "4", "--log-level", "WARNING"], logging.WARNING),
])
def test_verbosity_maps_to_log_levels(args: list[str], level: int) -> None:
    assert cli.log_level_from_args(cli.parse_args(args)) == level


def test_a_bad_zap_log_level_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="zap-log-level"):
        cli.log_level_from_args(cli.parse_args(["--zap-log-level", "loud"]))


@pytest.mark.parametrize(("args", "encoder"), [
    ([], "console"), (["--zap-encoder", "json"], "json"), (["--zap-encoder=console"], "console"),
    (["--zap-devel=false"], "json"), (["--zap-devel=false", "--zap-encoder=console"], "console"),
])
def test_log_encoder(args: list[str], encoder: str) -> None:
    assert cli.log_encoder_from_args(cli.parse_args(args)) == encoder


def test_each_ignored_flag_gets_one_line_saying_why() -> None:
    args = cli.parse_args(["--ha-enable-leader-election", "--health-checking=true",
                           "--enable-pprof=false", "--tracing=true",
                           "--refresh-prometheus-metrics-interval=5s",
                           "--grpc-max-send-msg-size=10MiB", "--zap-time-encoding=epoch"])
    lines = cli.ignored_flags(args)
    # --enable-pprof=false asks for nothing; --tracing is implemented.
    assert len(lines) == 5, lines
    assert any(line.startswith("--ha-enable-leader-election=true accepted and ignored: "
                               "replicas here are active-active") for line in lines)
    assert not any("tracing" in line for line in lines)
    assert cli.ignored_flags(cli.parse_args([])) == []


def test_every_upstream_flag_the_chart_can_pass_is_accepted() -> None:
    """The flags named in llm-d-router's options.go that this picker takes (TLS flags are
    covered with the TLS settings)."""
    flags = ["--pool-group=g", "--pool-name=p", "--pool-namespace=n", "--grpc-port=1",
             "--grpc-health-port=2", "--metrics-port=3", "--config-file=f",
             "--ha-enable-leader-election=true", "--drain-timeout=1s", "--tracing=false",
             "--health-checking=true", "--metrics-endpoint-auth=false",
             "--metrics-staleness-threshold=1s", "--refresh-metrics-interval=50ms",
             "--total-queued-requests-metric=a", "--total-running-requests-metric=b",
             "--kv-cache-usage-percentage-metric=c", "--lora-info-metric=d",
             "--cache-info-metric=e", "--grpc-max-recv-msg-size=1Mi",
             "--emit-endpoint-scores=true", "--zap-encoder=json", "-v=3",
             "--endpoint-selector=app=x", "--endpoint-target-ports=8000",
             "--refresh-prometheus-metrics-interval=5s", "--enable-pprof=true",
             "--grpc-max-send-msg-size=1Mi", "--allow-experimental-plugins=true",
             "--zap-log-level=info", "--zap-devel=true", "--zap-stacktrace-level=error",
             "--zap-time-encoding=iso8601"]
    assert isinstance(cli.parse_args(flags), argparse.Namespace)
