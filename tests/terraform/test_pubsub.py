"""Every delivery path retries with backoff and ends in a dead letter."""

from __future__ import annotations

from tests.terraform._hcl import all_modules, block, child, expr, root


def _subscriptions():
    for module in all_modules():
        for name, body in module.resources.get("google_pubsub_subscription", {}).items():
            yield module, name, body


def _is_dead_letter_sink(body):
    return expr(body["topic"]) == "${google_pubsub_topic.dead_letter.id}"


def test_there_are_push_pull_and_bigquery_subscriptions_and_one_dead_letter_sink():
    subs = {name: body for _, name, body in _subscriptions()}
    assert set(subs) == {"push", "pull", "bigquery", "dead_letter"}
    assert _is_dead_letter_sink(subs["dead_letter"])
    assert not any(_is_dead_letter_sink(subs[name]) for name in ("push", "pull", "bigquery"))


def _is_reader_pull(name: str) -> bool:
    """Pull subscriptions of readers outside the pipeline (results events): whoever reads
    acknowledges what it read, and a message handed back unread must not count as failed."""
    return name == "pull"


def test_every_subscription_has_an_exponential_backoff_retry_policy():
    for module, name, body in _subscriptions():
        retry = block(body, "retry_policy")
        assert retry.get("minimum_backoff") and retry.get("maximum_backoff"), (
            f"{module.path.name}: {name}"
        )


def test_every_source_subscription_dead_letters_after_a_bounded_number_of_attempts():
    pubsub = child("pubsub")
    for module, name, body in _subscriptions():
        if _is_dead_letter_sink(body) or _is_reader_pull(name):
            # The sink itself is where dead letters end; it must not have one.
            assert "dead_letter_policy" not in body
            continue
        policy = block(body, "dead_letter_policy")
        assert policy["dead_letter_topic"] == "${google_pubsub_topic.dead_letter.id}", (
            f"{module.path.name}: {name}"
        )
        attempts = policy["max_delivery_attempts"]
        if isinstance(attempts, int):
            assert 5 <= attempts <= 100
        else:
            assert attempts == "${each.value.max_delivery_attempts}"
            variable = "bigquery_subscriptions" if name == "bigquery" else "push_subscriptions"
            conditions = [v["condition"] for v in pubsub.variables[variable]["validation"]]
            assert any(
                "s.max_delivery_attempts >= 5 && s.max_delivery_attempts <= 100" in c
                for c in conditions
            )


def test_push_subscriptions_authenticate_and_never_expire():
    push = child("pubsub").resource("google_pubsub_subscription", "push")
    config = block(push, "push_config")
    assert config["push_endpoint"] == "${each.value.push_endpoint}"
    token = block(config, "oidc_token")
    assert token["service_account_email"] == "${var.push_invoker_service_account_email}"
    assert token["audience"] == "${each.value.audience}"
    for _, name, body in _subscriptions():
        assert block(body, "expiration_policy")["ttl"] == "", name


def test_push_subscriptions_target_the_functions():
    call = root().module_calls["pubsub"]
    push = expr(call["push_subscriptions"])
    assert 'push_endpoint="${module.functions.uris[key]}/projects/' in push
    assert "audience=module.functions.uris[key]" in push
    assert (
        call["push_invoker_service_account_email"]
        == '${google_service_account.this["push_invoker"].email}'
    )


def test_pubsub_service_agent_can_dead_letter_and_sign_pushes():
    pubsub = child("pubsub")
    publisher = pubsub.resource("google_pubsub_topic_iam_member", "dead_letter_publisher")
    assert publisher["topic"] == "${google_pubsub_topic.dead_letter.name}"
    assert publisher["role"] == "roles/pubsub.publisher"
    assert publisher["member"] == "serviceAccount:${var.pubsub_service_agent_email}"

    subscriber = pubsub.resource("google_pubsub_subscription_iam_member", "dead_letter_subscriber")
    assert subscriber["for_each"] == "${google_pubsub_subscription.push}"
    assert subscriber["role"] == "roles/pubsub.subscriber"
    assert subscriber["member"] == "serviceAccount:${var.pubsub_service_agent_email}"

    token_creator = pubsub.resource("google_service_account_iam_member", "push_token_creator")
    assert token_creator["role"] == "roles/iam.serviceAccountTokenCreator"
    assert "var.push_invoker_service_account_email" in token_creator["service_account_id"]

    top = root()
    assert (
        top.module_calls["pubsub"]["pubsub_service_agent_email"] == "${local.pubsub_service_agent}"
    )


def test_pubsub_service_agent_exists_before_it_is_granted_anything():
    """Its email is not assembled by hand: the identity is created through the API, and the
    grants wait until IAM can see it (on a new project they fail otherwise)."""
    top = root()
    identity = top.resource("google_project_service_identity", "pubsub")
    assert identity["provider"] == "google-beta"
    assert identity["service"] == "pubsub.googleapis.com"
    assert identity["depends_on"] == ["${google_project_service.this}"]
    wait = top.resource("time_sleep", "pubsub_service_agent")
    assert wait["triggers"] == {"email": "${google_project_service_identity.pubsub.email}"}
    assert int(wait["create_duration"].removesuffix("s")) >= 30
    assert (
        top.locals["pubsub_service_agent"] == '${time_sleep.pubsub_service_agent.triggers["email"]}'
    )
    assert "gcp-sa-pubsub" not in top.text


def test_ack_deadline_comes_from_the_subscription_settings():
    push = child("pubsub").resource("google_pubsub_subscription", "push")
    assert push["ack_deadline_seconds"] == "${each.value.ack_deadline_seconds}"
    retry = block(push, "retry_policy")
    assert retry["minimum_backoff"] == "${each.value.min_backoff_seconds}s"
    assert retry["maximum_backoff"] == "${each.value.max_backoff_seconds}s"
