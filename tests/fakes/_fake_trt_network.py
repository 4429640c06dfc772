"""The fake TensorRT's network definition and ONNX parser.

The parser is as picky as TensorRT's about the two things that break real
deployments: initializers kept in external files (found only relative to the
model's path) and plugin ops (imported only once the plugin library is
initialized).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

#: Ops TensorRT imports from libnvinfer_plugin (after ``init_libnvinfer_plugins``).
PLUGIN_OPS = frozenset(
    {"EfficientNMS_TRT", "BatchedNMSDynamic_TRT", "BatchedNMS_TRT", "MultilevelCropAndResize_TRT"}
)
_QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
# ONNX TensorProto element types -> fake TensorRT DataType values.
_FROM_ONNX = {1: 0, 10: 1, 3: 2, 6: 3, 9: 4, 2: 5, 7: 8}


@dataclass
class ITensor:
    name: str
    shape: tuple[int, ...]
    dtype: int


class INetworkDefinition:
    def __init__(self, flags: int, strongly_typed: bool) -> None:
        self.flags = flags
        self.strongly_typed = strongly_typed
        self._inputs: list[ITensor] = []
        self._outputs: list[ITensor] = []
        self.onnx: bytes | None = None  # the whole model, external weights embedded
        self.has_qdq = False
        self.float16_model = False
        self.plugin_ops: list[str] = []

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
    def __init__(self, network: INetworkDefinition, logger: object) -> None:
        self._network, self._logger = network, logger
        self._errors: list[ParserError] = []

    @property
    def num_errors(self) -> int:
        return len(self._errors)

    def get_error(self, index: int) -> ParserError:
        return self._errors[index]

    def _fail(self, message: str) -> bool:
        from tests.fakes import fake_tensorrt as trt

        self._errors.append(ParserError(message))
        trt._error(self._logger, f"ONNX parse failed: {message}")  # type: ignore[arg-type]
        return False

    def parse(self, model: bytes, path: str | None = None) -> bool:
        """Parse serialized ONNX; ``path`` (the model file) locates external weights."""
        import onnx

        if not isinstance(model, bytes | bytearray | memoryview):
            raise TypeError(f"parse() expects a buffer, got {type(model).__name__}")
        try:
            proto = onnx.load_model_from_string(bytes(model))
        except Exception as err:  # onnx raises several unrelated types for bad bytes
            return self._fail(f"invalid ONNX model: {err}")
        return self._import(proto, None if path is None else Path(os.fspath(path)).parent)

    def parse_from_file(self, model: str) -> bool:
        """Parse the ONNX file at ``model``; external weights are read beside it."""
        import onnx

        if not isinstance(model, str):
            raise TypeError(f"parse_from_file() expects a str path, got {type(model).__name__}")
        try:
            proto = onnx.load_model(model, load_external_data=False)
        except Exception as err:  # noqa: BLE001 - onnx raises several unrelated types
            return self._fail(f"cannot read {model}: {err}")
        return self._import(proto, Path(model).parent)

    def _import(self, proto: object, base_dir: Path | None) -> bool:
        import onnx
        from onnx import external_data_helper

        from tests.fakes import fake_tensorrt as trt

        graph = proto.graph  # type: ignore[attr-defined]
        external = [t for t in graph.initializer if external_data_helper.uses_external_data(t)]
        if external:
            if base_dir is None:
                return self._fail(
                    f"initializer {external[0].name} is stored in an external file and the "
                    "parser was not given the model's path (Failed to open file)"
                )
            try:
                external_data_helper.load_external_data_for_model(proto, str(base_dir))
            except (OSError, ValueError) as err:
                return self._fail(f"cannot load external weights from {base_dir}: {err}")
        ops = {n.op_type for n in graph.node}
        plugin_ops = sorted(ops & PLUGIN_OPS)
        if plugin_ops and not trt.STATE.plugins_initialized:
            return self._fail(
                f"No importer registered for op: {plugin_ops[0]}. Attempting to import as "
                f"plugin. Plugin not found: {plugin_ops[0]} (is libnvinfer_plugin initialized?)"
            )
        if not plugin_ops:
            try:
                onnx.checker.check_model(proto)
            except Exception as err:  # noqa: BLE001 - the checker raises several types
                return self._fail(f"invalid ONNX model: {err}")
        inits = {i.name for i in graph.initializer}
        for vi, dest in [(v, self._network._inputs) for v in graph.input if v.name not in inits] + [
            (v, self._network._outputs) for v in graph.output
        ]:
            t = vi.type.tensor_type
            dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
            dest.append(ITensor(vi.name, dims, _FROM_ONNX[t.elem_type]))
        self._network.onnx = proto.SerializeToString()  # type: ignore[attr-defined]
        self._network.has_qdq = bool(ops & _QDQ_OPS)
        self._network.float16_model = any(i.data_type == 10 for i in graph.initializer)
        self._network.plugin_ops = plugin_ops
        return True
