"""Tiny ONNX models and inputs built in the tests (no downloads, milliseconds to run)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from serve.engines.base import EngineSpec
from serve.model_config import Precision

INPUT_SHAPE = (3, 8, 8)
CLASSES = 10


def classifier_onnx(seed: int = 0, batch_dim: str | int = "N", classes: int = CLASSES) -> bytes:
    """``input [N,3,8,8] -> Flatten -> Gemm -> logits [N,classes]`` with seeded weights."""
    rng = np.random.default_rng(seed)
    features = int(np.prod(INPUT_SHAPE))
    weight = rng.normal(0, 0.2, size=(features, classes)).astype(np.float32)
    bias = rng.normal(0, 0.1, size=(classes,)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["input"], ["flat"], axis=1),
            helper.make_node("Gemm", ["flat", "W", "B"], ["logits"]),
        ],
        "tiny_classifier",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch_dim, *INPUT_SHAPE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch_dim, classes])],
        initializer=[numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every onnxruntime this project supports
    onnx.checker.check_model(model)
    return model.SerializeToString()


def make_spec(onnx_path: Path, **overrides: object) -> EngineSpec:
    values: dict[str, object] = {
        "model": "tiny",
        "version": "1",
        "onnx_path": onnx_path,
        "input_name": "input",
        "input_shape": INPUT_SHAPE,
        "input_dtype": "float32",
        "output_names": ("logits",),
        "precision": Precision.FP32,
        "batch_sizes": (1, 4, 8),
        "workers": 1,
    }
    values.update(overrides)
    return EngineSpec(**values)  # type: ignore[arg-type]


def images(n: int, seed: int = 1) -> np.ndarray:
    """``n`` preprocessed-looking images in [0, 1]."""
    return np.random.default_rng(seed).random((n, *INPUT_SHAPE), dtype=np.float32)


def ort_logits(onnx_bytes: bytes, batch: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input": batch})[0]


def quantized_classifier_onnx(seed: int = 0) -> bytes:
    """The classifier with an explicitly quantized input (QuantizeLinear/DequantizeLinear)."""
    model = onnx.load_model_from_string(classifier_onnx(seed))
    graph = model.graph
    scale = numpy_helper.from_array(np.array(1 / 127, dtype=np.float32), "q_scale")
    zero = numpy_helper.from_array(np.array(0, dtype=np.int8), "q_zero")
    graph.initializer.extend([scale, zero])
    flatten = graph.node[0]
    flatten.input[0] = "input_dq"
    graph.node.insert(
        0, helper.make_node("DequantizeLinear", ["input_q", "q_scale", "q_zero"], ["input_dq"])
    )
    graph.node.insert(
        0, helper.make_node("QuantizeLinear", ["input", "q_scale", "q_zero"], ["input_q"])
    )
    onnx.checker.check_model(model)
    return model.SerializeToString()


def save_with_external_weights(onnx_bytes: bytes, path: Path) -> Path:
    """Write the model to ``path`` with every initializer in ``<name>.data`` beside it."""
    model = onnx.load_model_from_string(onnx_bytes)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=f"{path.name}.data",
        size_threshold=0,
    )
    return path


def plugin_onnx() -> bytes:
    """A detector head ending in TensorRT's EfficientNMS_TRT plugin op (TensorRT-only)."""
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["input"], ["flat"], axis=1),
            helper.make_node("EfficientNMS_TRT", ["flat"], ["num_detections"], max_output_boxes=10),
        ],
        "nms_head",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *INPUT_SHAPE])],
        [helper.make_tensor_value_info("num_detections", TensorProto.INT32, ["N", 1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()
