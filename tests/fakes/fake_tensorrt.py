"""A fake of the TensorRT Python API subset triggerfish calls, as TensorRT 10.x or 11.x.

:func:`reset` picks the version, and the module's names follow the real API's
differences (read from TensorRT's own binding sources, 10.3 to 11.1):

* 10.x: ``BuilderFlag.FP16``/``INT8``, ``IInt8EntropyCalibrator2``,
  ``IBuilderConfig.int8_calibrator``/``set_calibration_profile``,
  ``Builder.platform_has_fast_fp16``/``int8`` and the no-op ``EXPLICIT_BATCH`` flag exist;
  a network is weakly typed unless created with ``STRONGLY_TYPED``.
* 11.x: all of those are gone (``AttributeError``, as in the real bindings); every
  network is strongly typed, so precision comes from the ONNX model's own types or its
  QuantizeLinear/DequantizeLinear nodes.

It is strict where TensorRT is strict, so that wrong usage fails a test:

* the parser really parses the ONNX model (``onnx``); initializers stored in external
  files only load when the parser is told where the model lives (``parse(..., path=)`` or
  ``parse_from_file``); plugin ops (``EfficientNMS_TRT`` ...) only import after
  ``init_libnvinfer_plugins``;
* ``build_serialized_network`` returns ``None`` (and logs an ERROR) when a dynamic input has
  no optimization profile, a profile contradicts the network, INT8 has no calibrator, a
  dynamic INT8 network has no calibration profile, or precision flags meet a strongly typed
  network; FP16/INT8 flags on a GPU without fast FP16/INT8 raise :class:`FakeMisuseError`;
* a plan records the *current device* of the building thread, and deserializing it with
  another TensorRT version or on another compute capability returns ``None``;
* execution contexts reject shapes outside the profile and missing addresses, compute at
  stream synchronization, can be captured into CUDA graphs, and fault on demand
  (:func:`tests.fakes.fake_cudart.inject_fault`) with a sticky CUDA error.
"""

from __future__ import annotations

import builtins
import json
import threading
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING

import numpy as np

from tests.fakes import fake_cudart
from tests.fakes._fake_trt_network import (
    INetworkDefinition,
    ITensor,
    OnnxParser,
    ParserError,
)

if TYPE_CHECKING:
    from tests.fakes._fake_trt_engine import ICudaEngine

__all__ = ["INetworkDefinition", "ITensor", "OnnxParser", "ParserError"]

__version__ = "10.3.0.26"
_MAGIC = b"FAKETRT1"
_TIMING_MAGIC = b"FAKETIMING1"
_CALIB_MAGIC = b"FAKECALIB1"
#: Names the TensorRT 11 bindings no longer have.
_REMOVED_IN_11 = frozenset(
    {
        "int8_calibrator",
        "set_calibration_profile",
        "get_calibration_profile",
        "platform_has_fast_fp16",
        "platform_has_fast_int8",
        "platform_has_tf32",
    }
)


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
    plugins_initialized: bool = False
    capture_unsupported: bool = False  # enqueue fails while a stream is being captured
    lock: threading.Lock = field(default_factory=threading.Lock)


STATE = _State()


def major() -> int:
    return int(__version__.split(".")[0])


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


def _error(logger: ILogger, msg: str) -> None:
    _log(logger, _Severity.ERROR, msg)


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


# TensorRT's module-level aliases (``trt.float32`` ...) and NumPy types.
float32, float16, int8, int32 = DataType.FLOAT, DataType.HALF, DataType.INT8, DataType.INT32
bool, uint8, int64 = DataType.BOOL, DataType.UINT8, DataType.INT64  # noqa: A001
_NP = {
    DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8,
    DataType.INT32: np.int32, DataType.BOOL: np.bool_, DataType.UINT8: np.uint8,
    DataType.INT64: np.int64,
}  # fmt: skip


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


class _BuilderFlag10(IntEnum):
    FP16 = 0
    INT8 = 1
    DEBUG = 2
    TF32 = 7
    VERSION_COMPATIBLE = 14


class _BuilderFlag11(IntEnum):
    DEBUG = 2
    TF32 = 7
    VERSION_COMPATIBLE = 14


