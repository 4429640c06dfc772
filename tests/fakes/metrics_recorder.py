"""A metrics factory for tests: keeps every recorded value by metric name and labels."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any


class Recorder:
    """A :class:`serve.metrics.MetricFactory` that keeps every value by name and labels."""

    def __init__(self) -> None:
        self.values: dict[str, dict[tuple[tuple[str, str], ...], Any]] = defaultdict(dict)
        self.declared: dict[str, tuple[str, tuple[str, ...]]] = {}

    def _key(self, name: str, tags: dict[str, str] | None) -> tuple[tuple[str, str], ...]:
        keys = self.declared[name][1]
        assert tags is not None and set(tags) == set(keys), (name, tags, keys)
        return tuple(sorted(tags.items()))

    def counter(self, name: str, description: str, tag_keys: tuple[str, ...]) -> Any:
        self.declared[name] = ("counter", tag_keys)
        recorder = self

        class C:
            def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
                key = recorder._key(name, tags)
                recorder.values[name][key] = recorder.values[name].get(key, 0) + value

        return C()

    def histogram(
        self, name: str, description: str, boundaries: Iterable[float], tag_keys: tuple[str, ...]
    ) -> Any:
        self.declared[name] = ("histogram", tag_keys)
        recorder = self

        class H:
            def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
                recorder.values[name].setdefault(recorder._key(name, tags), []).append(value)

        return H()

    def gauge(self, name: str, description: str, tag_keys: tuple[str, ...]) -> Any:
        self.declared[name] = ("gauge", tag_keys)
        recorder = self

        class G:
            def set(self, value: float, tags: dict[str, str] | None = None) -> None:
                recorder.values[name][recorder._key(name, tags)] = value

        return G()

    def get(self, name: str, **labels: str) -> Any:
        return self.values[name].get(tuple(sorted(labels.items())))
