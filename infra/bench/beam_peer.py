"""The peer: an Apache Beam RunInference pipeline over the same objects.

What a user would write instead of triggerfish: read each ``gs://`` object with
google-cloud-storage, decode it with Pillow (fully, or at reduced scale with
``draft``), run the same ONNX model through ``OnnxModelHandlerNumpy`` on the
DirectRunner, and write one result JSON per object back to the bucket.

Runs as a script in the ``bench`` extra's environment (apache-beam pins
libraries that clash with Ray's)::

    python infra/bench/beam_peer.py --model MODEL.onnx --uris FILE --results-bucket B \
        --prefix beam-full [--reduced] [--labels labels.txt]

Prints one JSON line: ``{"images": N, "seconds": S, "cpu_seconds": C}`` (the pipeline's
wall and CPU time, imports excluded).
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import numpy as np

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
SIZE, RESIZE = 224, 256


def _storage():
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


def main() -> int:
    import apache_beam as beam
    from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
    from apache_beam.ml.inference.onnx_inference import OnnxModelHandlerNumpy

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--uris", required=True)
    parser.add_argument("--results-bucket", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--labels")
    parser.add_argument("--reduced", action="store_true")
    args = parser.parse_args()
    uris = [u for u in Path(args.uris).read_text().split() if u]
    labels = Path(args.labels).read_text().splitlines() if args.labels else []

    class Read(beam.DoFn):
        def setup(self):
            self.client = _storage()

        def process(self, uri):
            bucket, name = uri[len("gs://"):].split("/", 1)
            data = self.client.bucket(bucket).blob(name).download_as_bytes()
            yield uri, _preprocess(data, args.reduced)

    class Write(beam.DoFn):
        def setup(self):
            self.bucket = _storage().bucket(args.results_bucket)

        def process(self, element):
            uri, prediction = element
            logits = np.asarray(prediction.inference, dtype=np.float32)
            probs = np.exp(logits - logits.max())
            probs /= probs.sum()
            top = np.argsort(probs)[::-1][:5]
            body = {"source": {"uri": uri}, "status": "ok", "labels": [
                {"class_id": int(i), "label": labels[i] if labels else str(i), "score": float(probs[i])}
                for i in top]}  # fmt: skip
            name = f"{args.prefix}/{uri[len('gs://'):]}.json"
            self.bucket.blob(name).upload_from_string(json.dumps(body), content_type="application/json")
            yield name

    handler = KeyedModelHandler(OnnxModelHandlerNumpy(args.model, provider=["CPUExecutionProvider"]))
    started, cpu_started = time.perf_counter(), time.process_time()
    with beam.Pipeline(options=beam.options.pipeline_options.PipelineOptions(["--runner=DirectRunner"])) as p:
        (p | beam.Create(uris) | beam.ParDo(Read()) | RunInference(handler) | beam.ParDo(Write()))
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    print(json.dumps({"images": len(uris), "seconds": seconds, "cpu_seconds": cpu}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
