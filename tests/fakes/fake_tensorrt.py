"""A fake of the TensorRT 10 Python API subset triggerfish calls.

It is strict where TensorRT is strict, so that wrong usage fails a test:

* ``OnnxParser.parse`` really parses the ONNX bytes (``onnx``) and records errors;
* ``build_serialized_network`` returns ``None`` (and logs an ERROR) when a dynamic
  input has no optimization profile, a profile contradicts the network, INT8 has
  no calibrator, or a dynamic INT8 network has no calibration profile;
* setting ``BuilderFlag.FP16``/``INT8`` on a GPU without fast FP16/INT8 raises
  :class:`FakeMisuseError` at build time (real TensorRT would silently build a slow engine);
* a serialized engine embeds a header (fake TensorRT version, device, precision,
  profile, ONNX bytes); deserializing on another version or compute capability
  returns ``None`` as real TensorRT does;
* an execution context rejects shapes outside the profile (``set_input_shape`` returns
  False) and refuses to execute (returns False) with an input shape or a tensor address
  missing or a buffer too small; its work runs on the stream, at synchronize.

The engine computes: at execution it runs the embedded ONNX model with ONNX Runtime
on the bytes in fake device memory (:mod:`tests.fakes.fake_cudart`). FP16 engines
round inputs and outputs through float16; INT8 engines quantize the input with the
scale found during calibration, so bad calibration data really degrades results.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import threading
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING

import numpy as np

from tests.fakes import fake_cudart

if TYPE_CHECKING:
    from tests.fakes._fake_trt_engine import ICudaEngine

__version__ = "10.3.0"
_MAGIC = b"FAKETRT1"
_TIMING_MAGIC = b"FAKETIMING1"
_CALIB_MAGIC = b"FAKECALIB1"


class FakeMisuseError(AssertionError):
    """The code under test used the API in a way real TensorRT would punish."""


@dataclass
class _State:
    builds: list[dict] = field(default_factory=list)
    executions: list[dict] = field(default_factory=list)
    log: list[tuple[int, str]] = field(default_factory=list)
    timing_cache_hits: int = 0
    calibration_batches: int = 0
    live_contexts: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


STATE = _State()


def reset(version: str = "10.3.0") -> None:
    """Forget recorded builds/executions; set the fake TensorRT version."""
    global STATE, __version__
    STATE = _State()
    __version__ = version


# --- enums and small value types -----------------------------------------------------------------


class _Severity(IntEnum):
    INTERNAL_ERROR = 0
    ERROR = 1
    WARNING = 2
    INFO = 3
    VERBOSE = 4


class ILogger:
    """Base class of TensorRT loggers; subclasses must call ``ILogger.__init__``."""

    Severity = _Severity
    INTERNAL_ERROR = _Severity.INTERNAL_ERROR
    ERROR = _Severity.ERROR
    WARNING = _Severity.WARNING
    INFO = _Severity.INFO
    VERBOSE = _Severity.VERBOSE

    def __init__(self) -> None:
        self._initialized = True

    def log(self, severity: _Severity, msg: str) -> None:
        raise NotImplementedError


class Logger(ILogger):
    def __init__(self, min_severity: _Severity = _Severity.WARNING) -> None:
        super().__init__()
        self.min_severity = min_severity

    def log(self, severity: _Severity, msg: str) -> None:
        if severity <= self.min_severity:
            STATE.log.append((int(severity), msg))


def _log(logger: ILogger, severity: _Severity, msg: str) -> None:
    if not getattr(logger, "_initialized", False):
        raise FakeMisuseError("ILogger subclass did not call ILogger.__init__(self)")
    STATE.log.append((int(severity), msg))
    logger.log(severity, msg)


class DataType(IntEnum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    INT64 = 8

    @property
    def itemsize(self) -> int:
        return np.dtype(nptype(self)).itemsize


# TensorRT's module-level aliases (``trt.float32`` ...), NumPy types and ONNX element types.
float32, float16, int8, int32 = DataType.FLOAT, DataType.HALF, DataType.INT8, DataType.INT32
bool, uint8, int64 = DataType.BOOL, DataType.UINT8, DataType.INT64  # noqa: A001
_TYPES = [  # (TensorRT type, NumPy type, ONNX TensorProto element type)
    (DataType.FLOAT, np.float32, 1), (DataType.HALF, np.float16, 10), (DataType.INT8, np.int8, 3),
    (DataType.INT32, np.int32, 6), (DataType.BOOL, np.bool_, 9), (DataType.UINT8, np.uint8, 2),
    (DataType.INT64, np.int64, 7),
]  # fmt: skip
_NP = {t: n for t, n, _ in _TYPES}
_FROM_ONNX = {o: t for t, _, o in _TYPES}


def nptype(trt_type: DataType) -> type:
    """The NumPy type of a TensorRT data type."""
    return _NP[DataType(trt_type)]


def volume(shape: object) -> int:
    return int(np.prod(list(shape), dtype=np.int64))


class TensorIOMode(IntEnum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class MemoryPoolType(IntEnum):
    WORKSPACE = 0
    DLA_MANAGED_SRAM = 1


class BuilderFlag(IntEnum):
    FP16 = 0
    INT8 = 1
    DEBUG = 2
    TF32 = 7


class NetworkDefinitionCreationFlag(IntEnum):
    EXPLICIT_BATCH = 0
    STRONGLY_TYPED = 1


class Dims(tuple):
    """TensorRT dims behave as a sequence of ints."""


class IHostMemory(bytearray):
    """Serialized data; supports the buffer protocol like TensorRT's."""

    @property
    def nbytes(self) -> int:
        return len(self)


