"""The bench's report: ratios against the peer, and the text table ``triggerfish bench`` prints."""

from __future__ import annotations

from typing import Any

MODEL = "mobilenet_v2"

PEER_REDUCED, PEER_FULL = (
    "Beam RunInference, reduced-scale decode",
    "Beam RunInference, full decode",
)


def ratios(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Each triggerfish path's ``ok`` images/s over the peer's (the reduced-decode peer is the
    headline; the full decode, context), Pub/Sub one-URI over HTTP, and the CPU figure that
    carries to the cloud: Serve's CPU per image on the upload path next to the peer pipeline's."""
    by = {row["path"]: row for row in rows}
    ours = [row for row in rows if not row["path"].startswith("Beam")]
    http = next(row for row in ours if row["path"].startswith("HTTP"))
    out: dict[str, Any] = {
        "pubsub_1_uri_over_http": by["pubsub, 1 URI/message"]["images_per_s"] / http["images_per_s"]
    }
    for key, peer in (
        ("over_peer_reduced", by.get(PEER_REDUCED)),
        ("over_peer_full", by.get(PEER_FULL)),
    ):
        if peer and peer["images_per_s"] > 0:
            out[key] = {row["path"]: row["images_per_s"] / peer["images_per_s"] for row in ours}
    peer = by.get(PEER_REDUCED)
    if peer:
        out["serve_cpu_ms_upload"] = by["upload"]["cpu_ms_by_process"].get("serve")
        out["peer_pipeline_cpu_ms_reduced"] = peer["cpu_ms_by_process"].get("beam")
    return out


def _row(r: dict[str, Any]) -> str:
    lat = (
        f"p50 {r['latency_ms_p50']:6.0f}  p95 {r['latency_ms_p95']:6.0f}"
        if r.get("latency_ms_p50")
        else " " * 23
    )
    if "workers" in r:  # the peer: which worker count won, and every count's warm and cold rate
        warm = ", ".join(
            f"{k}: {v:.1f}" if v else f"{k}: -" for k, v in r["images_per_s_by_workers"].items()
        )
        cold = ", ".join(f"{k}: {v:.1f}" for k, v in r["cold_images_per_s_by_workers"].items())
        extra = f"{r['timing']}, {r['workers']} worker(s); warm {warm}; cold {cold}"
    else:
        extra = str(r.get("batches_formed", ""))
    return (f"  {r['path']:<42} {r['images_per_s']:7.1f}  {r['cpu_ms_per_image']:7.1f}  "
            f"{r['cores_busy']:5.2f}  {lat}  {extra}")  # fmt: skip


def _short(path: str) -> str:
    """``pubsub, 16 URIs/message`` -> ``pubsub 16/message``; ``HTTP, 16 URIs/call, 4 in flight`` -> ``HTTP 16/call``."""
    parts = path.split(", ")
    if len(parts) == 1:
        return path
    count, unit = parts[1].split(" ")
    return f"{parts[0]} {count}/{unit.split('/')[1]}"


def _ratio_lines(rows: list[dict[str, Any]], q: dict[str, Any]) -> list[str]:
    def line(key: str) -> str:
        return ", ".join(f"{_short(path)} {v:.2f}x" for path, v in q[key].items())

    lines = []
    if "over_peer_reduced" in q:
        lines.append(f"  against the reduced-decode peer: {line('over_peer_reduced')}")
    if "over_peer_full" in q:
        lines.append(f"  against the full-decode peer (context): {line('over_peer_full')}")
    lines.append(f"  pubsub 1 URI / HTTP {q['pubsub_1_uri_over_http']:.2f}x")
    peers = [row for row in rows if row["path"].startswith("Beam")]
    if peers:
        agreement = ", ".join(
            f"{row['path'].split(', ')[1]} {row['top1_agreement']:.3f}" if row["top1_agreement"] is not None
            else f"{row['path'].split(', ')[1]} -" for row in peers)  # fmt: skip
        lines.append(
            f"  peer top-1 agreement with triggerfish ({peers[0]['top1_compared']} objects): {agreement}"
        )
    if q.get("peer_pipeline_cpu_ms_reduced") is not None:
        lines.append(f"  CPU-ms per image, what carries to the cloud: Serve {q['serve_cpu_ms_upload']} (upload path), "
                     f"the reduced-decode peer's pipeline {q['peer_pipeline_cpu_ms_reduced']}")  # fmt: skip
    return lines


def format_report(r: dict[str, Any]) -> str:
    lines = [f"triggerfish bench, {r['started_at']}, {r['cpus']} CPUs, model {MODEL}"]
    if "peer_skipped" in r:
        lines.append(f"the Beam peer was skipped: {r['peer_skipped']}")
    for size in ("small", "large"):
        if size not in r:
            continue
        c = r["ceilings"][size]
        lines.append(
            f"\n{size} JPEGs ({r[size][0]['images']} objects)"
            f"   ceilings: engine {c['engine_images_per_s']:.1f} images/s (batch {c['engine_batch_size']}, "
            f"{c['backend']}), decode {c['decode_images_per_s']:.1f} images/s ({c['decode_threads']} threads)"
        )
        lines.append(f"  {'path':<42} {'img/s':>7}  {'CPU-ms':>7}  {'cores':>5}  {'end to end ms':<23}  "
                     "batches formed | peer timing and workers (images/s)")  # fmt: skip
        lines += [_row(row) for row in r[size]]
        lines += _ratio_lines(r[size], r["ratios"][size])
        top = max(
            (x for x in r[size] if not x["path"].startswith("Beam")),
            key=lambda x: x["cpu_ms_per_image"],
        )
        lines.append(
            f"  CPU-ms per image by process ({top['path']}): {top.get('cpu_ms_by_process')}"
        )
    c = r["ceilings"]["small"]
    lines.append(f"\nsingle image over HTTP (raw body) p50 {r['single_image_http_ms_p50']:.1f} ms; "
                 f"engine batch 1 p50 {c['engine_batch1_ms_p50']:.1f} ms "
                 f"(+{r['single_image_http_ms_p50'] - c['engine_batch1_ms_p50']:.1f} ms)")  # fmt: skip
    if "single_image_proxy_ms_p50" in r:
        lines.append(
            f"  the same through Serve's proxy actor: p50 {r['single_image_proxy_ms_p50']:.1f} ms"
        )
    return "\n".join(lines)
