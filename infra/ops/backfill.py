"""Backfill planning: which objects need a request, how their URIs are grouped
into request messages, and when a stored result answers one.

Everything here is pure. Running a backfill (listing, publishing with flow
control, watching results land) is :mod:`infra.ops.backfill_run`; the command is
``triggerfish submit``.
"""

from __future__ import annotations

import inspect
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from shared.errors import ErrorReason, PermanentError
from shared.messages import MAX_URIS_PER_MESSAGE, Priority, RequestMessage
from shared.result_store import (
    ERROR_REASON_METADATA_KEY,
    GENERATION_METADATA_KEY,
    STATUS_METADATA_KEY,
    VERSION_METADATA_KEY,
)
from shared.results import result_object_name, version_sort_key
from shared.uris import GcsUri, parse_gcs_uri

# Error reasons that describe the fleet's state rather than the input.
_NOT_ABOUT_THE_INPUT = frozenset({ErrorReason.UNKNOWN_VERSION.value, ErrorReason.UNKNOWN_MODEL.value})
# A result without a generation is matched by time; allow for clocks that disagree.
CLOCK_SLACK_S = 60.0
_NAME_TAKES_VERSION = "version" in inspect.signature(result_object_name).parameters


def result_name(model: str, version: str, source: GcsUri) -> str:
    """The result object for ``source`` under ``model`` at ``version``.

    The only caller of :func:`shared.results.result_object_name` here: whether
    the scheme puts the version into the path is decided there, not here.
    """
    if _NAME_TAKES_VERSION:
        return result_object_name(model, version, source)
    return result_object_name(model, source)  # type: ignore[call-arg]


def common_prefix(names: Iterable[str]) -> str:
    """The longest folder prefix (ending in ``/``) shared by ``names``: what to list."""
    prefix = os.path.commonprefix(list(names))
    return prefix[: prefix.rfind("/") + 1]


def parse_source(source: str) -> tuple[str, str]:
    """``gs://bucket/some/prefix`` -> ``("bucket", "some/prefix")``; the prefix may be empty.

    Raises:
        ValueError: naming the value when it is not a ``gs://`` bucket or prefix.
    """
    if not source.startswith("gs://"):
        raise ValueError(f"expected gs://BUCKET[/PREFIX], got {source!r}")
    bucket, _, prefix = source[len("gs://") :].partition("/")
    try:
        parse_gcs_uri(f"gs://{bucket}/_")
    except PermanentError as err:
        raise ValueError(f"invalid bucket in {source!r}: {err.message}") from err
    return bucket, prefix


def parse_uri_list(lines: Iterable[str]) -> tuple[list[GcsUri], list[str]]:
    """URIs from a ``--list`` file: one per line, blank lines and ``#`` comments ignored.

    Returns:
        The valid URIs in order without duplicates, and the invalid lines.
    """
    uris: dict[str, GcsUri] = {}
    invalid: list[str] = []
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            uri = parse_gcs_uri(line)
        except PermanentError:
            invalid.append(line)
            continue
        uris.setdefault(str(uri), uri)
    return list(uris.values()), invalid


@dataclass(frozen=True, slots=True)
class SourceObject:
    """One image to backfill; ``generation`` is ``None`` when it was not looked up."""

    uri: GcsUri
    generation: int | None = None

    @property
    def key(self) -> tuple[str, int | None]:
        return str(self.uri), self.generation


@dataclass(frozen=True, slots=True)
class ResultRecord:
    """What a result object's listing says about it, without reading its body."""

    name: str
    generation: int | None
    version: str | None
    status: str | None
    updated: float
    reason: str | None = None  # an error result's reason, when its metadata names one

    @classmethod
    def from_listing(
        cls, name: str, metadata: Mapping[str, str] | None, updated: float
    ) -> ResultRecord:
        meta = metadata or {}
        generation = meta.get(GENERATION_METADATA_KEY, "")
        return cls(
            name=name,
            generation=int(generation) if generation.isdigit() else None,
            version=meta.get(VERSION_METADATA_KEY) or None,
            status=meta.get(STATUS_METADATA_KEY) or None,
            updated=updated,
            reason=meta.get(ERROR_REASON_METADATA_KEY) or None,
        )