# --- network and parser ------------------------------------------------------------------------


@dataclass
class ITensor:
    name: str
    shape: Dims
    dtype: DataType


class INetworkDefinition:
    def __init__(self, flags: int) -> None:
        self.flags = flags
        self._inputs: list[ITensor] = []
        self._outputs: list[ITensor] = []
        self.onnx: bytes | None = None

    @property
    def num_inputs(self) -> int:
        return len(self._inputs)

    @property
    def num_outputs(self) -> int:
        return len(self._outputs)

    def get_input(self, index: int) -> ITensor:
        return self._inputs[index]

    def get_output(self, index: int) -> ITensor:
        return self._outputs[index]


class ParserError:
    def __init__(self, desc: str) -> None:
        self._desc = desc

    def desc(self) -> str:
        return self._desc

    def __str__(self) -> str:
        return f"In node -1 (parse): {self._desc}"


class OnnxParser:
    def __init__(self, network: INetworkDefinition, logger: ILogger) -> None:
        self._network, self._logger = network, logger
        self._errors: list[ParserError] = []

    @property
    def num_errors(self) -> int:
        return len(self._errors)

    def get_error(self, index: int) -> ParserError:
        return self._errors[index]

    def parse(self, model: bytes, path: str | None = None) -> bool:
        import onnx

        if not isinstance(model, bytes | bytearray | memoryview):
            raise TypeError(f"parse() expects a buffer, got {type(model).__name__}")
        try:
            proto = onnx.load_model_from_string(bytes(model))
            onnx.checker.check_model(proto)
        except Exception as err:  # onnx raises several unrelated types for bad bytes
            self._errors.append(ParserError(f"invalid ONNX model: {err}"))
            _log(self._logger, _Severity.ERROR, f"ONNX parse failed: {err}")
            return False
        inits = {i.name for i in proto.graph.initializer}
        for vi, dest in [
            (v, self._network._inputs) for v in proto.graph.input if v.name not in inits
        ] + [(v, self._network._outputs) for v in proto.graph.output]:
            t = vi.type.tensor_type
            dims = Dims(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
            dest.append(ITensor(vi.name, dims, _FROM_ONNX[t.elem_type]))
        self._network.onnx = bytes(model)
        return True


# --- builder -----------------------------------------------------------------------------------


class IInt8Calibrator:
    """Base of application calibrators; subclasses must call the base ``__init__``."""

    def __init__(self) -> None:
        self._initialized = True


class IInt8EntropyCalibrator2(IInt8Calibrator):
    pass


class IOptimizationProfile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple[Dims, Dims, Dims]] = {}

    def set_shape(self, input: str, min: object, opt: object, max: object) -> None:  # noqa: A002
        lo, mid, hi = Dims(min), Dims(opt), Dims(max)
        if not (len(lo) == len(mid) == len(hi)):
            raise ValueError(f"profile ranks differ for {input}: {lo} {mid} {hi}")
        if any(not (0 <= a <= b <= c) for a, b, c in zip(lo, mid, hi, strict=True)):
            raise ValueError(f"profile for {input} needs 0 <= min <= opt <= max: {lo} {mid} {hi}")
        self.shapes[input] = (lo, mid, hi)

    def get_shape(self, input: str) -> list[Dims]:  # noqa: A002
        return list(self.shapes.get(input, ()))

    def __bool__(self) -> builtins.bool:
        return builtins.bool(self.shapes)


class ITimingCache:
    def __init__(self, device: str, entries: dict[str, str]) -> None:
        self.device, self.entries = device, dict(entries)

    def serialize(self) -> IHostMemory:
        body = json.dumps({"device": self.device, "entries": self.entries}).encode()
        return IHostMemory(_TIMING_MAGIC + body)


def _device_tag() -> str:
    g = fake_cudart.STATE.gpu
    return f"{g.name}|sm_{g.major}{g.minor}"


