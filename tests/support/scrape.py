"""Read a Prometheus scrape into {(sample name, sorted labels): value} for exact assertions."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from .http import request

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(internal_url: str) -> Samples:
    reply = request(internal_url + "/metrics")
    assert reply.status == 200, reply.status
    out: Samples = {}
    for family in text_string_to_metric_families(reply.body.decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` (0 if none)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)
