"""``triggerfish upload | publish | infer | results``  (result events: :mod:`infra.cli.result_events`)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from infra.local.client import StackClient
from infra.local.stack import DEFAULT_STATE_DIR, StackState


def _client() -> StackClient:
    return StackClient(StackState.load(Path(os.environ.get("TRIGGERFISH_STATE_DIR", str(DEFAULT_STATE_DIR)))))


def _summary(result: dict[str, Any]) -> str:
    if result.get("status") == "ok":
        if result.get("labels"):
            top = result["labels"][0]
            what = f"{top['label']} ({top['score']:.3f})"
        else:
            what = f"{len(result.get('detections') or [])} detections"
        ms = (result.get("timings") or {}).get("end_to_end_ms")
        return f"ok  {result['source']['uri']}  {what}  {ms} ms  -> {result.get('result_uri')}"
    err = result.get("error") or {}
    return f"error  {result.get('source', {}).get('uri')}  {err.get('reason')}: {err.get('message')}"


def _emit(args: argparse.Namespace, payload: Any, lines: list[str]) -> None:
    if args.json:
        print(json.dumps(payload))
    else:
        for line in lines:
            print(line)


def cmd_upload(args: argparse.Namespace) -> int:
    client = _client()
    missing = [f for f in args.files if not Path(f).is_file()]
    if missing:
        raise FileNotFoundError(f"no such file: {missing[0]}")
    uploaded = [client.upload(Path(f), model=args.model) for f in args.files]
    out: list[dict[str, Any]] = [{"uri": str(u), "generation": g} for u, g in uploaded]
    lines = [f"uploaded {o['uri']} (generation {o['generation']})" for o in out]
    if args.wait:
        for entry in out:
            entry["result"] = client.wait_result(
                entry["uri"], args.timeout, model=args.model, generation=entry["generation"]
            )
            lines.append(_summary(entry["result"]))
    _emit(args, out, lines)
    return 0 if not args.wait or all(o["result"]["status"] == "ok" for o in out) else 2


def cmd_publish(args: argparse.Namespace) -> int:
    client = _client()
    message_id, request_id = client.publish(args.uris, args.model, args.version)
    out: dict[str, Any] = {"message_id": message_id, "request_id": request_id, "uris": args.uris}
    lines = [f"published message {message_id} (request {request_id})"]
    if args.wait:
        ids = [request_id] if len(args.uris) == 1 else [f"{request_id}/{i}" for i in range(len(args.uris))]
        out["results"] = [
            client.wait_result(uri, args.timeout, model=args.model, request_id=rid)
            for uri, rid in zip(args.uris, ids, strict=True)
        ]
        lines += [_summary(r) for r in out["results"]]
    _emit(args, out, lines)
    return 0 if not args.wait or all(r["status"] == "ok" for r in out["results"]) else 2


def cmd_infer(args: argparse.Namespace) -> int:
    target = args.target if args.target.startswith("gs://") else Path(args.target)
    response = _client().infer(target, args.model, args.version)
    results = response.get("results", [])
    if "error" in response and not results:
        raise RuntimeError(f"{response['error']}: {response.get('message')}")
    _emit(args, response, [_summary(r) for r in results])
    return 0 if all(r.get("status") == "ok" for r in results) else 2


def cmd_results(args: argparse.Namespace) -> int:
    from infra.cli.result_events import check_flags, cmd_result_events

    if args.uri is None:
        return cmd_result_events(args)
    check_flags(args)
    result = _client().find_result(args.uri, model=args.model)
    if result is None:
        raise LookupError(f"no result stored for {args.uri}")
    print(json.dumps(result, indent=None if args.json else 2))
    return 0
