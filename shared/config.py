"""Settings read from the environment, in one place.

Each process calls :func:`load_settings` once (through a cached getter); a bad
value raises :class:`~shared.errors.ConfigError` naming the variable and the
value instead of being replaced by a default.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from shared.errors import ConfigError

ENV_PREFIX = "TRIGGERFISH_"


@dataclass(frozen=True, slots=True)
class Settings:
    """Runtime settings shared by the functions and the Serve application.

    Attributes:
        project: Google Cloud project id (``GOOGLE_CLOUD_PROJECT``).
        serve_url: Base URL of the Serve ingress, e.g. ``http://10.0.0.5:8000``.
        results_bucket: Bucket that receives result JSON.
        allowed_buckets: Source buckets requests may read from.
        default_model: Model used when a request names none.
        model_repository: Local folder or ``gs://bucket/prefix`` holding models.
        engine_cache_uri: ``gs://bucket/prefix`` shared by replicas, or empty for none.
        engine_cache_dir: Local directory for cached engines and fetched models.
        max_image_bytes: Larger objects are rejected as ``image_too_large``.
        max_image_pixels: Larger decoded images are rejected as ``image_too_large``.
        request_timeout_s: How long a function waits for Serve before failing (and retrying);
            in Serve, the deadline of a call that sends no ``x-triggerfish-deadline``.
        max_inflight_inputs: Inputs one ingress replica works on at once (``TRIGGERFISH_MAX_INFLIGHT``).
        max_inflight_bytes: Bytes of bodies, fetched images and tensors one ingress replica
            holds at once (``TRIGGERFISH_MAX_INFLIGHT_BYTES``).
        admission_wait_s: How long a call that does not fit waits in line before it is shed
            with 429 (``TRIGGERFISH_ADMISSION_WAIT_S``; 0 sheds at once).
        decode: Where a model replica decodes images (``TRIGGERFISH_DECODE``): ``auto``
            decodes whole batches on the replica's GPU when it has one, its engine runs on
            CUDA and nvImageCodec and CuPy import, and on the CPU otherwise; ``device``
            requires the GPU path (a version that cannot have it is refused); ``cpu``
            never uses it.
        bulk_min_share: Fraction of the batch slots (model replicas) and of the admission
            budget (ingress replicas) that bulk work keeps while live work could take it all
            (``TRIGGERFISH_BULK_MIN_SHARE``, 0 to 1): a backfill slows under live load, never stops.
        live_headroom: Fraction of the batch queue and of the admission budget that bulk work
            may not fill (``TRIGGERFISH_LIVE_HEADROOM``, 0 to 1): live work finds room at once.
        bulk_batch_while_live: Fraction of a model's ``max_batch_size`` a batch fills with bulk
            items while live work arrives (``TRIGGERFISH_BULK_BATCH_WHILE_LIVE``, 0 to 1): a live
            item waits for shorter batches; a backfill alone keeps full ones.
    """

    project: str = "triggerfish-local"
    serve_url: str = "http://127.0.0.1:8000"
    results_bucket: str = "triggerfish-results"
    allowed_buckets: frozenset[str] = field(default_factory=lambda: frozenset({"triggerfish-images"}))
    default_model: str = "mobilenet_v2"
    model_repository: str = "gs://triggerfish-models"
    engine_cache_uri: str = ""
    engine_cache_dir: str = "/tmp/triggerfish/engines"
    max_image_bytes: int = 25 * 1024 * 1024
    max_image_pixels: int = 60_000_000
    request_timeout_s: float = 60.0
    max_inflight_inputs: int = 512
    max_inflight_bytes: int = 192 * 1024 * 1024
    admission_wait_s: float = 5.0
    decode: str = "auto"
    bulk_min_share: float = 0.1
    live_headroom: float = 0.25
    bulk_batch_while_live: float = 0.125


#: The values ``TRIGGERFISH_DECODE`` takes.
DECODE_MODES = ("auto", "device", "cpu")


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 1) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError as err:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from err
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {raw!r}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, allow_zero: bool = False) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError as err:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from err
    if not math.isfinite(value) or not (value >= 0 if allow_zero else value > 0):
        raise ConfigError(
            f"{name} must be {'non-negative' if allow_zero else 'positive'} and finite, got {raw!r}"
        )
    return value


def _fraction(env: Mapping[str, str], name: str, default: float) -> float:
    value = _float(env, name, default, allow_zero=True)
    if value > 1:
        raise ConfigError(f"{name} must be a fraction between 0 and 1, got {env.get(name)!r}")
    return value


def _url(env: Mapping[str, str], name: str, default: str) -> str:
    raw = env.get(name) or default
    if not raw.startswith(("http://", "https://")):
        raise ConfigError(f"{name} must be an http(s) URL, got {raw!r}")
    return raw.rstrip("/")


def _buckets(env: Mapping[str, str], name: str, default: frozenset[str]) -> frozenset[str]:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    names = frozenset(b.strip() for b in raw.split(",") if b.strip())
    if not names:
        raise ConfigError(f"{name} must list at least one bucket, got {raw!r}")
    return names


def _gs_or_path(env: Mapping[str, str], name: str, default: str, allow_empty: bool) -> str:
    raw = env.get(name, default)
    if raw == "" and allow_empty:
        return raw
    if raw.startswith("gs://") and len(raw.rstrip("/")) > len("gs://"):
        return raw.rstrip("/")
    if raw.startswith("/") or raw.startswith("."):
        return raw
    raise ConfigError(f"{name} must be a gs:// prefix or a filesystem path, got {raw!r}")


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value not in choices:
        raise ConfigError(f"{name} must be one of {'|'.join(choices)}, got {raw!r}")
    return value


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Build :class:`Settings` from ``env`` (default: ``os.environ``)."""
    env = os.environ if env is None else env
    d = Settings()
    p = ENV_PREFIX
    return Settings(
        project=env.get("GOOGLE_CLOUD_PROJECT") or d.project,
        serve_url=_url(env, p + "SERVE_URL", d.serve_url),
        results_bucket=env.get(p + "RESULTS_BUCKET") or d.results_bucket,
        allowed_buckets=_buckets(env, p + "ALLOWED_BUCKETS", d.allowed_buckets),
        default_model=env.get(p + "DEFAULT_MODEL") or d.default_model,
        model_repository=_gs_or_path(env, p + "MODEL_REPOSITORY", d.model_repository, False),
        engine_cache_uri=_gs_or_path(env, p + "ENGINE_CACHE", d.engine_cache_uri, True),
        engine_cache_dir=env.get(p + "ENGINE_CACHE_DIR") or d.engine_cache_dir,
        max_image_bytes=_int(env, p + "MAX_IMAGE_BYTES", d.max_image_bytes),
        max_image_pixels=_int(env, p + "MAX_IMAGE_PIXELS", d.max_image_pixels),
        request_timeout_s=_float(env, p + "REQUEST_TIMEOUT_S", d.request_timeout_s),
        max_inflight_inputs=_int(env, p + "MAX_INFLIGHT", d.max_inflight_inputs),
        max_inflight_bytes=_int(env, p + "MAX_INFLIGHT_BYTES", d.max_inflight_bytes),
        admission_wait_s=_float(env, p + "ADMISSION_WAIT_S", d.admission_wait_s, allow_zero=True),
        decode=_choice(env, p + "DECODE", d.decode, DECODE_MODES),
        bulk_min_share=_fraction(env, p + "BULK_MIN_SHARE", d.bulk_min_share),
        live_headroom=_fraction(env, p + "LIVE_HEADROOM", d.live_headroom),
        bulk_batch_while_live=_fraction(env, p + "BULK_BATCH_WHILE_LIVE", d.bulk_batch_while_live),
    )
