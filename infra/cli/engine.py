"""``triggerfish build-engine MODEL[:VERSION]``: build and cache an engine ahead of time.

A replica that starts later finds the engine in the cache (local disk or the
shared ``gs://`` level) and loads it instead of building it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from infra.local.stack import DEFAULT_MODEL_REPOSITORY
from serve.engines.build import build_engine
from serve.engines.cache import EngineCache
from serve.model.loader import backend_preference, engine_spec
from serve.model.repository import ModelRepository
from serve.model.validation import calibration_set, validation_set
from serve.model_config import Backend, Precision
from serve.postprocess.factory import make_postprocessor


@contextlib.contextmanager
def _progress(what: str, quiet: bool) -> Iterator[None]:
    """A spinner with the elapsed time on stderr while a lookup or build runs (TensorRT
    builds take minutes); nothing in ``--json`` mode or when stderr is not a terminal."""
    if quiet or not sys.stderr.isatty():
        yield
        return
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        progress.add_task(f"looking up or building the engine for {what}", total=None)
        yield


def cmd_build_engine(args: argparse.Namespace) -> int:
    model, _, version = args.model.partition(":")
    repository = args.repository or os.environ.get(
        "TRIGGERFISH_MODEL_REPOSITORY", str(DEFAULT_MODEL_REPOSITORY)
    )
    cache_dir = Path(args.cache_dir or os.environ.get("TRIGGERFISH_ENGINE_CACHE_DIR", "build/engine-cache"))
    cache_uri = args.cache_uri if args.cache_uri is not None else os.environ.get("TRIGGERFISH_ENGINE_CACHE", "")
    mv = ModelRepository(repository, cache_dir).resolve(model, version or None)
    precision = Precision(args.precision) if args.precision else mv.config.precision
    backend = Backend(args.backend) if args.backend else backend_preference(mv.config.backends)[0]
    spec = engine_spec(mv, make_postprocessor(mv.config.postprocess).output_names)
    cache = EngineCache.from_settings(str(cache_dir), cache_uri)
    reduced = backend is Backend.TENSORRT and precision is not Precision.FP32
    with _progress(f"{mv.name}:{mv.version} on {backend.value} ({precision.value})", quiet=args.json):
        report = build_engine(
            spec,
            backend,
            precision,
            cache,
            calibration=calibration_set(mv, cache_dir) if precision is Precision.INT8 else None,
            validation=validation_set(mv) if reduced else None,
            timing_cache_path=cache_dir / "timing" / "tensorrt.timing-cache",
        )
    data = report.to_dict()
    if args.json:
        print(json.dumps(data))
        return 0
    print(f"{mv.name}:{mv.version} {report.backend_name} precision={data['precision']}")
    print(f"  cache: {report.cache_level} (key {report.key_digest[:16]}, {report.engine_bytes} bytes)")
    print(
        f"  lookup {report.lookup_seconds:.3f}s  build {report.build_seconds:.3f}s  "
        f"load {report.load_seconds:.3f}s"
    )
    if report.accuracy:
        print(f"  accuracy guard: {report.accuracy}")
    for line in report.discarded:
        print(f"  discarded: {line}")
    return 0
