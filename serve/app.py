"""The Ray Serve application: one ``Ingress`` plus one ``Model_<name>`` deployment per model.

Build with ``serve.app:build_app`` (an application builder: the repository is
listed when the app is built, not when this module is imported)::

    serve run serve.app:build_app
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve import Application

from serve.ingress import Ingress
from serve.model_server import ModelServer
from serve.repository import ModelRepository
from shared.config import load_settings
from shared.errors import ConfigError


def deployment_name(model: str) -> str:
    return f"Model_{model}"


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Build the application for every model in the repository (or ``args["models"]``).

    ``args`` keys: ``models`` (list or comma-separated names), ``num_cpus`` and
    ``num_gpus`` per model replica, ``replicas`` per model, ``ingress_replicas``
    (fetching and decoding scale with these; default ``TRIGGERFISH_INGRESS_REPLICAS`` or 1).
    """
    args = dict(args or {})
    settings = load_settings()
    available = ModelRepository(settings.model_repository, Path(settings.engine_cache_dir)).models()
    wanted = args.get("models") or os.environ.get("TRIGGERFISH_MODELS") or list(available)
    if isinstance(wanted, str):
        wanted = [m.strip() for m in wanted.split(",") if m.strip()]
    missing = [m for m in wanted if m not in available]
    if missing or not wanted:
        raise ConfigError(
            f"models {missing or wanted} are not in repository {settings.model_repository} "
            f"(it has {sorted(available)})"
        )
    actor_options = {
        "num_cpus": float(args.get("num_cpus", 0)),
        "num_gpus": float(args.get("num_gpus", 0)),
    }
    handles = {
        model: serve.deployment(ModelServer)
        .options(
            name=deployment_name(model),
            num_replicas=int(args.get("replicas", 1)),
            ray_actor_options=actor_options,
            max_ongoing_requests=256,
            health_check_period_s=10,
        )
        .bind(model)
        for model in wanted
    }
    ingress_replicas = int(args.get("ingress_replicas", os.environ.get("TRIGGERFISH_INGRESS_REPLICAS", 1)))
    return Ingress.options(num_replicas=ingress_replicas, max_ongoing_requests=512).bind(handles)