class IBuilderConfig:
    def __init__(self) -> None:
        self.flags: set[BuilderFlag] = set()
        self.pool_limits: dict[MemoryPoolType, int] = {}
        self.profiles: list[IOptimizationProfile] = []
        self.int8_calibrator: object | None = None
        self.calibration_profile: IOptimizationProfile | None = None
        self._timing_cache: ITimingCache | None = None

    def set_memory_pool_limit(self, pool: MemoryPoolType, pool_size: int) -> None:
        if pool_size < 0:
            raise ValueError(f"negative pool size {pool_size}")
        self.pool_limits[MemoryPoolType(pool)] = int(pool_size)

    def set_flag(self, flag: BuilderFlag) -> None:
        self.flags.add(BuilderFlag(flag))

    def clear_flag(self, flag: BuilderFlag) -> None:
        self.flags.discard(BuilderFlag(flag))

    def get_flag(self, flag: BuilderFlag) -> bool:
        return BuilderFlag(flag) in self.flags

    @property
    def num_optimization_profiles(self) -> int:
        return len(self.profiles)

    def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
        if not profile:
            return -1
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def set_calibration_profile(self, profile: IOptimizationProfile) -> bool:
        if not profile:
            return False
        self.calibration_profile = profile
        return True

    def create_timing_cache(self, serialized_timing_cache: bytes) -> ITimingCache | None:
        data = bytes(serialized_timing_cache)
        if not data:
            return ITimingCache(_device_tag(), {})
        if not data.startswith(_TIMING_MAGIC):
            return None
        body = json.loads(data[len(_TIMING_MAGIC) :])
        return ITimingCache(body["device"], body["entries"])

    def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
        if not isinstance(cache, ITimingCache):
            raise TypeError("set_timing_cache needs an ITimingCache")
        if cache.device != _device_tag() and not ignore_mismatch:
            return False
        self._timing_cache = cache
        return True

    def get_timing_cache(self) -> ITimingCache | None:
        return self._timing_cache


class Builder:
    def __init__(self, logger: ILogger) -> None:
        if not getattr(logger, "_initialized", False):
            raise FakeMisuseError("Builder needs an initialized ILogger")
        self.logger = logger

    @property
    def platform_has_fast_fp16(self) -> bool:
        return fake_cudart.STATE.gpu.fast_fp16

    @property
    def platform_has_fast_int8(self) -> bool:
        return fake_cudart.STATE.gpu.fast_int8

    def create_network(self, flags: int = 0) -> INetworkDefinition:
        if flags & (1 << NetworkDefinitionCreationFlag.EXPLICIT_BATCH):
            _log(self.logger, _Severity.WARNING, "EXPLICIT_BATCH is deprecated and ignored")
        return INetworkDefinition(flags)

    def create_builder_config(self) -> IBuilderConfig:
        return IBuilderConfig()

    def create_optimization_profile(self) -> IOptimizationProfile:
        return IOptimizationProfile()

    def build_serialized_network(
        self, network: INetworkDefinition, config: IBuilderConfig
    ) -> IHostMemory | None:
        from tests.fakes import _fake_trt_build

        return _fake_trt_build.build(self, network, config)


def _error(logger: ILogger, msg: str) -> None:
    _log(logger, _Severity.ERROR, msg)


# --- runtime -----------------------------------------------------------------------------------


def _pack(header: dict, onnx_bytes: bytes) -> IHostMemory:
    head = json.dumps(header, sort_keys=True).encode()
    return IHostMemory(_MAGIC + len(head).to_bytes(4, "little") + head + onnx_bytes)


def _unpack(data: bytes) -> tuple[dict, bytes] | None:
    if not data.startswith(_MAGIC):
        return None
    n = int.from_bytes(data[len(_MAGIC) : len(_MAGIC) + 4], "little")
    start = len(_MAGIC) + 4
    try:
        header = json.loads(data[start : start + n])
    except ValueError:
        return None
    onnx_bytes = data[start + n :]
    if hashlib.sha256(onnx_bytes).hexdigest() != header.get("onnx_sha256"):
        return None
    return header, onnx_bytes


class Runtime:
    def __init__(self, logger: ILogger) -> None:
        if not getattr(logger, "_initialized", False):
            raise FakeMisuseError("Runtime needs an initialized ILogger")
        self.logger = logger

    def deserialize_cuda_engine(self, serialized_engine: bytes) -> ICudaEngine | None:
        from tests.fakes._fake_trt_engine import ICudaEngine

        unpacked = _unpack(bytes(serialized_engine))
        if unpacked is None:
            _error(self.logger, "IRuntime::deserializeCudaEngine: magic tag / checksum mismatch")
            return None
        header, onnx_bytes = unpacked
        if header["trt_version"] != __version__:
            _error(
                self.logger,
                f"The engine plan file is not compatible with this version of TensorRT, expecting "
                f"library version {__version__} got {header['trt_version']}",
            )
            return None
        g = fake_cudart.STATE.gpu
        if header["compute_capability"] != [g.major, g.minor]:
            _error(self.logger, "The engine plan file is generated on an incompatible device")
            return None
        return ICudaEngine(header, onnx_bytes)