class _NetworkFlag10(IntEnum):
    EXPLICIT_BATCH = 0
    STRONGLY_TYPED = 1


class _NetworkFlag11(IntEnum):
    STRONGLY_TYPED = 1  # deprecated: always on


class HardwareCompatibilityLevel(IntEnum):
    NONE = 0
    AMPERE_PLUS = 1
    SAME_COMPUTE_CAPABILITY = 2


BuilderFlag: type[IntEnum] = _BuilderFlag10
NetworkDefinitionCreationFlag: type[IntEnum] = _NetworkFlag10


class Dims(tuple):
    """TensorRT dims behave as a sequence of ints."""


class IHostMemory(bytearray):
    """Serialized data; supports the buffer protocol like TensorRT's."""

    @property
    def nbytes(self) -> int:
        return len(self)


class _Versioned:
    """Attributes removed in TensorRT 11 raise ``AttributeError`` there, as in the bindings."""

    def __getattribute__(self, name: str) -> object:
        if name in _REMOVED_IN_11 and major() >= 11:
            raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")
        return object.__getattribute__(self, name)

    def __setattr__(self, name: str, value: object) -> None:
        if name in _REMOVED_IN_11 and major() >= 11:
            raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")
        object.__setattr__(self, name, value)


# --- plugins -----------------------------------------------------------------------------------


def init_libnvinfer_plugins(logger: ILogger, namespace: str) -> builtins.bool:
    """Register TensorRT's bundled plugins (EfficientNMS_TRT ...) with the plugin registry."""
    if not getattr(logger, "_initialized", False):
        raise FakeMisuseError("init_libnvinfer_plugins needs an initialized ILogger")
    if not isinstance(namespace, str):
        raise TypeError("namespace must be a str")
    STATE.plugins_initialized = True
    return True


# --- INT8 calibrators (TensorRT 10.x only) ---------------------------------------------------------


class IInt8Calibrator:
    """Base of application calibrators; subclasses must call the base ``__init__``."""

    def __init__(self) -> None:
        self._initialized = True


class IInt8EntropyCalibrator2(IInt8Calibrator):
    pass


_CALIBRATORS = {
    "IInt8Calibrator": IInt8Calibrator,
    "IInt8EntropyCalibrator2": IInt8EntropyCalibrator2,
}


def reset(version: str = "10.3.0.26") -> None:
    """Forget recorded builds/executions; become TensorRT ``version`` (its API included)."""
    global STATE, __version__, BuilderFlag, NetworkDefinitionCreationFlag
    STATE = _State()
    __version__ = version
    module = globals()
    if major() >= 11:
        BuilderFlag, NetworkDefinitionCreationFlag = _BuilderFlag11, _NetworkFlag11
        for name in _CALIBRATORS:
            module.pop(name, None)
    else:
        BuilderFlag, NetworkDefinitionCreationFlag = _BuilderFlag10, _NetworkFlag10
        module.update(_CALIBRATORS)


# --- builder -----------------------------------------------------------------------------------


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

    def combine(self, input_cache: ITimingCache, ignore_mismatch: builtins.bool) -> builtins.bool:
        """Merge ``input_cache`` into this one; refused across devices/versions unless ignored."""
        if not isinstance(input_cache, ITimingCache):
            raise TypeError("combine needs an ITimingCache")
        if input_cache.device != self.device and not ignore_mismatch:
            return False
        for key, value in input_cache.entries.items():
            self.entries.setdefault(key, value)
        return True


def device_tag() -> str:
    """What a timing cache is specific to: the current device and this TensorRT."""
    g = fake_cudart.STATE.gpu
    return f"{g.name}|sm_{g.major}{g.minor}|{__version__}"


