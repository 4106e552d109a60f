"""The comparison benchmark's command line (routers, --epp-config, --replicas,
--replica-sync) and its goal arithmetic, without starting a process."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from benchmarks.compare.goals import (
    Goal,
    goals,
    replica_hit_rate,
    replica_pairs,
    versus_best_peer,
)
from benchmarks.compare.metrics import (
    Cell,
    metric_sum,
    picks_counted,
    sync_messages,
    sync_state,
)
from benchmarks.compare.options import parse_args
from benchmarks.compare.plan import SHORT
from benchmarks.compare.replica_sync import row_subject
from benchmarks.compare.report import notes
from epp.devtools.nats import NatsServer
from benchmarks.compare.routers import (
    HEADLINE,
    EppRouter,
    describe_config,
    replica_row_name,
    slug,
)
from benchmarks.compare.run import Results, RouterInfo
from epp.replicasync.settings import check_subject

STICKY = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- name: prefix
  type: precise-prefix-cache-scorer
  parameters: {tokenizer: {mode: render}}
- type: max-score-picker
- type: single-profile-handler
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: queue-scorer, weight: 1}
  - {pluginRef: prefix, weight: 20}
  - {pluginRef: max-score-picker}
"""


@pytest.fixture
def sticky(tmp_path: Path) -> Path:
    path = tmp_path / "sticky.yaml"
    path.write_text(STICKY, encoding="utf-8")
    return path


def names(argv: list[str]) -> list[str]:
    return [r.name for r in parse_args(argv).routers]


# --- routers and their selection -------------------------------------------------------


def test_the_short_run_leads_with_the_built_in_default_and_no_config_file() -> None:
    routers = parse_args([]).routers
    assert routers[0].name == HEADLINE == "epp default"
    lead = routers[0]
    assert isinstance(lead, EppRouter)
    assert lead.uses_kv_events and lead.config_file is None and lead.config_text is None
    assert lead.replicas == 1
    assert "epp precise" not in [r.name for r in routers]  # the full plan's extra


def test_the_full_plan_and_an_exact_name_run_the_extra_profiles() -> None:
    assert "epp precise" in names(["--plan", "full"])
    assert names(["--routers", "epp precise"]) == ["epp precise"]
    # A substring picks the regular routers, not the full plan's probes.
    assert names(["--routers", "epp default"]) == ["epp default"]


def test_epp_config_adds_a_named_event_fed_router_after_the_headline(sticky: Path) -> None:
    routers = parse_args(["--epp-config", f"sticky={sticky}",
                          "--routers", "epp default", "envoy"]).routers
    assert [r.name for r in routers] == ["epp default", "epp sticky", "envoy round-robin"]
    router = routers[1]
    assert isinstance(router, EppRouter)
    assert router.uses_kv_events and router.config_file == sticky.resolve()
    assert router.config_label == "sticky.yaml"  # the file name, never the machine's path
    assert str(sticky.parent) not in router.description
    assert "prefix (precise-prefix-cache-scorer)" in router.description
    assert router.effective_config() == STICKY


def test_replicas_run_every_selected_epp_router_per_count(sticky: Path) -> None:
    routers = parse_args(["--routers", "epp default", "envoy", "oracle",
                          "--epp-config", f"sticky={sticky}", "--replicas", "1", "2"]).routers
    assert [r.name for r in routers] == ["epp default", "epp default ×2", "epp sticky",
                                         "epp sticky ×2", "envoy round-robin", "oracle"]
    one, two = routers[0], routers[1]
    assert isinstance(one, EppRouter) and isinstance(two, EppRouter)
    assert (one.replicas, two.replicas) == (1, 2)
    assert two.base_name == "epp default"
    # Copies never share their process lists (each starts and stops its own).
    assert one.processes is not two.processes
    assert one.metrics_urls is not two.metrics_urls


def test_replicas_alone_rename_the_rows() -> None:
    assert names(["--routers", "epp default", "--replicas", "3"]) == ["epp default ×3"]


