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

from infra.cli import client as _cli_client
from infra.cli import stack as _cli_stack


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
    up.add_argument("--replicas", type=_at_least_one, default=1,
                    help="replicas of every model deployment and of the Ingress (default 1)")  # fmt: skip
    up.add_argument("--nodes", type=_at_least_one, default=1,
                    help="Ray nodes on this machine: the head plus NODES-1 `ray start` workers (default 1)")  # fmt: skip
    up.add_argument("--scale-to-zero", action="store_true",
                    help="model deployments go to zero replicas when idle and come back on the first call")  # fmt: skip
    up.add_argument("--idle-delay", type=float, default=15.0, metavar="SECONDS",
                    help="with --scale-to-zero: idle time before a model's last replica stops (default 15)")  # fmt: skip
    up.add_argument("--data-plane", choices=("direct", "proxy", "haproxy"), default=None,
                    help="direct: Ingress replicas serve HTTP themselves (default on one node); haproxy: the "
                         "cloud's HAProxy in front of them (default on several nodes); proxy: Serve's proxy actor")  # fmt: skip
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

    results = sub.add_parser(
        "results", parents=[common],
        help="print the stored result of an object, or (without one) result events as they arrive",
    )  # fmt: skip
    results.add_argument("uri", nargs="?", metavar="gs://BUCKET/OBJECT", help="print this object's stored result")
    results.add_argument("--model", help="the result of this model; without a URI: only its events")
    results.add_argument("--follow", action="store_true", help="keep printing events until Ctrl-C")
    results.add_argument("--status", choices=("ok", "error"), help="only events of results with this status")
    results.add_argument("--prefix", metavar="gs://BUCKET/PREFIX", help="only events whose source or result URI starts so")
    results.add_argument("--max", type=_at_least_one, help="stop after this many events")
    events_target = results.add_argument_group("real project (default: the running local stack)")
    events_target.add_argument("--project", help="project id (Application Default Credentials)")
    events_target.add_argument("--terraform-dir", help="read the subscription name from terraform output")
    events_target.add_argument("--subscription", help="results pull subscription (default: the footprint's)")
    results.set_defaults(func=_cli_client.cmd_results)

    env = sub.add_parser(
        "env", parents=[common], help="print export lines that point gcloud and the client libraries at the stack"
    )
    env.add_argument("--unset", action="store_true", help="print the line that undoes them")
    env.set_defaults(func=_lazy("infra.cli.env", "cmd_env"))

    demo = sub.add_parser("demo", parents=[common], help="start the stack, run samples through all entry paths, stop")
    demo.set_defaults(func=_lazy("infra.cli.demo", "cmd_demo"))

    bench = sub.add_parser("bench", parents=[common], help="every entry path vs a Beam RunInference peer")
    bench.add_argument("--images", type=int, default=1000, help="small JPEGs per path (enough for seconds of steady state)")
    bench.add_argument("--large-images", type=int, default=120, help="12 MP JPEGs per path")
    bench.add_argument("--per-message", type=int, default=16, help="URIs per message / per HTTP call")
    bench.add_argument("--http-in-flight", type=int, default=4, help="HTTP calls in flight")
    bench.add_argument("--small-only", action="store_true", help="skip the 12 MP photos")
    bench.add_argument("--no-beam", action="store_true", help="skip the Beam peer")
    bench.add_argument("--out", help="also write the report as JSON to this file")
    bench.set_defaults(func=_lazy("infra.bench.entry_paths", "cmd_bench"))

    _add_backfill_commands(sub, common)

    build = sub.add_parser("build-engine", parents=[common], help="build and cache an engine ahead of time")
    build.add_argument("model", metavar="MODEL[:VERSION]")
    build.add_argument("--precision", choices=["fp32", "fp16", "int8"])
    build.add_argument("--backend", choices=["onnxruntime", "tensorrt"], default=None)
    build.add_argument("--repository", help="model repository (default: build/model-repository)")
    build.add_argument("--cache-dir", help="local engine cache directory")
    build.add_argument("--cache-uri", help="shared gs:// engine cache prefix")
    build.set_defaults(func=_lazy("infra.cli.engine", "cmd_build_engine"))
    return parser


