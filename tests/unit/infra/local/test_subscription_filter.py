"""Subscription filters the dispatcher applies, and how the local stack splits bucket events."""

from __future__ import annotations

import pytest

from infra.footprint import load_footprint
from infra.local.emulators import (
    dispatcher_argv,
    fake_gcs_argv,
    results_bridges,
    subscription_filters,
)
from infra.local.push_dispatcher import Bridge, parse_filter
from infra.local.subscription_filter import AttributeFilter, bucket_filter


def test_a_filter_matches_messages_whose_attributes_all_equal() -> None:
    expression = 'attributes.bucketId = "images" AND attributes.eventType = "OBJECT_FINALIZE"'
    wanted = AttributeFilter.parse(expression)

    assert wanted.matches({"bucketId": "images", "eventType": "OBJECT_FINALIZE", "objectId": "a"})
    assert not wanted.matches({"bucketId": "results", "eventType": "OBJECT_FINALIZE"})
    assert not wanted.matches({"eventType": "OBJECT_FINALIZE"})
    assert str(wanted) == expression
    assert AttributeFilter.parse(str(bucket_filter("b"))) == bucket_filter("b")


@pytest.mark.parametrize(
    "expression",
    [
        'hasPrefix(attributes.objectId, "a")',
        'attributes.bucketId != "x"',
        'attributes.a = "x" OR attributes.b = "y"',
        "",
    ],
)
def test_a_filter_the_dispatcher_cannot_apply_is_refused_by_name(expression: str) -> None:
    with pytest.raises(ValueError, match="unsupported subscription filter"):
        AttributeFilter.parse(expression)


def test_filters_and_bridges_parse_from_the_command_line() -> None:
    assert parse_filter('s=attributes.bucketId = "b"') == ("s", bucket_filter("b"))
    assert Bridge.parse("s=t") == Bridge("s", "t")
    bridge = Bridge.parse('s=t;attributes.bucketId = "b"')
    assert bridge == Bridge("s", "t", bucket_filter("b"))
    assert bridge.takes({"bucketId": "b"}) and not bridge.takes({"bucketId": "c"})
    for bad in ("s", "=t", "s=projects/p/topics/t"):
        with pytest.raises(Exception, match="a bridge is SUBSCRIPTION=TOPIC"):
            Bridge.parse(bad)
    with pytest.raises(Exception, match="unsupported subscription filter"):
        Bridge.parse("s=t;bucketId != 1")


def test_every_bucket_notifies_the_uploads_topic_and_filters_split_it_by_bucket() -> None:
    fp = load_footprint()
    argv = fake_gcs_argv(1, "p", fp, data_dir=None)  # type: ignore[arg-type]
    assert "-event.bucket" not in argv
    assert argv[argv.index("-event.pubsub-topic") + 1] == fp.uploads_topic

    filters = subscription_filters(fp)
    assert filters == {fp.uploads_subscription.name: f'attributes.bucketId = "{fp.images_bucket}"'}
    # The results bucket's notifications ride on the uploads subscription's pulls to the results topic.
    bridge = f'{fp.uploads_subscription.name}={fp.results_topic};attributes.bucketId = "{fp.results_bucket}"'
    assert results_bridges(fp) == [bridge]

    args = dispatcher_argv("p", fp, {sub.entry_point: 1 for sub in fp.push_subscriptions})
    assert args[args.index("--bridge") + 1] == bridge
    assert args.count("--filter") == len(filters)
