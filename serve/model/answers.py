"""What a model replica answers the ingress with, as values that cross the deployment boundary.

The ingress imports these and nothing else of the model deployment
(:mod:`serve.model.model_server`), whose engines and loaders stay in the model replicas.
"""

from __future__ import annotations

import dataclasses

from serve.model_config import InputSpec, PreprocessSpec
from shared.errors import ErrorReason, PermanentError


@dataclasses.dataclass(frozen=True, slots=True)
class VersionInfo:
    """What the ingress needs to preprocess for a version.

    ``decode`` is not ``cpu`` (it is ``nvimgcodec:cuda:N``) when this version's replicas
    decode on their GPU: the ingress then sends the fetched bytes
    (:class:`~serve.model.batch.EncodedItem`). ``max_batch_size`` is the version's
    largest batch (0: not told); the ingress sends merged calls of at most that many items.
    """

    model: str
    version: str
    input: InputSpec
    preprocess: PreprocessSpec
    decode: str = "cpu"
    max_batch_size: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class Rejection:
    """A permanent error crossing the deployment boundary as a value.

    Ray wraps exceptions raised in a replica, and a wrapped exception cannot
    always be matched by type in the caller; a value always can.
    """

    reason: ErrorReason
    message: str

    def to_error(self) -> PermanentError:
        return PermanentError(self.reason, self.message)


@dataclasses.dataclass(frozen=True, slots=True)
class Retry:
    """A transient failure for one item, as a value; ``overloaded`` asks the caller to back off."""

    message: str
    overloaded: bool = False
    retry_after_s: float = 1.0


__all__ = ["Rejection", "Retry", "VersionInfo"]
