"""``triggerfish env``: shell settings that point Google's own tools at the running local stack.

``eval "$(triggerfish env)"`` makes ``gcloud storage``, ``gcloud pubsub`` and the Cloud
client libraries talk to the stack's emulators instead of Google Cloud:

* ``gcloud`` reads one endpoint per API (``CLOUDSDK_API_ENDPOINT_OVERRIDES_<API>``), the
  project (``CLOUDSDK_CORE_PROJECT``) and, since the emulators take no credentials,
  ``CLOUDSDK_AUTH_DISABLE_CREDENTIALS`` (no login needed, no token sent);
* the client libraries read ``STORAGE_EMULATOR_HOST``, ``PUBSUB_EMULATOR_HOST`` and the
  project from ``GOOGLE_CLOUD_PROJECT`` (``PUBSUB_PROJECT_ID`` for Pub/Sub's samples);
* ``TRIGGERFISH_SERVE_URL`` is the Serve endpoint, for ``curl``.

``triggerfish env --unset`` prints the ``unset`` line that undoes it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
from pathlib import Path

from infra.local.stack import DEFAULT_STATE_DIR, StackState

# Every variable ``stack_environment`` sets, in the order printed.
NAMES = (
    "CLOUDSDK_API_ENDPOINT_OVERRIDES_STORAGE",
    "CLOUDSDK_API_ENDPOINT_OVERRIDES_PUBSUB",
    "CLOUDSDK_CORE_PROJECT",
    "CLOUDSDK_AUTH_DISABLE_CREDENTIALS",
    "STORAGE_EMULATOR_HOST",
    "PUBSUB_EMULATOR_HOST",
    "PUBSUB_PROJECT_ID",
    "GOOGLE_CLOUD_PROJECT",
    "TRIGGERFISH_SERVE_URL",
)


def stack_environment(state: StackState) -> dict[str, str]:
    """The variables that point gcloud and the client libraries at ``state``'s emulators."""
    storage = state.storage_host.rstrip("/")
    values = {
        # gcloud appends the API's own path (storage/v1/..., v1/projects/...) to the override.
        "CLOUDSDK_API_ENDPOINT_OVERRIDES_STORAGE": f"{storage}/",
        "CLOUDSDK_API_ENDPOINT_OVERRIDES_PUBSUB": f"http://{state.pubsub_host}/",
        "CLOUDSDK_CORE_PROJECT": state.project,
        "CLOUDSDK_AUTH_DISABLE_CREDENTIALS": "true",
        "STORAGE_EMULATOR_HOST": storage,
        "PUBSUB_EMULATOR_HOST": state.pubsub_host,
        "PUBSUB_PROJECT_ID": state.project,
        "GOOGLE_CLOUD_PROJECT": state.project,
        "TRIGGERFISH_SERVE_URL": state.serve_url,
    }
    return {name: values[name] for name in NAMES}


def export_lines(values: dict[str, str]) -> list[str]:
    """``export NAME=value`` lines, quoted for POSIX shells."""
    return [f"export {name}={shlex.quote(value)}" for name, value in values.items()]


def cmd_env(args: argparse.Namespace) -> int:
    if args.unset:
        print(json.dumps({"unset": list(NAMES)}) if args.json else f"unset {' '.join(NAMES)}")
        return 0
    state = StackState.load(Path(os.environ.get("TRIGGERFISH_STATE_DIR", str(DEFAULT_STATE_DIR))))
    values = stack_environment(state)
    print(json.dumps(values) if args.json else "\n".join(export_lines(values)))
    return 0
