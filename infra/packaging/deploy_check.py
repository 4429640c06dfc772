"""After ``terraform apply``: check what only the cloud can show (``make deploy-check``).

Run from the repository root on the machine that ran Terraform (it reads
``terraform output -json`` and calls ``gcloud`` and ``kubectl`` with your
credentials). Each check prints one line, ``ok`` or ``FAIL``, with what it saw;
the exit status is 1 if any check failed.

1. **serve address**: the Serve Service's load balancer holds the address
   Terraform reserved, the one the functions are configured to call.
2. **rayservice ready**: the RayService's ``Ready`` condition is ``True``.
3. **functions**: each function's ``maxInstanceRequestConcurrency`` and gunicorn
   ``THREADS`` are what Terraform asked for (the footprint's request
   concurrency), and so is its timeout.
4. **round trip**: ``infra/samples/cat.jpg`` is uploaded to the images bucket
   under ``deploy-check/``; the upload notification, ``on_upload`` and Serve
   must write an ``ok`` result at ``MODEL/IMAGES_BUCKET/deploy-check/ID.jpg.json``
   within ``--timeout`` (default 20 minutes: long enough for a cold start from
   zero GPU nodes). Both objects are removed afterwards.
5. **engine sources** (reported, never a failure): where each model replica
   got its engine from, read from the replicas' log lines
   (``engine for MODEL/VERSION from LEVEL``); ``built`` means a TensorRT build
   ran (the first load of a version on a GPU type), ``gcs`` a download from the
   engine cache.

The parsing functions are unit-tested against recorded command outputs
(``tests/unit/infra/packaging/test_deploy_check.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
SAMPLE = REPO_ROOT / "infra" / "samples" / "cat.jpg"
CHECK_PREFIX = "deploy-check"

_ENGINE_SOURCE = re.compile(r"engine for (\S+) from (memory|disk|gcs|shared|built)\b")


class CommandError(RuntimeError):
    """A command exited non-zero; the message holds its argv and stderr."""


#: Runs one command and returns its standard output; raises CommandError on failure.
Runner = Callable[[list[str]], str]


def run_command(argv: list[str]) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    if result.returncode != 0:
        raise CommandError(f"{' '.join(argv)}: exit {result.returncode}: {result.stderr.strip()}")
    return result.stdout


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'} {self.name}: {self.detail}"


@dataclass(frozen=True, slots=True)
class Deployment:
    """What Terraform says it deployed (``terraform output -json``)."""

    project_id: str
    region: str
    serve_address: str
    default_model: str
    request_concurrency: int
    threads: str
    function_timeout_s: Mapping[str, int]
    functions: Mapping[str, str]
    buckets: Mapping[str, str]
    namespace: str
    rayservice: str
    serve_service: str
    cluster: str
    cluster_location: str


def parse_outputs(text: str) -> Deployment:
    """``terraform output -json`` -> :class:`Deployment`; a missing output is named."""
    raw = json.loads(text)

    def value(name: str) -> Any:
        if name not in raw:
            raise KeyError(f"terraform output {name!r} is missing: run terraform apply first")
        return raw[name]["value"]

    check, ray, gke = value("deploy_check"), value("rayservice"), value("gke_cluster")
    return Deployment(
        project_id=check["project_id"],
        region=check["region"],
        serve_address=check["serve_address"],
        default_model=check["default_model"],
        request_concurrency=int(check["request_concurrency"]),
        threads=str(check["threads"]),
        function_timeout_s={k: int(v) for k, v in check["function_timeout_s"].items()},
        functions=dict(value("functions")),
        buckets=dict(value("buckets")),
        namespace=ray["namespace"],
        rayservice=ray["name"],
        serve_service=ray["serve_service"],
        cluster=gke["name"],
        cluster_location=gke["location"],
    )


def check_serve_address(service: Mapping[str, Any], expected: str) -> Check:
    """The Service's load balancer ingress IPs (``kubectl get svc -o json``) hold ``expected``."""
    name = f"serve address ({service.get('metadata', {}).get('name', '?')})"
    ingress = service.get("status", {}).get("loadBalancer", {}).get("ingress") or []
    addresses = [entry.get("ip") for entry in ingress if entry.get("ip")]
    if not addresses:
        return Check(name, False, f"no load balancer address yet; expected {expected}")
    if expected not in addresses:
        return Check(name, False, f"got {', '.join(addresses)}, reserved {expected}")
    return Check(name, True, f"{expected} (reserved)")


def check_rayservice_ready(rayservice: Mapping[str, Any]) -> Check:
    """The RayService's ``Ready`` condition (KubeRay >= 1.3) is ``True``."""
    name = f"rayservice {rayservice.get('metadata', {}).get('name', '?')}"
    conditions = rayservice.get("status", {}).get("conditions") or []
    ready = [c for c in conditions if c.get("type") == "Ready"]
    if not ready:
        return Check(name, False, "no Ready condition reported yet")
    condition = ready[0]
    detail = f"Ready={condition.get('status')} ({condition.get('reason', 'no reason')})"
    return Check(name, condition.get("status") == "True", detail)


def check_function(
    function: Mapping[str, Any], concurrency: int, threads: str, timeout_s: int
) -> Check:
    """``gcloud functions describe --format=json`` (Cloud Functions v2) against Terraform's."""
    name = f"function {function.get('name', '?').rsplit('/', 1)[-1]}"
    service = function.get("serviceConfig", {})
    seen = {
        "concurrency": service.get("maxInstanceRequestConcurrency"),
        "THREADS": (service.get("environmentVariables") or {}).get("THREADS"),
        "timeout": service.get("timeoutSeconds"),
    }
    wanted = {"concurrency": concurrency, "THREADS": threads, "timeout": timeout_s}
    wrong = [f"{k} {seen[k]!r} (want {wanted[k]!r})" for k in wanted if seen[k] != wanted[k]]
    if wrong:
        return Check(name, False, "; ".join(wrong))
    return Check(name, True, f"{concurrency} events at once on {threads} threads, {timeout_s}s")


