"""Tiny ONNX detectors whose outputs are known, and a helper that runs them per image.

Each model takes an NCHW float32 image batch and returns constant tensors
expanded to the batch size; listed outputs are multiplied by the image's
maximum pixel so that different images in one batch get different outputs
(which proves results are split back per image).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from serve.engines.base import EngineSpec
from serve.engines.onnxruntime import OnnxRuntimeEngine

INPUT = "images"


def _save(nodes: list, inits: list, outputs: list, path: Path, channels_hw: tuple) -> Path:
    graph = helper.make_graph(
        nodes,
        "test_detector",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["N", *channels_hw])],
        outputs,
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def constant_model(
    path: Path,
    outputs: Mapping[str, np.ndarray],
    scaled_by_input: Iterable[str] = (),
    input_chw: tuple[int, int, int] = (3, 32, 32),
) -> Path:
    """A model returning ``outputs[name]`` (shape without batch) for every image.

    Outputs named in ``scaled_by_input`` are multiplied by the image's max pixel.
    """
    scaled = set(scaled_by_input)
    nodes = [
        helper.make_node("Shape", [INPUT], ["shape"]),
        helper.make_node("Slice", ["shape", "zero", "one"], ["n"]),
        helper.make_node("ReduceMax", [INPUT], ["peak"], axes=[1, 2, 3], keepdims=1),
    ]
    inits = [
        numpy_helper.from_array(np.array([v], np.int64), n) for n, v in (("zero", 0), ("one", 1))
    ]
    infos = []
    for name, value in outputs.items():
        value = np.asarray(value)
        inits.append(numpy_helper.from_array(value[None], f"{name}_value"))
        inits.append(numpy_helper.from_array(np.array(value.shape, np.int64), f"{name}_dims"))
        nodes.append(helper.make_node("Concat", ["n", f"{name}_dims"], [f"{name}_shape"], axis=0))
        expanded = name if name not in scaled else f"{name}_raw"
        nodes.append(helper.make_node("Expand", [f"{name}_value", f"{name}_shape"], [expanded]))
        if name in scaled:
            ones = np.array([-1] + [1] * value.ndim, np.int64)
            inits.append(numpy_helper.from_array(ones, f"{name}_peak_shape"))
            nodes.append(
                helper.make_node("Reshape", ["peak", f"{name}_peak_shape"], [f"{name}_peak"])
            )
            nodes.append(helper.make_node("Mul", [f"{name}_raw", f"{name}_peak"], [name]))
        elem = helper.np_dtype_to_tensor_dtype(value.dtype)
        infos.append(helper.make_tensor_value_info(name, elem, ["N", *value.shape]))
    return _save(nodes, inits, infos, path, input_chw)


def mask_model(path: Path, input_hw: tuple[int, int]) -> Path:
    """Probability map = channel mean of the image, average-pooled 2x2 (a stride-2 map)."""
    nodes = [
        helper.make_node("ReduceMean", [INPUT], ["gray"], axes=[1], keepdims=1),
        helper.make_node("AveragePool", ["gray"], ["prob"], kernel_shape=[2, 2], strides=[2, 2]),
    ]
    out = helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", 1, None, None])
    return _save(nodes, [], [out], path, (3, *input_hw))


def run_per_image(
    path: Path, batch: np.ndarray, output_names: tuple[str, ...]
) -> list[dict[str, np.ndarray]]:
    """Run ``batch`` through ONNX Runtime and split the outputs per image (batch dim removed)."""
    spec = EngineSpec(
        model="test",
        version="1",
        onnx_path=path,
        input_name=INPUT,
        input_shape=tuple(batch.shape[1:]),
        input_dtype="float32",
        output_names=output_names,
        batch_sizes=(batch.shape[0],),
    )
    engine = OnnxRuntimeEngine.load(spec, providers=["CPUExecutionProvider"])
    try:
        outputs = engine.infer(np.ascontiguousarray(batch, dtype=np.float32))
    finally:
        engine.close()
    return [{name: value[i] for name, value in outputs.items()} for i in range(batch.shape[0])]
