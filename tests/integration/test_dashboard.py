"""The Grafana dashboard (k8s/monitoring/kvbm-node.json) reads only what
nodes export: two real `kvbm node` processes on etcd serve an engine each,
B pulls A's prompt, A spills to its disk and hears of a refused engine; then
every metric name a dashboard query or variable names is one their /metrics
offer (a histogram's _bucket, _sum and _count included), and every label a
query names on a metric is on that metric's samples where the nodes have any
(checksum failures and read errors have none without a fault; their names
are still checked). A misspelled metric or label, and a query that does not
parse, are caught (negative controls)."""

from __future__ import annotations

import copy
import json
import urllib.request

import pytest

from kvbm import __version__
from kvbm.connector.attach import Available, NodeAttachment, Refusal, report_refusal
from tests.harness.dashboard import (
    Exposition,
    as_promql,
    exposition,
    panels,
    queries,
    reads,
    variable_metrics,
)
from tests.harness.k8s_render import K8S, rendered
from tests.harness.node_daemon import loads_exactly, spill, until
from tests.harness.ports import free_port
from tests.harness.support import GEOMETRY

DASHBOARD = K8S / "monitoring" / "kvbm-node.json"
TARGET_LABELS = {"instance", "job"}  # Prometheus adds them to every series it scrapes


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def scrape(host: str, port: int) -> str:
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def unexported(dash: dict, offered: Exposition) -> list[str]:
    """What the dashboard reads that the nodes do not offer (empty: nothing)."""
    wrong = [f"variable reads {m}" for m in variable_metrics(dash) if m not in offered.names]
    for expr in queries(dash):
        for metric, labels in reads(as_promql(expr, dash)).items():
            if metric not in offered.names:
                wrong.append(f"{metric} in {expr}")
            elif metric in offered.labels:
                missing = labels - TARGET_LABELS - offered.labels[metric]
                wrong += [f"label {label} of {metric} in {expr}" for label in missing]
    return wrong


def broken(dash: dict, old: str, new: str) -> dict:
    """A copy of `dash` with `old` replaced by `new` in its first query that has it."""
    copied = copy.deepcopy(dash)
    for p in panels(copied):
        for t in p.get("targets", []):
            if old in t["expr"]:
                t["expr"] = t["expr"].replace(old, new)
                return copied
    raise AssertionError(f"no query has {old}")


def test_every_metric_and_label_the_dashboard_reads_is_one_the_nodes_export(
    etcd, daemons, tmp_path
):
    ports = free_port("127.0.0.2"), free_port("127.0.0.3")
    common = ["--etcd", etcd.endpoint, "--host-cache-mb", "1"]
    disk = ["--disk-cache-dir", str(tmp_path / "a-disk"), "--disk-cache-mb", "4"]
    a = daemons("a", "127.0.0.2", *common, *disk, "--metrics-port", str(ports[0]))
    b = daemons("b", "127.0.0.3", *common, "--metrics-port", str(ports[1]))
    before = scrape("127.0.0.2", ports[0])
    eng_a = NodeAttachment(a.socket, GEOMETRY)
    eng_b = NodeAttachment(b.socket, GEOMETRY, remote=["host", "disk"])
    try:
        spill(eng_a, eng_a.keys(list(range(100, 104))))  # stored, drained to disk, evicted
        recent = eng_a.keys(list(range(50_000, 50_000 + eng_a.num_slots)))[-4:]
        until(lambda: eng_b.lookup(recent) == Available(0, 4), 10, "B never saw A's blocks")
        assert loads_exactly(eng_b, recent, "remote_host")  # a pull from A's host tier
        report_refusal(a.socket, Refusal("llama-8b", "decode context parallelism", "kv_cache"))
        offered = exposition(scrape("127.0.0.2", ports[0]) + scrape("127.0.0.3", ports[1]))
    finally:
        eng_a.close()
        eng_b.close()

    dash = dashboard()
    assert queries(dash) and unexported(dash, offered) == []
    # labels were really compared: the nodes had samples of nearly all it reads
    read = {m for e in queries(dash) for m in reads(as_promql(e, dash))}
    assert len(read - set(offered.labels)) <= 2, read - set(offered.labels)
    # the dashboard's node list shows a node from its start, before any engine
    assert set(variable_metrics(dash)) <= exposition(before).names
    assert f'kvbm_build_info{{version="{__version__}"}} 1.0' in before

    # negative controls: a metric or a label no node exports, a query that
    # does not parse, a variable the dashboard lacks
    evicted = broken(dash, "kvbm_tier_evictions_total", "kvbm_tier_evicted_total")
    assert [w for w in unexported(evicted, offered) if "kvbm_tier_evicted_total" in w]
    teir = broken(dash, "by (tier) (rate(kvbm_tier_ev", "by (teir) (rate(kvbm_tier_ev")
    assert [w for w in unexported(teir, offered) if "label teir" in w]
    with pytest.raises(ValueError):
        unexported(broken(dash, "[$__rate_interval]", "[$__rate_interval"), offered)
    with pytest.raises(AssertionError, match="no such variable"):
        unexported(broken(dash, "$instance", "$node"), offered)


def test_the_monitoring_kustomization_deploys_this_dashboard():
    [configmap] = rendered("monitoring")
    assert configmap["kind"] == "ConfigMap" and configmap["metadata"]["namespace"] == "monitoring"
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["kvbm-node.json"]) == dashboard()
    ids = [p["id"] for p in panels(dashboard())]
    assert len(ids) == len(set(ids)), "panel ids repeat"