def answers(
    record: ResultRecord | None,
    source: SourceObject,
    version: str,
    published_at: float | None = None,
) -> bool:
    """Whether ``record`` is the result of ``source`` for ``version``, or outranks it.

    A result for a newer version or source generation counts: the result store
    never replaces it with an older one, so waiting for that would never end.
    A result that names no generation (the object was missing when it was
    written) counts only when written after ``published_at``. An error saying
    the model or version could not be resolved never counts: it is about the
    serving fleet (a replica that did not have the version yet), not the input.
    """
    if record is None:
        return False
    if record.reason in _NOT_ABOUT_THE_INPUT:
        return False
    if record.version is not None and version_sort_key(record.version) < version_sort_key(version):
        return False
    if source.generation is not None and record.generation is not None:
        return record.generation >= source.generation
    if published_at is not None:
        return record.updated >= published_at - CLOCK_SLACK_S
    return False


@dataclass
class Plan:
    """What a backfill run will do.

    Attributes:
        publish: Objects to request, in listing order.
        awaiting: Result name -> (object, publish time) for objects an earlier
            run published recently enough that their results are still expected.
        names: Result name per object key, for everything published or awaited.
        skipped: Objects whose result for this model, version and generation exists.
        results_prefix: The folder of the results bucket that holds every result.
    """

    model: str
    version: str
    found: int = 0
    publish: list[SourceObject] = field(default_factory=list)
    awaiting: dict[str, tuple[SourceObject, float]] = field(default_factory=dict)
    names: dict[tuple[str, int | None], str] = field(default_factory=dict)
    skipped: int = 0
    invalid: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    results_prefix: str = ""


def make_plan(
    sources: Sequence[SourceObject],
    records: Mapping[str, ResultRecord],
    model: str,
    version: str,
    in_flight: Mapping[tuple[str, int | None], float] | None = None,
) -> Plan:
    """Split ``sources`` into skipped (answered), awaited (published earlier) and to publish."""
    plan = Plan(model=model, version=version, found=len(sources))
    in_flight = in_flight or {}
    names = [result_name(model, version, source.uri) for source in sources]
    plan.results_prefix = common_prefix(names)
    for source, name in zip(sources, names, strict=True):
        if answers(records.get(name), source, version):
            plan.skipped += 1
            continue
        plan.names[source.key] = name
        if source.key in in_flight:
            plan.awaiting[name] = (source, in_flight[source.key])
        else:
            plan.publish.append(source)
    return plan


@dataclass(frozen=True, slots=True)
class Batch:
    """One request message and the objects it names."""

    request_id: str
    body: bytes
    items: tuple[SourceObject, ...]


def batches(
    items: Sequence[SourceObject], per_message: int, model: str, version: str, run_id: str,
    priority: Priority = Priority.BULK,
) -> list[Batch]:  # fmt: skip
    """Group ``items`` into request messages of at most ``per_message`` URIs.

    The messages pin ``version``, so a version promoted during the backfill does
    not split it across two versions, and carry their traffic class (bulk, unless
    the run asked to be live), so they are bulk work whichever topic they reach.

    Raises:
        ValueError: ``per_message`` outside 1..100.
    """
    if not 1 <= per_message <= MAX_URIS_PER_MESSAGE:
        raise ValueError(f"per_message must be 1..{MAX_URIS_PER_MESSAGE}, got {per_message}")
    out = []
    for n, start in enumerate(range(0, len(items), per_message)):
        chunk = tuple(items[start : start + per_message])
        uris = [str(item.uri) for item in chunk]
        request_id = f"backfill-{run_id}-{n}"
        message = RequestMessage(
            uri=uris[0] if len(uris) == 1 else None,
            uris=uris if len(uris) > 1 else None,
            model=model,
            version=version,
            request_id=request_id,
            priority=priority,
        )
        body = message.model_dump_json(exclude_none=True).encode()
        out.append(Batch(request_id, body, chunk))
    return out