def test_replica_sync_adds_a_synced_row_after_each_count_above_one(sticky: Path) -> None:
    routers = parse_args(["--routers", "epp default", "oracle", "--epp-config",
                          f"sticky={sticky}", "--replicas", "1", "2", "3",
                          "--replica-sync"]).routers
    assert [r.name for r in routers] == [
        "epp default", "epp default ×2", "epp default ×2 sync", "epp default ×3",
        "epp default ×3 sync", "epp sticky", "epp sticky ×2", "epp sticky ×2 sync",
        "epp sticky ×3", "epp sticky ×3 sync", "oracle"]
    epp = {r.name: r for r in routers if isinstance(r, EppRouter)}
    assert [n for n, r in epp.items() if r.replica_sync] == [
        "epp default ×2 sync", "epp default ×3 sync", "epp sticky ×2 sync",
        "epp sticky ×3 sync"]
    synced = epp["epp default ×2 sync"]
    assert (synced.replicas, synced.base_name) == (2, "epp default")
    assert synced.uses_kv_events and synced.config_file is None
    assert "over NATS" in synced.description
    assert "NATS" not in epp["epp default ×2"].description
    assert synced.processes is not epp["epp default ×2"].processes


def test_without_replica_sync_no_row_syncs() -> None:
    routers = parse_args(["--routers", "epp", "--replicas", "1", "2"]).routers
    assert not any(isinstance(r, EppRouter) and r.replica_sync for r in routers)
    assert not any(r.name.endswith("sync") for r in routers)


def test_replica_sync_alone_syncs_the_only_count() -> None:
    assert names(["--routers", "epp default", "--replicas", "2", "--replica-sync"]) == [
        "epp default ×2", "epp default ×2 sync"]


def test_row_names_and_a_single_replica_cannot_sync() -> None:
    assert replica_row_name(HEADLINE, 1) == "epp default"
    assert replica_row_name(HEADLINE, 2) == "epp default ×2"
    assert replica_row_name(HEADLINE, 2, sync=True) == "epp default ×2 sync"
    lead = parse_args(["--routers", "epp default"]).routers[0]
    assert isinstance(lead, EppRouter)
    with pytest.raises(ValueError):
        lead.with_replicas(1, sync=True)
    assert lead.with_replicas(4, sync=True).name == "epp default ×4 sync"


class _RunningNats(NatsServer):
    """A NATS server as a row sees it once started (no process here)."""

    @property
    def pid(self) -> int | None:
        return 4321

    def alive(self) -> bool:
        return True


def test_synced_replicas_get_the_server_url_and_the_rows_own_subject(tmp_path: Path) -> None:
    routers = parse_args(["--routers", "epp default", "--replicas", "2", "3",
                          "--replica-sync"]).routers
    plain, two, three = (r for r in routers if isinstance(r, EppRouter)
                         and r.name in ("epp default ×2", "epp default ×2 sync",
                                        "epp default ×3 sync"))
    assert plain.sync_args() == []
    with pytest.raises(RuntimeError):
        two.sync_args()  # no server given: a synced row never runs unsynced
    server = _RunningNats(tmp_path)
    server.port = 14222
    for row in (two, three):
        row.sync_server = server
        row.sync_subject = row_subject(slug(row.name), "0a1b2c3d")
    assert two.sync_args() == ["--replica-sync-url", "nats://127.0.0.1:14222",
                               "--replica-sync-subject", "epp-bench.epp-default-x2-sync.0a1b2c3d"]
    assert two.sync_subject != three.sync_subject
    # The NATS server's CPU is the synced row's; a row without sync never counts it.
    assert two.pids() == [4321]
    plain.sync_server = server
    assert plain.pids() == []


def test_row_subjects_are_publishable_nats_subjects() -> None:
    subject = row_subject(slug("epp sticky.v2 ×2 sync"), "ff00")
    assert subject == "epp-bench.epp-sticky_v2-x2-sync.ff00"
    assert check_subject(subject) == subject
    assert row_subject(slug("epp a ×2 sync"), "1") != row_subject(slug("epp a ×2 sync"), "2")


