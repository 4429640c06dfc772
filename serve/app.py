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


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Build the application for ``args["models"]``, ``TRIGGERFISH_MODELS`` or every model in the repository.

    Models named but not yet published are served as soon as a version appears.

    ``args`` keys: ``models`` (list or comma-separated names), ``num_cpus`` and
    ``num_gpus`` per model replica, ``replicas`` per model, ``ingress_replicas``
    (fetching and decoding scale with these; default ``TRIGGERFISH_INGRESS_REPLICAS`` or 1).
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
