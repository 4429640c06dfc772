"""The Ray Serve application: one ``Ingress`` plus one ``Model_<name>`` deployment per model.

Build with ``serve.app:build_app`` (an application builder: the repository is
listed when the app is built, not when this module is imported)::

    serve run serve.app:build_app
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve import Application

from serve.http.ingress import Ingress
from serve.model.model_server import ModelServer
from serve.model.repository import ModelRepository
from shared.config import load_settings
from shared.errors import ConfigError

_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def deployment_name(model: str) -> str:
    return f"Model_{model}"


# A model deployment's autoscaling window when it may scale to zero: short, so that an idle
# model is noticed within seconds rather than Serve's default 30 s average.
SCALE_TO_ZERO_LOOK_BACK_S = 5.0


def ingress_admission_bound() -> int:
    """Inputs one Ingress replica admits at once (``TRIGGERFISH_MAX_INFLIGHT``, as the Ingress reads it)."""
    return load_settings().max_inflight_inputs


def max_queued_requests() -> int:
    """Ray's own queue bound per deployment: twice the Ingress's admission bound.

    Every input the Ingress admits is at most one queued call to a model (the
    coalescer merges most of them), so Ray's queue never refuses admitted work; it
    only stops a runaway caller that bypasses the Ingress (or a model at zero
    replicas collecting calls while it starts) from growing memory without bound.
    The Ingress's own 429 with ``Retry-After`` answers first.
    """
    return 2 * ingress_admission_bound()


def model_scaling(args: dict[str, Any]) -> dict[str, Any]:
    """Deployment options that size a model deployment: a fixed count, or autoscaling.

    ``min_replicas`` (0 lets an idle model scale to zero), ``max_replicas`` (default
    ``replicas``) and ``downscale_to_zero_delay_s`` (how long an idle model keeps its
    last replica) select Serve's autoscaling; without them ``replicas`` is fixed.
    """
    replicas = _positive_int(args.get("replicas", 1), "replicas")
    if "min_replicas" not in args:
        return {"num_replicas": replicas}
    low = int(args["min_replicas"])
    high = _positive_int(args.get("max_replicas", max(replicas, 1)), "max_replicas")
    if not 0 <= low <= high:
        raise ConfigError(f"need 0 <= min_replicas <= max_replicas, got {low} and {high}")
    delay = float(args.get("downscale_to_zero_delay_s", 600.0))
    if not delay >= 0:  # NaN fails too
        raise ConfigError(f"downscale_to_zero_delay_s must be >= 0, got {delay!r}")
    config: dict[str, Any] = {
        "min_replicas": low,
        "max_replicas": high,
        "downscale_to_zero_delay_s": delay,
        # Scaling between 1 and max follows the same idle delay: locally the point is to
        # see a model leave and come back, not to damp a fleet's oscillation.
        "downscale_delay_s": delay,
        "upscale_delay_s": 1.0,
        "look_back_period_s": min(SCALE_TO_ZERO_LOOK_BACK_S, max(delay, 2.0)),
        # Ray wants the window longer than the metrics interval (10 s by default).
        "metrics_interval_s": 1.0,
    }
    return {"num_replicas": "auto", "autoscaling_config": config}


def _positive_int(value: Any, name: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}") from err
    if number < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return number


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Build the application for ``args["models"]``, ``TRIGGERFISH_MODELS`` or every model in the repository.

    Models named but not yet published are served as soon as a version appears.

    ``args`` keys: ``models`` (list or comma-separated names), ``num_cpus`` and
    ``num_gpus`` per model replica, ``replicas`` per model, ``ingress_replicas``
    (fetching and decoding scale with these; default ``TRIGGERFISH_INGRESS_REPLICAS`` or 1),
    ``min_replicas``/``max_replicas``/``downscale_to_zero_delay_s`` (model autoscaling,
    see :func:`model_scaling`), ``max_replicas_per_node`` (spreads the replicas of
    every deployment over the nodes), ``resources`` (custom Ray resources each
    replica needs).
    """
    args = dict(args or {})
    settings = load_settings()
    wanted = args.get("models") or os.environ.get("TRIGGERFISH_MODELS")
    if not wanted:
        # Every model in the repository, or the default model while it is still empty:
        # the replicas start anyway and pick their first version up when it is published.
        available = ModelRepository(settings.model_repository, Path(settings.engine_cache_dir)).models()
        wanted = sorted(available) or [settings.default_model]
    if isinstance(wanted, str):
        wanted = [m.strip() for m in wanted.split(",") if m.strip()]
    bad = [m for m in wanted if not _MODEL_NAME.fullmatch(m)]
    if bad or not wanted:
        raise ConfigError(f"TRIGGERFISH_MODELS must name models ([A-Za-z0-9][A-Za-z0-9._-]*), got {wanted!r}")
    resources = {str(k): float(v) for k, v in dict(args.get("resources") or {}).items()}
    actor_options: dict[str, Any] = {
        "num_cpus": float(args.get("num_cpus", 0)),
        "num_gpus": float(args.get("num_gpus", 0)),
    }
    placement: dict[str, Any] = {"max_queued_requests": max_queued_requests()}
    if args.get("max_replicas_per_node"):
        placement["max_replicas_per_node"] = _positive_int(args["max_replicas_per_node"], "max_replicas_per_node")
    if resources:
        actor_options["resources"] = resources
    handles = {
        model: serve.deployment(ModelServer)
        .options(
            name=deployment_name(model),
            ray_actor_options=actor_options,
            max_ongoing_requests=256,
            health_check_period_s=10,
            **model_scaling(args),
            **placement,
        )
        .bind(model)
        for model in wanted
    }
    ingress_replicas = int(args.get("ingress_replicas", os.environ.get("TRIGGERFISH_INGRESS_REPLICAS", 1)))
    if resources:
        placement["ray_actor_options"] = {"num_cpus": 0, "resources": resources}
    return Ingress.options(num_replicas=ingress_replicas, max_ongoing_requests=512, **placement).bind(handles)
