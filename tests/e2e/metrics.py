"""Read the server's Prometheus metrics (our omni_* series and Triton's own)."""

from __future__ import annotations

import re
import urllib.request

_LINE = re.compile(r"^(?P<name>[a-zA-Z_:][\w:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$")


def scrape(metrics_url: str) -> dict[tuple[str, frozenset], float]:
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    series = {}
    for line in text.splitlines():
        match = _LINE.match(line)
        if match:
            labels = frozenset(re.findall(r'(\w+)="([^"]*)"', match["labels"] or ""))
            series[(match["name"], labels)] = float(match["value"])
    return series


def value(series: dict, name: str, **labels: str) -> float:
    return series.get((name, frozenset(labels.items())), 0.0)
