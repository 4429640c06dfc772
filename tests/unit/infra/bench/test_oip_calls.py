"""The OIP calls bench's request body and figures (the stack run itself is the bench)."""

from __future__ import annotations

import pytest

from infra.bench.oip_calls import binary_call, summary
from serve.http import oip


def test_the_call_is_binary_tensor_data_the_protocol_parses() -> None:
    body, headers = binary_call([b"first", b"second photo"])

    request = oip.parse_infer_request(body, headers["inference-header-content-length"])

    [tensor] = request.inputs
    assert (tensor.name, tensor.datatype, tensor.shape) == ("image", "BYTES", (2,))
    assert list(tensor.value) == [b"first", b"second photo"]
    assert request.outputs == (oip.RequestedOutput("logits", False, 1),)


def test_the_figures_leave_out_the_warm_up_calls() -> None:
    figures = summary([9.0, 5.0, 1.0, 2.0, 1.5], images=100, warm_up=2)

    assert figures == {
        "calls": 3, "images_per_call": 100, "call_s_median": 1.5, "call_s_min": 1.0,
        "call_s_max": 2.0, "images_per_s": 66.7,
    }  # fmt: skip
    with pytest.raises(ValueError, match="no calls left after 5 warm-up calls"):
        summary([1.0], images=1, warm_up=5)
