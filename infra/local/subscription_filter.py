"""Subscription filters for the local stack, applied by the push dispatcher.

Cloud Storage sends each bucket's notifications to the topic its own notification
config names: in the cloud the images bucket feeds the uploads topic and the
results bucket the results topic. fake-gcs-server publishes the events of every
bucket to one topic, so locally the uploads topic carries both, and subscription
filters on ``bucketId`` (an attribute of every notification) split them again.

The Pub/Sub emulator stores a subscription's filter but delivers every message
regardless, so the dispatcher (:mod:`infra.local.push_dispatcher`) applies the
filter itself: a message that does not match is acknowledged unseen, as Cloud
Pub/Sub acknowledges the messages a filter excludes. Only the form the stack uses
is understood, ``attributes.KEY = "VALUE"`` terms joined by ``AND``; anything else
is refused with the expression named, rather than silently matching everything.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

_TERM = re.compile(r'^attributes\.([A-Za-z_][A-Za-z0-9_-]*)\s*=\s*"([^"\\]*)"$')


@dataclass(frozen=True, slots=True)
class AttributeFilter:
    """Attribute equalities that a message must all satisfy."""

    equals: tuple[tuple[str, str], ...]

    @classmethod
    def parse(cls, expression: str) -> AttributeFilter:
        """Read ``attributes.KEY = "VALUE" [AND ...]``.

        Raises:
            ValueError: for any other filter syntax, naming the expression.
        """
        terms = []
        for term in re.split(r"\s+AND\s+", expression.strip()):
            match = _TERM.match(term.strip())
            if match is None:
                raise ValueError(
                    f"unsupported subscription filter {expression!r}: the local stack applies only "
                    'attributes.KEY = "VALUE" terms joined by AND'
                )
            terms.append((match.group(1), match.group(2)))
        return cls(tuple(terms))

    def matches(self, attributes: Mapping[str, str]) -> bool:
        return all(attributes.get(key) == value for key, value in self.equals)

    def __str__(self) -> str:
        return " AND ".join(f'attributes.{key} = "{value}"' for key, value in self.equals)


def bucket_filter(bucket: str) -> AttributeFilter:
    """Only Cloud Storage notifications about objects in ``bucket``."""
    return AttributeFilter((("bucketId", bucket),))
