"""``ICudaEngine`` and ``IExecutionContext`` of the fake TensorRT; they really compute.

Execution runs the embedded ONNX model with ONNX Runtime on the bytes found in
fake device memory, at stream synchronization, with FP16/INT8 effects simulated.
"""

from __future__ import annotations

import hashlib
import json
import threading

import numpy as np

from tests.fakes import fake_cudart
from tests.fakes import fake_tensorrt as trt


def _unpack(data: bytes) -> tuple[dict, bytes] | None:
    if not data.startswith(trt._MAGIC):
        return None
    n = int.from_bytes(data[len(trt._MAGIC) : len(trt._MAGIC) + 4], "little")
    start = len(trt._MAGIC) + 4
    try:
        header = json.loads(data[start : start + n])
    except ValueError:
        return None
    onnx_bytes = data[start + n :]
    if hashlib.sha256(onnx_bytes).hexdigest() != header.get("onnx_sha256"):
        return None
    return header, onnx_bytes


def _version_fits(header: dict, runtime: trt.Runtime) -> str | None:
    built = header["trt_version"]
    if header["version_compatible"]:
        # A version-compatible plan runs on the same or a later release of its major,
        # through the lean runtime it carries, which must be allowed to run.
        if not runtime.engine_host_code_allowed:
            return "version-compatible engines need Runtime.engine_host_code_allowed = True"
        same_major = built.split(".")[0] == trt.__version__.split(".")[0]
        as_tuple = [tuple(int(p) for p in v.split(".")) for v in (built, trt.__version__)]
        if same_major and as_tuple[0] <= as_tuple[1]:
            return None
    elif built == trt.__version__:
        return None
    return (
        "The engine plan file is not compatible with this version of TensorRT, expecting "
        f"library version {trt.__version__} got {built}"
    )


def _device_fits(header: dict) -> str | None:
    g = fake_cudart.STATE.gpu  # the deserializing thread's current device
    built = tuple(header["compute_capability"])
    level = header["hardware_compatibility"]
    if level == "AMPERE_PLUS" and (g.major, g.minor) >= (8, 0):
        return None
    if built == (g.major, g.minor):
        return None
    return "The engine plan file is generated on an incompatible device"


def deserialize(runtime: trt.Runtime, data: bytes) -> ICudaEngine | None:
    unpacked = _unpack(data)
    if unpacked is None:
        trt._error(runtime.logger, "IRuntime::deserializeCudaEngine: magic tag / checksum mismatch")
        return None
    header, onnx_bytes = unpacked
    problem = _version_fits(header, runtime) or _device_fits(header)
    if problem is None and header["plugins"] and not trt.STATE.plugins_initialized:
        problem = f"plugin creator not found for {header['plugins'][0]}"
    if problem is not None:
        trt._error(runtime.logger, problem)
        return None
    return ICudaEngine(header, onnx_bytes)