def _target_options() -> argparse.ArgumentParser:
    """Flags that point a command at a real project instead of the local stack."""
    target = argparse.ArgumentParser(add_help=False)
    group = target.add_argument_group("real project (default: the running local stack)")
    group.add_argument("--project", help="project id (Application Default Credentials)")
    group.add_argument("--terraform-dir", help="read topic, bucket and subscription names from terraform output")
    group.add_argument("--topic", help="requests topic (default: terraform output topics.requests)")
    group.add_argument("--results-bucket", help="results bucket (default: terraform output buckets.results)")
    group.add_argument("--repository", help="model repository gs://BUCKET[/PREFIX] (default: the models bucket)")
    group.add_argument("--dead-letter-subscription", help="default: terraform output subscriptions.dead_letter")
    return target


def _add_backfill_commands(sub, common: argparse.ArgumentParser) -> None:  # noqa: ANN001
    target = _target_options()
    submit = sub.add_parser(
        "submit", parents=[common, target], help="backfill: run a model over a bucket prefix or a list of URIs"
    )
    submit.add_argument("source", nargs="?", metavar="gs://BUCKET[/PREFIX]")
    submit.add_argument("--list", metavar="FILE", help="file of gs:// URIs, one per line")
    submit.add_argument("--model", help="model (default: the default model)")
    submit.add_argument("--version", help="model version (default: the newest in the repository)")
    submit.add_argument("--per-message", type=int, default=16, help="URIs per request message (1-100)")
    submit.add_argument(
        "--max-in-flight", type=int, default=1000,
        help="most images published but without a result yet (the window below it follows Serve's bulk sheds)",
    )  # fmt: skip
    submit.add_argument(
        "--priority", choices=("bulk", "live"), default="bulk",
        help="traffic class: bulk (default: the bulk topic, after live work, shed first) or live",
    )  # fmt: skip
    submit.add_argument("--dry-run", action="store_true", help="say what would be published, publish nothing")
    submit.add_argument("--no-wait", action="store_true", help="exit once everything is published")
    submit.add_argument("--timeout", type=float, default=600, help="stop waiting after this many seconds without a new result")
    submit.add_argument("--poll", type=float, default=1.0, help="seconds between listings of the results bucket")
    submit.add_argument(
        "--resubmit-after", type=float, default=1800,
        help="seconds after which objects an earlier run published without a result are published again",
    )  # fmt: skip
    submit.set_defaults(func=_lazy("infra.cli.backfill", "cmd_submit"))

    dlq = sub.add_parser("dlq", help="dead letters: list or replay").add_subparsers(dest="dlq_command", required=True)
    listing = dlq.add_parser("list", parents=[common, target], help="show dead letters without consuming them")
    listing.add_argument("--max", type=int, default=100, help="at most this many messages")
    listing.add_argument("--subscription", help="dead-letter subscription (default: the footprint's)")
    listing.add_argument("--from", dest="source", metavar="SUBSCRIPTION", help="only dead letters of this subscription")
    listing.set_defaults(func=_lazy("infra.cli.dlq", "cmd_dlq_list"))
    again = dlq.add_parser(
        "replay", parents=[common, target],
        help="republish dead letters as bulk work (the bulk topic), or to their original topics",
    )  # fmt: skip
    again.add_argument(
        "--to", choices=("bulk", "origin"), default="bulk",
        help="bulk: the bulk topic, handled after live work (default); origin: the topic each message came from",
    )  # fmt: skip
    again.add_argument("--max", type=int, default=None, help="at most this many messages (default: all)")
    again.add_argument("--subscription", help="dead-letter subscription (default: the footprint's)")
    again.add_argument("--from", dest="source", metavar="SUBSCRIPTION", help="only dead letters of this subscription")
    again.set_defaults(func=_lazy("infra.cli.dlq", "cmd_dlq_replay"))


def _lazy(module: str, name: str) -> Callable[[argparse.Namespace], Any]:
    def run(args: argparse.Namespace) -> Any:
        import importlib

        return getattr(importlib.import_module(module), name)(args)

    return run


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


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
