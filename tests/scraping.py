"""HTTP reads of a metrics and health listener (a relay's, a supervisor's or a notifier's):
``/metrics`` parsed with prometheus_client's own parser, ``/healthz`` and ``/readyz``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families


@dataclass
class Scrape:
    """One /metrics document, parsed by prometheus_client's parser."""

    text: str
    content_type: str

    def __post_init__(self) -> None:
        self.samples = [s for family in text_string_to_metric_families(self.text)
                        for s in family.samples]

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples called ``name`` whose labels include ``labels``."""
        found = [s.value for s in self.samples if s.name == name
                 and all(s.labels.get(k) == v for k, v in labels.items())]
        assert found, f"no sample {name}{labels} in:\n{self.text}"
        return sum(found)

    def names(self) -> set[str]:
        return {s.name for s in self.samples}


async def get(port: int, path: str, accept: str = "") -> tuple[int, str, str]:
    """(status, Content-Type, body) of a GET on 127.0.0.1:``port``."""
    headers = {"Accept": accept} if accept else {}
    async with aiohttp.ClientSession() as http, \
            http.get(f"http://127.0.0.1:{port}{path}", headers=headers) as response:
        return response.status, response.headers["Content-Type"], await response.text()


async def scrape(port: int) -> Scrape:
    status, content_type, text = await get(port, "/metrics")
    assert status == 200, text
    return Scrape(text, content_type)


async def readyz(port: int) -> tuple[int, dict[str, Any]]:
    status, _, text = await get(port, "/readyz")
    return status, json.loads(text)


async def ready(port: int) -> bool:
    return (await readyz(port))[0] == 200