@pytest.mark.parametrize("argv", [
    ["--epp-config", "sticky"],  # no path
    ["--epp-config", "=x.yaml"],  # no name
    ["--epp-config", "default=PATH"],  # a built-in router's name
    ["--epp-config", "a b=PATH"],  # not a file-name-safe name
    ["--epp-config", "sticky=/nonexistent/sticky.yaml"],
    ["--replicas", "0"],
    ["--replicas", "two"],
    ["--replica-sync"],  # one replica: nothing to sync
    ["--replica-sync", "--replicas", "1", "1"],
    ["--routers", "no-such-router"],
    ["--workloads", "no-such-workload"],
])
def test_bad_arguments_are_usage_errors(argv: list[str], sticky: Path) -> None:
    argv = [a.replace("PATH", str(sticky)) for a in argv]
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2


def test_a_config_given_twice_or_not_a_config_is_refused(sticky: Path,
                                                          tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--epp-config", f"s={sticky}", "--epp-config", f"s={sticky}"])
    junk = tmp_path / "junk.yaml"
    junk.write_text("just: [a, list\n", encoding="utf-8")
    with pytest.raises(SystemExit):
        parse_args(["--epp-config", f"junk={junk}"])


def test_describe_config_names_plugins_weights_and_parameters() -> None:
    assert describe_config(STICKY) == (
        "default: queue-scorer ×1 + prefix (precise-prefix-cache-scorer) "
        "{tokenizer: {mode: render}} ×20 + max-score-picker")
    with pytest.raises(ValueError):
        describe_config("plugins: []\n")


def test_slug_and_pick_counter() -> None:
    assert slug("epp default ×2") == "epp-default-x2"
    assert slug("epp default ×2 sync") == "epp-default-x2-sync"
    assert slug("vllm-router cache_aware") == "vllm-router-cache_aware"
    text = ("# HELP epp_endpoint_picks_total x\nepp_endpoint_picks_total{endpoint=\"a\"} 3.0\n"
            "epp_endpoint_picks_total{endpoint=\"b\"} 4.0\nepp_endpoint_picks_created 1.0\n")
    assert picks_counted(text) == 7.0


SYNC_METRICS = """\
# TYPE epp_replica_sync_messages_sent counter
epp_replica_sync_messages_sent_total{kind="route"} 40.0
epp_replica_sync_messages_sent_total{kind="done"} 38.0
epp_replica_sync_messages_sent_total{kind="beat"} 2.0
epp_replica_sync_messages_sent_created{kind="route"} 1.7e+09
epp_replica_sync_messages_received_total{kind="route"} 41.0
epp_replica_sync_messages_received_total{kind="done"} 39.0
epp_replica_sync_connected 1.0
epp_replica_sync_peers 2.0
epp_replica_sync_peer_entries 5.0
"""


def test_sync_messages_and_state_from_a_replicas_metrics() -> None:
    assert sync_messages(SYNC_METRICS) == (80.0, 80.0)
    assert sync_state(SYNC_METRICS) == (True, 2)
    assert sync_state("epp_replica_sync_connected 0.0\n") == (False, 0)
    # A name is matched whole: _peers is not _peer_entries, _total not _created.
    assert metric_sum(SYNC_METRICS, "epp_replica_sync_peer") == 0.0
    assert metric_sum(SYNC_METRICS, "epp_replica_sync_peers") == 2.0


# --- goal arithmetic -------------------------------------------------------------------


def make_cell(router: str, workload: str, p90: float, hit: float = 0.5, *,
              kind: str = "ours", failed: int = 0, rate: float | None = None) -> Cell:
    rate = rate if rate is not None else next(
        w.main for w in SHORT.workloads if w.spec.name == workload)
    return Cell(router=router, kind=kind, workload=workload, rate=rate, requests=100,
                failed=failed, ttft_s=(p90 / 2, p90, p90 * 2), e2e_s=(1.0, 2.0),
                output_tokens_per_s=100.0, hit_rate=hit, path_ms=(1.0, 2.0),
                router_cpu_ms_per_request=1.0, router_cpu_cores=0.1,
                pods_cpu_ms_per_request=1.0, wall_s=10.0, errors={})


def make_results(cells: list[Cell], routers: dict[str, RouterInfo]) -> Results:
    return Results(plan=SHORT, fleet_capacity_tokens=1, schedules=[], cells=cells,
                   routers=routers)


EPP = RouterInfo(HEADLINE, 1, "built-in default (kvEvents)", kv_events=True)
EPP2 = RouterInfo(HEADLINE, 2, "built-in default (kvEvents)", kv_events=True)
EPP2_SYNC = RouterInfo(HEADLINE, 2, "built-in default (kvEvents)", kv_events=True,
                       replica_sync=True)
PEER = RouterInfo("peer", 0, "—")


def test_versus_best_peer_takes_the_lowest_peer_p90_and_three_quarters_of_it() -> None:
    peers = [make_cell("vllm-router cache_aware", "shared-prefix", 8.0, kind="peer"),
             make_cell("sglang-router cache_aware", "shared-prefix", 4.0, kind="peer"),
             make_cell("vllm-router kv_aware", "shared-prefix", math.nan, kind="peer")]
    at_limit = versus_best_peer(make_cell(HEADLINE, "shared-prefix", 3.0), peers)
    assert at_limit.verdict == "PASS"
    assert "sglang-router cache_aware" in at_limit.numbers and "0.75×" in at_limit.numbers
    # Beats the worse peer by far, but not the best one by a quarter.
    assert versus_best_peer(make_cell(HEADLINE, "shared-prefix", 3.01), peers).verdict == "MISS"
    failing = make_cell(HEADLINE, "shared-prefix", 1.0, failed=3)
    assert versus_best_peer(failing, peers).verdict == "MISS"
    assert versus_best_peer(None, peers).verdict == "n/a"
    assert versus_best_peer(make_cell(HEADLINE, "shared-prefix", 1.0), []).verdict == "n/a"


def test_replica_hit_rate_is_within_three_percent_relative() -> None:
    one = make_cell(HEADLINE, "shared-prefix", 1.0, hit=0.70)
    assert replica_hit_rate(one, make_cell("x2", "shared-prefix", 1.0, hit=0.68), 2
                            ).verdict == "PASS"  # -2.9%
    assert replica_hit_rate(one, make_cell("x2", "shared-prefix", 1.0, hit=0.67), 2
                            ).verdict == "MISS"  # -4.3%
    assert replica_hit_rate(one, make_cell("x2", "shared-prefix", 1.0, hit=0.73), 2
                            ).verdict == "MISS"  # +4.3%: ×2 must route as ×1 does
    cold = make_cell(HEADLINE, "no-sharing", 1.0, hit=0.0)
    assert replica_hit_rate(cold, make_cell("x2", "no-sharing", 1.0, hit=0.0), 2
                            ).verdict == "n/a"


def by_goal(found: list[Goal]) -> dict[str, Goal]:
    return {g.goal: g for g in found}


def test_goals_on_a_whole_run() -> None:
    x2 = f"{HEADLINE} ×2"
    cells = [
        make_cell(HEADLINE, "shared-prefix", 3.0, hit=0.72),
        make_cell(HEADLINE, "multi-turn", 0.5, hit=0.70),
        make_cell(HEADLINE, "no-sharing", 2.0, hit=0.0),
        make_cell(x2, "shared-prefix", 3.2, hit=0.71),
        make_cell(x2, "multi-turn", 0.6, hit=0.60),
        make_cell(x2, "no-sharing", 2.0, hit=0.0),
        make_cell("envoy round-robin", "no-sharing", 1.9, hit=0.0, kind="baseline"),
        make_cell("sglang-router cache_aware", "shared-prefix", 6.0, kind="peer"),
        make_cell("sglang-router cache_aware", "multi-turn", 0.6, kind="peer"),
        make_cell("oracle", "shared-prefix", 4.0, hit=0.75, kind="oracle"),
    ]
    results = make_results(cells, {
        HEADLINE: EPP, x2: EPP2, "envoy round-robin": RouterInfo("envoy round-robin", 0, "—"),
        "sglang-router cache_aware": PEER, "oracle": RouterInfo("oracle", 0, "—")})
    assert results.headline() == HEADLINE
    found = by_goal(goals(results))
    verdicts = {g.goal.split(" ", 2)[0] + " " + g.goal.split(" ", 2)[1]: g.verdict
                for g in found.values()}
    assert verdicts["(a) shared-prefix"] == "PASS"  # 3.0 ≤ 0.75 × 6.0
    assert verdicts["(a) multi-turn"] == "MISS"  # 0.5 > 0.75 × 0.6
    assert verdicts["(b) no-sharing"] == "MISS"  # 2.0 > 1.9
    replica = [g for g in found.values() if g.goal.startswith("(c)")]
    assert [(g.goal.split(":")[1].split()[0], g.verdict) for g in replica] == [
        ("shared-prefix", "PASS"), ("multi-turn", "MISS")]  # no-sharing: no hits, no goal
    assert [g.verdict for g in found.values() if g.goal.startswith("(d)")] == ["PASS"]


def test_the_headline_is_the_fewest_replicas_that_ran() -> None:
    x2 = f"{HEADLINE} ×2"
    only_x2 = make_results([make_cell(x2, "no-sharing", 1.0, hit=0.0)],
                           {HEADLINE: EPP, x2: EPP2})
    assert only_x2.headline() == x2
    assert make_results([], {HEADLINE: EPP}).headline() is None
    missing = goals(make_results([], {}))
    assert {g.verdict for g in missing} == {"n/a"}


def test_the_replica_goal_is_checked_on_synced_rows_too_and_names_them() -> None:
    x2, synced = f"{HEADLINE} ×2", f"{HEADLINE} ×2 sync"
    results = make_results([
        make_cell(HEADLINE, "shared-prefix", 3.0, hit=0.70),
        make_cell(x2, "shared-prefix", 3.0, hit=0.60),
        make_cell(synced, "shared-prefix", 3.0, hit=0.69),
    ], {HEADLINE: EPP, x2: EPP2, synced: EPP2_SYNC})
    assert replica_pairs(results) == [(x2, HEADLINE), (synced, HEADLINE)]
    replica = [g for g in goals(results) if g.goal.startswith("(c)")]
    assert [(g.goal, g.verdict) for g in replica] == [
        (f"(c) {x2}: shared-prefix hit rate within 3% of ×1's ({HEADLINE})", "MISS"),
        (f"(c) {synced}: shared-prefix hit rate within 3% of ×1's ({HEADLINE})", "PASS")]
    assert results.headline() == HEADLINE  # a synced row never takes the headline


def test_a_synced_row_that_did_not_run_is_not_checked() -> None:
    synced = f"{HEADLINE} ×2 sync"
    results = make_results([make_cell(HEADLINE, "shared-prefix", 3.0, hit=0.70)],
                           {HEADLINE: EPP, synced: EPP2_SYNC})
    assert replica_pairs(results) == []
    assert [g.verdict for g in goals(results) if g.goal.startswith("(c)")] == ["n/a"]


def test_notes_explain_synced_rows_only_when_one_ran() -> None:
    x2, synced = f"{HEADLINE} ×2", f"{HEADLINE} ×2 sync"
    plain = make_results([], {HEADLINE: EPP, x2: EPP2})
    with_sync = make_results([], {HEADLINE: EPP, x2: EPP2, synced: EPP2_SYNC})
    assert not any("sync rows" in line for line in notes(plain))
    assert any("sync rows" in line and "nats-server" in line for line in notes(with_sync))
    assert RouterInfo.of(parse_args(["--routers", "epp default", "--replicas", "2",
                                     "--replica-sync"]).routers[1]).replica_sync