class IBuilderConfig(_Versioned):
    def __init__(self) -> None:
        self.flags: set[int] = set()
        self.pool_limits: dict[MemoryPoolType, int] = {}
        self.profiles: list[IOptimizationProfile] = []
        self.hardware_compatibility_level = HardwareCompatibilityLevel.NONE
        self._timing_cache: ITimingCache | None = None
        object.__setattr__(self, "int8_calibrator", None)
        object.__setattr__(self, "calibration_profile", None)

    def set_memory_pool_limit(self, pool: MemoryPoolType, pool_size: int) -> None:
        if pool_size < 0:
            raise ValueError(f"negative pool size {pool_size}")
        self.pool_limits[MemoryPoolType(pool)] = int(pool_size)

    def set_flag(self, flag: IntEnum) -> None:
        self.flags.add(int(BuilderFlag(flag)))

    def clear_flag(self, flag: IntEnum) -> None:
        self.flags.discard(int(BuilderFlag(flag)))

    def get_flag(self, flag: IntEnum) -> builtins.bool:
        return int(BuilderFlag(flag)) in self.flags

    def has(self, name: str) -> builtins.bool:
        """Fake-only: whether the flag called ``name`` is set."""
        member = BuilderFlag.__members__.get(name)
        return member is not None and int(member) in self.flags

    @property
    def num_optimization_profiles(self) -> int:
        return len(self.profiles)

    def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
        if not profile:
            return -1
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def set_calibration_profile(self, profile: IOptimizationProfile) -> builtins.bool:
        if not profile:
            return False
        object.__setattr__(self, "calibration_profile", profile)
        return True

    def create_timing_cache(self, serialized_timing_cache: bytes) -> ITimingCache | None:
        data = bytes(serialized_timing_cache)
        if not data:
            return ITimingCache(device_tag(), {})
        if not data.startswith(_TIMING_MAGIC):
            return None
        body = json.loads(data[len(_TIMING_MAGIC) :])
        return ITimingCache(body["device"], body["entries"])

    def set_timing_cache(
        self, cache: ITimingCache, ignore_mismatch: builtins.bool
    ) -> builtins.bool:
        if not isinstance(cache, ITimingCache):
            raise TypeError("set_timing_cache needs an ITimingCache")
        if cache.device != device_tag() and not ignore_mismatch:
            return False
        self._timing_cache = cache
        return True

    def get_timing_cache(self) -> ITimingCache | None:
        return self._timing_cache


class Builder(_Versioned):
    def __init__(self, logger: ILogger) -> None:
        if not getattr(logger, "_initialized", False):
            raise FakeMisuseError("Builder needs an initialized ILogger")
        self.logger = logger
        self.device = fake_cudart.current_device()  # TensorRT binds to the current device

    @property
    def platform_has_fast_fp16(self) -> builtins.bool:
        return fake_cudart.STATE.gpus[self.device].fast_fp16

    @property
    def platform_has_fast_int8(self) -> builtins.bool:
        return fake_cudart.STATE.gpus[self.device].fast_int8

    def create_network(self, flags: int = 0) -> INetworkDefinition:
        explicit = NetworkDefinitionCreationFlag.__members__.get("EXPLICIT_BATCH")
        if explicit is not None and flags & (1 << explicit):
            _log(self.logger, _Severity.WARNING, "EXPLICIT_BATCH is deprecated and ignored")
        strongly = major() >= 11 or builtins.bool(
            flags & (1 << NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        )
        return INetworkDefinition(flags, strongly_typed=strongly)

    def create_builder_config(self) -> IBuilderConfig:
        return IBuilderConfig()

    def create_optimization_profile(self) -> IOptimizationProfile:
        return IOptimizationProfile()

    def build_serialized_network(
        self, network: INetworkDefinition, config: IBuilderConfig
    ) -> IHostMemory | None:
        from tests.fakes import _fake_trt_build

        return _fake_trt_build.build(self, network, config)


# --- runtime -----------------------------------------------------------------------------------


def _pack(header: dict, onnx_bytes: bytes) -> IHostMemory:
    head = json.dumps(header, sort_keys=True).encode()
    return IHostMemory(_MAGIC + len(head).to_bytes(4, "little") + head + onnx_bytes)


class Runtime(_Versioned):
    def __init__(self, logger: ILogger) -> None:
        if not getattr(logger, "_initialized", False):
            raise FakeMisuseError("Runtime needs an initialized ILogger")
        self.logger = logger
        self.engine_host_code_allowed = False

    def deserialize_cuda_engine(self, serialized_engine: bytes) -> ICudaEngine | None:
        from tests.fakes._fake_trt_engine import deserialize

        return deserialize(self, bytes(serialized_engine))
