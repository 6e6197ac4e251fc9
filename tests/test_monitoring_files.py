"""The lab's monitoring files (docker/monitoring, not run by CI): the dashboard parses and
every metric it queries is one the relay exports; Prometheus scrapes the relay's /metrics."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from relay import metrics

ROOT = Path(__file__).parent.parent / "docker"


def exported(tmp: Path) -> set[str]:
    """Every sample name /metrics can give, with the histograms' series."""
    metrics.init(tmp / "m")
    try:
        names = set()
        for key in ("sessions", "messages", "recipients", "tls"):
            names.add(metrics._m[key]._name + "_total")
        for key in ("accept", "attempt", "commit"):
            base = metrics._m[key]._name
            names |= {base + "_bucket", base + "_count", base + "_sum"}
    finally:
        metrics.reset()
    return names | {"relay_queue_recipients", "relay_queue_oldest_seconds"}


def test_dashboard_uses_only_exported_metrics(tmp_path: Path) -> None:
    dash = json.loads((ROOT / "monitoring" / "relay-dashboard.json").read_text())
    used: set[str] = set()
    for panel in dash["panels"]:
        for target in panel["targets"]:
            used |= set(re.findall(r"\brelay_[a-z_]+", target["expr"]))
    assert used and used <= exported(tmp_path), used - exported(tmp_path)


def test_prometheus_scrapes_the_relay_metrics_path() -> None:
    conf = yaml.safe_load((ROOT / "monitoring" / "prometheus.yml").read_text())
    [job] = conf["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["relay:8080"]
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert {"prometheus", "grafana"} <= set(compose["services"])
