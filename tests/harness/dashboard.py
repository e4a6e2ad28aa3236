"""A Grafana dashboard's queries and the metric names and labels they read
(each query parsed as PromQL by promql-parser, a real parser: a query that
does not parse fails too), and what a Prometheus exposition offers, so that
one is checked against the other."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import promql_parser
from prometheus_client.parser import text_string_to_metric_families

# Grafana's own variables, as a duration it would put in their place
GRAFANA_DURATIONS = {"__rate_interval": "5m", "__interval": "1m", "__range": "6h"}
# the names a family of each type offers to queries
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
}
LABEL_VALUES = re.compile(r"^label_values\((\w+),\s*(\w+)\)$")


def panels(dashboard: dict) -> Iterator[dict]:
    """Every panel, those inside rows included."""
    for p in dashboard.get("panels", []):
        yield p
        yield from panels(p)


def queries(dashboard: dict) -> list[str]:
    """Every PromQL query of the dashboard's panels, as Grafana sends it."""
    return [t["expr"] for p in panels(dashboard) for t in p.get("targets", [])]


def variable_metrics(dashboard: dict) -> dict[str, str]:
    """metric -> label of each `label_values(metric, label)` variable."""
    out = {}
    for v in dashboard["templating"]["list"]:
        if v["type"] == "query":
            m = LABEL_VALUES.match(v["query"]["query"])
            assert m, f"variable {v['name']}: not label_values(metric, label)"
            out[m[1]] = m[2]
    return out


def as_promql(expr: str, dashboard: dict) -> str:
    """`expr` with Grafana's variables replaced as Grafana would: its own by
    durations, the dashboard's by a value that matches anything."""
    own = {v["name"] for v in dashboard["templating"]["list"]}

    def value(m: re.Match) -> str:
        name = m[1] or m[2]
        if name in GRAFANA_DURATIONS:
            return GRAFANA_DURATIONS[name]
        assert name in own, f"${name}: no such variable in {expr}"
        return ".+"

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)


def reads(promql: str) -> dict[str, set[str]]:
    """metric -> the labels `promql` names on it (in a selector's matchers,
    or in a `by (...)` over an expression that reads it). Raises ValueError
    where `promql` does not parse."""
    out: dict[str, set[str]] = {}

    def visit(node: object) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            assert node.name, f"a selector without a metric name: {node}"
            out.setdefault(node.name, set()).update(m.name for m in node.matchers.matchers)
        elif isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            for metric in reads(str(node.expr)):
                out.setdefault(metric, set()).update(node.modifier.labels)

    promql_parser.walk(promql_parser.parse(promql), visit)
    return out


@dataclass
class Exposition:
    """The names a scrape offers, and the labels of each one's samples."""

    names: set[str]
    labels: dict[str, set[str]]


def exposition(text: str) -> Exposition:
    names: set[str] = set()
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        names.update(family.name + s for s in SUFFIXES[family.type])
        for sample in family.samples:
            names.add(sample.name)
            labels.setdefault(sample.name, set()).update(sample.labels)
    return Exposition(names, labels)
