"""The peer: an Apache Beam RunInference pipeline over the same objects.

What a user would write instead of triggerfish: read each ``gs://`` object with
google-cloud-storage, decode it with Pillow (fully, or at reduced scale with
``draft``), run the same ONNX model through ``OnnxModelHandlerNumpy`` on the
DirectRunner (batches of ``--batch-size``, the CPU provider, ONNX Runtime's default
session settings; ``--workers 2`` runs two worker processes), and write one result
JSON per object back to the results bucket.

Runs as a script in the ``bench`` extra's environment (apache-beam pins
libraries that clash with Ray's)::

    python infra/bench/beam_peer.py --model MODEL.onnx --uris FILE --results-bucket B \
        --prefix beam-full [--reduced] [--labels labels.txt] [--batch-size 16] [--workers 2]

Prints one JSON line: ``{"images": N, "seconds": S, "cpu_seconds": C}``: the pipeline's
wall time from construction to teardown (model load included, imports excluded) and
the CPU time of this process and its reaped worker processes over the same span. The
bench runs it once over one object and once over all of them, and times the peer warm
as the difference of the two.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import time
from pathlib import Path

import numpy as np

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
SIZE, RESIZE = 224, 256


def _storage():  # noqa: ANN202 - google.cloud.storage.Client, imported lazily
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    return storage.Client(project="triggerfish-local", credentials=AnonymousCredentials())


def _preprocess(data: bytes, reduced: bool) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        if reduced:
            image.draft("RGB", (RESIZE, RESIZE))
        image = image.convert("RGB")
        w, h = image.size
        scale = RESIZE / min(w, h)
        image = image.resize((max(SIZE, round(w * scale)), max(SIZE, round(h * scale))), Image.BILINEAR)
        w, h = image.size
        left, top = (w - SIZE) // 2, (h - SIZE) // 2
        pixels = np.asarray(image.crop((left, top, left + SIZE, top + SIZE)), dtype=np.float32)
    return ((pixels / 255.0 - MEAN) / STD).transpose(2, 0, 1).astype(np.float32)


def _cpu_seconds() -> float:
    """This process's CPU plus that of its reaped children (the DirectRunner's workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _options(workers: int) -> list[str]:
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    options = ["--runner=DirectRunner"]
    if workers > 1:
        options += [f"--direct_num_workers={workers}", "--direct_running_mode=multi_processing"]
    return options


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--uris", required=True)
    parser.add_argument("--results-bucket", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--labels")
    parser.add_argument("--reduced", action="store_true")
    parser.add_argument("--batch-size", type=int, default=16, help="RunInference's min and max batch size")
    parser.add_argument("--workers", type=int, default=1, help="DirectRunner workers (over 1: processes)")
    return parser.parse_args()


def main() -> int:
    import apache_beam as beam
    from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
    from apache_beam.ml.inference.onnx_inference import OnnxModelHandlerNumpy
    from apache_beam.options.pipeline_options import PipelineOptions

    args = _arguments()
    uris = [u for u in Path(args.uris).read_text().split() if u]
    labels = Path(args.labels).read_text().splitlines() if args.labels else []
    reduced, prefix, results_bucket = args.reduced, args.prefix, args.results_bucket

    class Read(beam.DoFn):
        def setup(self) -> None:
            self.client = _storage()

        def process(self, uri):  # noqa: ANN001, ANN201 - Beam's DoFn signature
            bucket, name = uri[len("gs://") :].split("/", 1)
            data = self.client.bucket(bucket).blob(name).download_as_bytes()
            yield uri, _preprocess(data, reduced)

    class Write(beam.DoFn):
        def setup(self) -> None:
            self.bucket = _storage().bucket(results_bucket)

        def process(self, element):  # noqa: ANN001, ANN201 - Beam's DoFn signature
            uri, prediction = element
            logits = np.asarray(prediction.inference, dtype=np.float32)
            probs = np.exp(logits - logits.max())
            probs /= probs.sum()
            top = np.argsort(probs)[::-1][:5]
            body = {"source": {"uri": uri}, "status": "ok", "labels": [
                {"class_id": int(i), "label": labels[i] if labels else str(i), "score": float(probs[i])}
                for i in top]}  # fmt: skip
            name = f"{prefix}/{uri[len('gs://') :]}.json"
            self.bucket.blob(name).upload_from_string(json.dumps(body), content_type="application/json")
            yield name

    # ``providers`` (plural) is the handler's argument: a misspelt keyword is swallowed by
    # its **kwargs and the default CUDA-first list applies.
    handler = KeyedModelHandler(OnnxModelHandlerNumpy(
        args.model, providers=["CPUExecutionProvider"],
        min_batch_size=args.batch_size, max_batch_size=args.batch_size,
    ))  # fmt: skip
    started, cpu_started = time.perf_counter(), _cpu_seconds()
    with beam.Pipeline(options=PipelineOptions(_options(args.workers))) as p:
        (p | beam.Create(uris) | beam.ParDo(Read()) | RunInference(handler) | beam.ParDo(Write()))
    seconds, cpu = time.perf_counter() - started, _cpu_seconds() - cpu_started
    print(json.dumps({"images": len(uris), "seconds": seconds, "cpu_seconds": cpu, "workers": args.workers}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