class Tracker:
    """Objects published (or awaited) whose result has not been seen yet."""

    def __init__(self, version: str) -> None:
        self._version = version
        self._outstanding: dict[str, tuple[SourceObject, float]] = {}

    def __len__(self) -> int:
        return len(self._outstanding)

    def expect(self, name: str, source: SourceObject, published_at: float) -> None:
        self._outstanding[name] = (source, published_at)

    def forget(self, name: str) -> None:
        self._outstanding.pop(name, None)

    def outstanding(self) -> dict[str, tuple[SourceObject, float]]:
        return dict(self._outstanding)

    def observe(self, records: Mapping[str, ResultRecord]) -> list[ResultRecord]:
        """Mark the objects that ``records`` answer as done; return their records."""
        landed = []
        for name, (source, published_at) in list(self._outstanding.items()):
            record = records.get(name)
            if answers(record, source, self._version, published_at):
                del self._outstanding[name]
                landed.append(record)
        return landed


def outcome(result: Mapping[str, Any]) -> str:
    """``ok`` or the error reason of a result JSON."""
    if result.get("status") == "ok":
        return "ok"
    error = result.get("error")
    reason = error.get("reason") if isinstance(error, Mapping) else None
    return str(reason or "unknown")


@dataclass
class Summary:
    """What a backfill run did; ``rows()`` is the table printed at the end."""

    run_id: str
    model: str
    version: str
    target: str
    dry_run: bool = False
    found: int = 0
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    skipped: int = 0
    invalid: int = 0
    missing: int = 0
    awaited: int = 0
    to_publish: int = 0
    published_images: int = 0
    published_messages: int = 0
    publish_failed: int = 0
    not_published: int = 0
    unfinished: int = 0
    interrupted: bool = False
    elapsed_s: float = 0.0
    results_prefix: str = ""
    priority: str = Priority.BULK.value
    # Bulk inputs Serve shed while the run watched (it backs off on each).
    bulk_shed: int = 0

    @property
    def processed(self) -> int:
        return self.ok + sum(self.errors.values())

    def rows(self) -> list[tuple[str, int]]:
        rows = [("ok", self.ok)]
        rows += [(f"error: {reason}", n) for reason, n in sorted(self.errors.items())]
        rows.append(("skipped: result already stored", self.skipped))
        optional = [
            ("skipped: not a gs:// object URI", self.invalid),
            ("skipped: object does not exist", self.missing),
            ("publish failed (re-run to retry)", self.publish_failed),
            ("not published: interrupted (re-run to resume)", self.not_published),
            ("no result yet (re-run to wait or resubmit)", self.unfinished),
        ]
        return rows + [(label, n) for label, n in optional if n]

    def exit_code(self) -> int:
        """0: everything answered ok; 2: some error results; 3: work left; 130: interrupted."""
        if self.interrupted:
            return 130
        if self.unfinished or self.publish_failed or self.not_published:
            return 3
        return 2 if self.errors else 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id, "model": self.model, "version": self.version,
            "target": self.target, "dry_run": self.dry_run, "found": self.found,
            "ok": self.ok, "errors": dict(self.errors), "skipped": self.skipped,
            "invalid": self.invalid, "missing": self.missing,
            "awaited_from_earlier_runs": self.awaited, "to_publish": self.to_publish,
            "published_images": self.published_images,
            "published_messages": self.published_messages,
            "publish_failed": self.publish_failed, "not_published": self.not_published,
            "unfinished": self.unfinished, "priority": self.priority, "bulk_shed": self.bulk_shed,
            "interrupted": self.interrupted, "elapsed_s": round(self.elapsed_s, 3),
            "results_prefix": self.results_prefix,
        }  # fmt: skip