def check_result(text: str, model: str) -> Check:
    """A result object's JSON: ``ok``, from ``model``, with the backend that served it."""
    try:
        result = json.loads(text)
    except ValueError as err:
        return Check("round trip", False, f"result is not JSON: {err}")
    status = result.get("status")
    served = (result.get("model") or {}).get("name")
    version = (result.get("model") or {}).get("version")
    backend = result.get("backend")
    detail = f"status {status}, {served}/{version} on {backend}"
    if result.get("engine_source"):  # where the replica's engine came from, when results carry it
        detail += f" (engine from {result['engine_source']})"
    if status != "ok":
        error = result.get("error") or {}
        return Check("round trip", False, f"{detail}: {error.get('reason')} {error.get('message')}")
    if served != model:
        return Check("round trip", False, f"{detail}; expected model {model}")
    return Check("round trip", True, detail)


def engine_sources(log_text: str) -> dict[str, list[str]]:
    """``MODEL/VERSION`` -> the cache levels its engines came from, in log order."""
    sources: dict[str, list[str]] = {}
    for match in _ENGINE_SOURCE.finditer(log_text):
        sources.setdefault(match.group(1), []).append(match.group(2))
    return sources


def engine_sources_check(log_text: str) -> Check:
    sources = engine_sources(log_text)
    if not sources:
        return Check(
            "engine sources", True, "no engine loaded in the logs kept (replicas at zero?)"
        )
    parts = [f"{model} from {', '.join(levels)}" for model, levels in sorted(sources.items())]
    return Check("engine sources", True, "; ".join(parts))


def round_trip(
    run: Runner,
    deployment: Deployment,
    timeout_s: float,
    poll_s: float = 15.0,
    sleep: Callable[[float], None] | None = None,
    clock: Callable[[], float] | None = None,
    sample: Path = SAMPLE,
) -> Check:
    """Upload the sample image and wait for its result object."""
    sleep, clock = sleep or time.sleep, clock or time.monotonic
    images, results = deployment.buckets["images"], deployment.buckets["results"]
    name = f"{CHECK_PREFIX}/{uuid.uuid4().hex}{sample.suffix}"
    source = f"gs://{images}/{name}"
    result = f"gs://{results}/{deployment.default_model}/{images}/{name}.json"
    run(["gcloud", "storage", "cp", str(sample), source, f"--project={deployment.project_id}"])
    started = clock()
    try:
        while True:
            try:
                text = run(
                    ["gcloud", "storage", "cat", result, f"--project={deployment.project_id}"]
                )
            except CommandError:
                if clock() - started > timeout_s:
                    return Check("round trip", False, f"no {result} after {timeout_s:.0f}s")
                sleep(poll_s)
                continue
            check = check_result(text, deployment.default_model)
            return Check(check.name, check.ok, f"{check.detail} in {clock() - started:.0f}s")
    finally:
        for url in (source, result):
            with contextlib.suppress(CommandError):  # never written, or already gone
                run(["gcloud", "storage", "rm", url, f"--project={deployment.project_id}"])


def _guarded(name: str, check: Callable[[], Check]) -> Check:
    """A command that fails is the check's failure, not the end of the run."""
    try:
        return check()
    except (CommandError, ValueError, KeyError) as err:
        return Check(name, False, str(err))


def run_checks(run: Runner, deployment: Deployment, timeout_s: float) -> list[Check]:
    d = deployment
    run(["gcloud", "container", "clusters", "get-credentials", d.cluster,
         f"--location={d.cluster_location}", f"--project={d.project_id}"])  # fmt: skip
    kubectl = ["kubectl", "-n", d.namespace]

    def get(kind: str, name: str) -> dict[str, Any]:
        return json.loads(run([*kubectl, "get", kind, name, "-o", "json"]))

    def function(key: str, name: str) -> Check:
        described = run(["gcloud", "functions", "describe", name, f"--region={d.region}",
                         f"--project={d.project_id}", "--format=json"])  # fmt: skip
        return check_function(
            json.loads(described), d.request_concurrency, d.threads, d.function_timeout_s[key]
        )

    def logs() -> Check:
        text = run([*kubectl, "logs", "-l", "ray.io/node-type=worker", "--tail=-1", "--prefix"])
        return engine_sources_check(text)

    checks = [
        _guarded("serve address", lambda: check_serve_address(get("service", d.serve_service), d.serve_address)),
        _guarded("rayservice", lambda: check_rayservice_ready(get("rayservice", d.rayservice))),
    ]  # fmt: skip
    for key, name in sorted(d.functions.items()):
        checks.append(_guarded(f"function {name}", lambda k=key, n=name: function(k, n)))
    checks.append(_guarded("round trip", lambda: round_trip(run, d, timeout_s)))
    checks.append(_guarded("engine sources", logs))
    return checks


def main(argv: list[str] | None = None, run: Runner = run_command) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--terraform-dir", default="terraform", help="the root module's folder")
    parser.add_argument(
        "--timeout", type=float, default=1200.0, help="seconds to wait for the round trip's result"
    )
    args = parser.parse_args(argv)
    deployment = parse_outputs(
        run(["terraform", f"-chdir={args.terraform_dir}", "output", "-json"])
    )
    checks = run_checks(run, deployment, args.timeout)
    sys.stdout.write("".join(check.line() + "\n" for check in checks))
    return 0 if all(check.ok for check in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
