"""``triggerfish``: run the local stack and talk to it.

Every command accepts ``--json`` for machine output and exits non-zero with a
one-line reason when something is wrong.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from infra import _cli_client, _cli_stack


class CliError(Exception):
    """A one-line reason to exit non-zero."""


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="machine-readable output")
    parser = argparse.ArgumentParser(prog="triggerfish", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", parents=[common], help="start the local stack (foreground until Ctrl-C)")
    up.add_argument("--detach", action="store_true", help="run in the background; stop with 'down'")
    up.add_argument("--serve-port", type=int, default=0, help="Serve HTTP port (default: a free one)")
    up.set_defaults(func=_cli_stack.cmd_up)
    sub.add_parser("down", parents=[common], help="stop a detached stack").set_defaults(func=_cli_stack.cmd_down)
    sub.add_parser("status", parents=[common], help="show the running stack").set_defaults(
        func=_cli_stack.cmd_status
    )

    upload = sub.add_parser("upload", parents=[common], help="upload images to the images bucket")
    upload.add_argument("files", nargs="+")
    upload.add_argument("--model", help="model to run (object metadata triggerfish-model)")
    upload.add_argument("--wait", action="store_true", help="wait for and print each result")
    upload.add_argument("--timeout", type=float, default=120)
    upload.set_defaults(func=_cli_client.cmd_upload)

    publish = sub.add_parser("publish", parents=[common], help="publish a request message")
    publish.add_argument("uris", nargs="+", metavar="gs://BUCKET/OBJECT")
    publish.add_argument("--model")
    publish.add_argument("--version")
    publish.add_argument("--wait", action="store_true")
    publish.add_argument("--timeout", type=float, default=120)
    publish.set_defaults(func=_cli_client.cmd_publish)

    infer = sub.add_parser("infer", parents=[common], help="call Serve's HTTP endpoint directly")
    infer.add_argument("target", metavar="FILE|gs://BUCKET/OBJECT")
    infer.add_argument("--model")
    infer.add_argument("--version")
    infer.set_defaults(func=_cli_client.cmd_infer)

    results = sub.add_parser("results", parents=[common], help="print a stored result JSON")
    results.add_argument("uri", metavar="gs://BUCKET/OBJECT")
    results.add_argument("--model")
    results.set_defaults(func=_cli_client.cmd_results)

    demo = sub.add_parser("demo", parents=[common], help="start the stack, run samples through all entry paths, stop")
    demo.set_defaults(func=_lazy("infra.demo", "cmd_demo"))

    bench = sub.add_parser("bench", parents=[common], help="every entry path vs a Beam RunInference peer")
    bench.add_argument("--images", type=int, default=300, help="small JPEGs per path")
    bench.add_argument("--large-images", type=int, default=120, help="12 MP JPEGs per path")
    bench.add_argument("--per-message", type=int, default=16, help="URIs per message / per HTTP call")
    bench.add_argument("--http-in-flight", type=int, default=4, help="HTTP calls in flight")
    bench.add_argument("--small-only", action="store_true", help="skip the 12 MP photos")
    bench.add_argument("--no-beam", action="store_true", help="skip the Beam peer")
    bench.add_argument("--out", help="also write the report as JSON to this file")
    bench.set_defaults(func=_lazy("infra.bench", "cmd_bench"))

    build = sub.add_parser("build-engine", parents=[common], help="build and cache an engine ahead of time")
    build.add_argument("model", metavar="MODEL[:VERSION]")
    build.add_argument("--precision", choices=["fp32", "fp16", "int8"])
    build.add_argument("--backend", choices=["onnxruntime", "tensorrt"], default=None)
    build.add_argument("--repository", help="model repository (default: build/model-repository)")
    build.add_argument("--cache-dir", help="local engine cache directory")
    build.add_argument("--cache-uri", help="shared gs:// engine cache prefix")
    build.set_defaults(func=_lazy("infra._cli_engine", "cmd_build_engine"))
    return parser


def _lazy(module: str, name: str) -> Callable[[argparse.Namespace], Any]:
    def run(args: argparse.Namespace) -> Any:
        import importlib

        return getattr(importlib.import_module(module), name)(args)

    return run


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # noqa: BLE001 - the CLI's contract: one line, non-zero exit
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        if getattr(args, "json", False):
            print(json.dumps({"error": reason, "type": type(err).__name__}))
        else:
            print(f"triggerfish {args.command}: {reason}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
