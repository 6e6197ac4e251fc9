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
        for m in metrics._m.values():
            if m._type == "counter":
                names.add(m._name + "_total")
            else:
                assert m._type == "histogram"
                names |= {m._name + "_bucket", m._name + "_count", m._name + "_sum"}
    finally:
        metrics.reset()
    gauges = {"relay_queue_recipients", "relay_queue_oldest_seconds"}
    return names | gauges | {"relay_mtasts_cached_policies"}


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
