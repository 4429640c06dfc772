"""serve.app: how the deployments are sized (fixed, autoscaled, to zero) and bounded."""

from __future__ import annotations

from pathlib import Path

import pytest

from serve.app import build_app, max_queued_requests, model_scaling
from shared.errors import ConfigError


@pytest.fixture
def repository(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    monkeypatch.setenv("TRIGGERFISH_MODEL_REPOSITORY", str(repo))
    monkeypatch.setenv("TRIGGERFISH_ENGINE_CACHE", "")
    monkeypatch.setenv("TRIGGERFISH_ENGINE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("TRIGGERFISH_MODELS", raising=False)
    monkeypatch.delenv("TRIGGERFISH_MAX_INFLIGHT", raising=False)
    return repo


def deployments(args: dict) -> dict:
    from ray.serve._private.build_app import build_app as serve_build

    app = build_app({"models": "mobilenet_v2,text_detector", **args})
    return {d.name: d for d in serve_build(app, name="triggerfish").deployments}


def test_by_default_every_deployment_has_one_fixed_replica(repository: Path) -> None:
    built = deployments({})

    assert set(built) == {"Ingress", "Model_mobilenet_v2", "Model_text_detector"}
    for deployment in built.values():
        assert deployment.num_replicas == 1
        assert deployment._deployment_config.autoscaling_config is None


def test_replicas_apply_to_the_models_and_the_ingress_spread_over_nodes(repository: Path) -> None:
    built = deployments({"replicas": 2, "ingress_replicas": 2, "max_replicas_per_node": 1})

    for deployment in built.values():
        assert deployment.num_replicas == 2
        assert deployment._replica_config.max_replicas_per_node == 1


def test_scale_to_zero_gives_each_model_its_own_autoscaling_from_zero(repository: Path) -> None:
    built = deployments({"replicas": 2, "min_replicas": 0, "max_replicas": 2, "downscale_to_zero_delay_s": 8})

    for name in ("Model_mobilenet_v2", "Model_text_detector"):
        config = built[name]._deployment_config.autoscaling_config
        assert (config.min_replicas, config.max_replicas) == (0, 2)
        assert config.downscale_to_zero_delay_s == 8
        assert config.look_back_period_s <= 8
    # The Ingress never goes to zero: it answers while the models come back.
    assert built["Ingress"]._deployment_config.autoscaling_config is None


def test_ray_s_queue_bound_sits_above_the_ingress_admission_bound(
    repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert max_queued_requests() == 1024  # twice the Ingress's default admission bound (512)
    for deployment in deployments({}).values():
        assert deployment._deployment_config.max_queued_requests == 1024
    monkeypatch.setenv("TRIGGERFISH_MAX_INFLIGHT", "100")
    assert max_queued_requests() == 200
    monkeypatch.setenv("TRIGGERFISH_MAX_INFLIGHT", "lots")
    with pytest.raises(ConfigError, match="TRIGGERFISH_MAX_INFLIGHT.*'lots'"):
        max_queued_requests()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"replicas": 0}, "replicas must be a positive integer, got 0"),
        ({"min_replicas": 3, "max_replicas": 2}, "got 3 and 2"),
        ({"min_replicas": 0, "downscale_to_zero_delay_s": float("nan")}, "got nan"),
    ],
)
def test_bad_sizes_are_refused_with_the_value(args: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        model_scaling(args)
