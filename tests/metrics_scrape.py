"""Read a Prometheus scrape the way Prometheus would."""

from __future__ import annotations

import requests
from prometheus_client.parser import text_string_to_metric_families


def scrape(url: str, session: requests.Session | None = None) -> dict[tuple[str, frozenset], float]:
    """Every sample of a /metrics page, keyed by (sample name, labels); through `session` (one
    kept-alive connection, as Prometheus scrapes) when given, else on a new connection."""
    response = (session or requests).get(url, timeout=10)
    response.raise_for_status()  # an error page would parse as no samples at all
    text = response.text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def total(samples: dict, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)