class ICudaEngine:
    def __init__(self, header: dict, onnx_bytes: bytes) -> None:
        self._header = header
        self._onnx = onnx_bytes
        self._io: dict[str, tuple[trt.TensorIOMode, trt.DataType, trt.Dims]] = {}
        for name, shape, dtype in header["inputs"]:
            self._io[name] = (trt.TensorIOMode.INPUT, trt.DataType(dtype), trt.Dims(shape))
        for name, shape, dtype in header["outputs"]:
            self._io[name] = (trt.TensorIOMode.OUTPUT, trt.DataType(dtype), trt.Dims(shape))
        self._names = list(self._io)
        self._session: object | None = None
        self._shape_cache: dict[tuple, dict[str, tuple[int, ...]]] = {}
        self._lock = threading.Lock()

    @property
    def num_io_tensors(self) -> int:
        return len(self._names)

    @property
    def num_optimization_profiles(self) -> int:
        return 1

    @property
    def precision(self) -> str:
        """Fake-only: the precision the engine was built at."""
        return self._header["precision"]

    def get_tensor_name(self, index: int) -> str:
        return self._names[index]

    def get_tensor_mode(self, name: str) -> trt.TensorIOMode:
        return self._io[name][0] if name in self._io else trt.TensorIOMode.NONE

    def get_tensor_dtype(self, name: str) -> trt.DataType:
        return self._io[name][1]

    def get_tensor_shape(self, name: str) -> trt.Dims:
        return self._io[name][2]

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[trt.Dims]:
        if profile_index != 0 or name not in self._header["profile"]:
            raise ValueError(f"no profile {profile_index} for {name}")
        return [trt.Dims(d) for d in self._header["profile"][name]]

    def serialize(self) -> trt.IHostMemory:
        return trt._pack(self._header, self._onnx)

    def create_execution_context(self) -> IExecutionContext:
        with trt.STATE.lock:
            trt.STATE.live_contexts += 1
        return IExecutionContext(self)

    # --- fake-only helpers ---------------------------------------------------------------------

    def _sess(self) -> object:
        with self._lock:
            if self._session is None:
                import onnxruntime as ort

                self._session = ort.InferenceSession(self._onnx, providers=["CPUExecutionProvider"])
            return self._session

    def _inputs(self) -> list[str]:
        return [n for n in self._names if self._io[n][0] is trt.TensorIOMode.INPUT]

    def _outputs(self) -> list[str]:
        return [n for n in self._names if self._io[n][0] is trt.TensorIOMode.OUTPUT]

    def output_shapes(self, input_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        key = tuple(sorted(input_shapes.items()))
        if key not in self._shape_cache and self._header["plugins"]:
            # ONNX Runtime cannot run TensorRT's plugin ops: dynamic dims follow the batch.
            batch = next(iter(input_shapes.values()))[0]
            self._shape_cache[key] = {
                n: tuple(batch if d < 0 else d for d in self._io[n][2]) for n in self._outputs()
            }
        if key not in self._shape_cache:
            feeds = {
                n: np.zeros(s, dtype=trt.nptype(self._io[n][1])) for n, s in input_shapes.items()
            }
            outs = self._sess().run(self._outputs(), feeds)  # type: ignore[attr-defined]
            self._shape_cache[key] = {
                n: tuple(o.shape) for n, o in zip(self._outputs(), outs, strict=True)
            }
        return self._shape_cache[key]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        precision = self._header["precision"]
        ready = {}
        for name, x in feeds.items():
            amax = self._header["int8_amax"]  # None: the model quantizes itself (Q/DQ)
            if precision == "int8" and amax and x.dtype.kind == "f":
                scale = (amax[name] or 1.0) / 127.0
                x = (np.clip(np.round(x / scale), -128, 127) * scale).astype(x.dtype)
            if precision in ("fp16", "int8") and x.dtype.kind == "f":
                x = x.astype(np.float16).astype(x.dtype)
            ready[name] = x
        outs = self._sess().run(self._outputs(), ready)  # type: ignore[attr-defined]
        result = {}
        for name, y in zip(self._outputs(), outs, strict=True):
            if precision in ("fp16", "int8") and y.dtype.kind == "f":
                y = y.astype(np.float16).astype(y.dtype)
            result[name] = y
        return result


class IExecutionContext:
    def __init__(self, engine: ICudaEngine) -> None:
        self.engine = engine
        self._shapes: dict[str, trt.Dims] = {}
        self._addresses: dict[str, int] = {}
        self._in_flight = False

    def __del__(self) -> None:
        with trt.STATE.lock:
            trt.STATE.live_contexts -= 1

    def _logger_error(self, msg: str) -> None:
        trt.STATE.log.append((int(trt.ILogger.ERROR), msg))

    def set_input_shape(self, name: str, shape: object) -> bool:
        if self._in_flight:
            raise trt.FakeMisuseError("context reused while its previous execution is in flight")
        if self.engine.get_tensor_mode(name) is not trt.TensorIOMode.INPUT:
            self._logger_error(f"setInputShape: {name} is not an input tensor")
            return False
        dims = trt.Dims(int(d) for d in shape)  # type: ignore[attr-defined]
        lo, _, hi = self.engine.get_tensor_profile_shape(name, 0)
        if len(dims) != len(lo) or any(
            not (a <= d <= b) for a, d, b in zip(lo, dims, hi, strict=True)
        ):
            self._logger_error(
                f"setInputShape: {name} dims {tuple(dims)} are outside the optimization profile "
                f"[{tuple(lo)}, {tuple(hi)}]"
            )
            return False
        self._shapes[name] = dims
        return True

    def infer_shapes(self) -> list[str]:
        return [n for n in self.engine._inputs() if n not in self._shapes]

    @property
    def all_binding_shapes_specified(self) -> bool:
        return not self.infer_shapes()

    def get_tensor_shape(self, name: str) -> trt.Dims:
        mode = self.engine.get_tensor_mode(name)
        if mode is trt.TensorIOMode.INPUT:
            return self._shapes.get(name, self.engine.get_tensor_shape(name))
        if self.infer_shapes():
            return self.engine.get_tensor_shape(name)
        shapes = {n: tuple(s) for n, s in self._shapes.items()}
        return trt.Dims(self.engine.output_shapes(shapes)[name])

    def set_tensor_address(self, name: str, memory: int) -> bool:
        if self.engine.get_tensor_mode(name) is trt.TensorIOMode.NONE:
            self._logger_error(f"setTensorAddress: unknown tensor {name}")
            return False
        if not isinstance(memory, int) or isinstance(memory, bool):
            raise TypeError(
                f"set_tensor_address expects an int address, got {type(memory).__name__}"
            )
        if fake_cudart.device_region(memory) is None:
            self._logger_error(f"setTensorAddress: 0x{memory:x} for {name} is not device memory")
            return False
        self._addresses[name] = memory
        return True

    def get_tensor_address(self, name: str) -> int:
        return self._addresses.get(name, 0)

    def execute_async_v3(self, stream_handle: int) -> bool:
        if not isinstance(stream_handle, int) or isinstance(stream_handle, bool):
            raise TypeError(f"execute_async_v3 expects an int stream handle, got {stream_handle!r}")
        missing = self.infer_shapes()
        if missing:
            self._logger_error(f"executeAsyncV3: input shapes not specified for {missing}")
            return False
        shapes = {n: tuple(s) for n, s in self._shapes.items()}
        shapes.update(self.engine.output_shapes(shapes))
        for name, shape in shapes.items():
            addr = self._addresses.get(name)
            nbytes = int(np.prod(shape)) * self.engine.get_tensor_dtype(name).itemsize
            if addr is None:
                self._logger_error(f"executeAsyncV3: address of tensor {name} is not set")
                return False
            if not fake_cudart.device_bytes_fit(addr, nbytes):
                self._logger_error(
                    f"executeAsyncV3: buffer of {name} is smaller than {nbytes} bytes"
                )
                return False
        addresses = dict(self._addresses)
        capturing = fake_cudart.stream_handle(stream_handle) in fake_cudart.STATE.capturing
        if capturing and trt.STATE.capture_unsupported:
            fake_cudart.invalidate_capture(stream_handle)
            self._logger_error("executeAsyncV3: this engine cannot be captured into a graph")
            return False
        self._in_flight = not capturing  # captured work is recorded, not run

        def op() -> None:
            try:
                fault = fake_cudart.take_fault()
                if fault is not None:
                    raise fake_cudart.KernelFault(fault, "kernel fault injected by the test")
                feeds = {}
                for name in self.engine._inputs():
                    dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
                    raw = fake_cudart.read_device(
                        addresses[name], int(np.prod(shapes[name])) * dtype.itemsize
                    )
                    feeds[name] = np.frombuffer(raw, dtype=dtype).reshape(shapes[name])
                for name, value in self.engine.run(feeds).items():
                    fake_cudart.write_device(addresses[name], np.ascontiguousarray(value).tobytes())
                with trt.STATE.lock:
                    trt.STATE.executions.append(
                        {"shapes": {n: shapes[n] for n in feeds}, "context": id(self)}
                    )
            finally:
                self._in_flight = False

        if not fake_cudart.enqueue(stream_handle, op, uses=addresses.values()):
            self._in_flight = False
            self._logger_error(f"executeAsyncV3: invalid stream 0x{stream_handle:x}")
            return False
        return True
