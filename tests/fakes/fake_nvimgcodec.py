"""A fake of nvImageCodec's Python API (``nvidia.nvimgcodec``), backed by Pillow.

It follows the documented API (0.9, the current wheel; with 0.5's ``DecodeSource`` too):
``Decoder(device_id=, max_num_cpu_threads=, backend_kinds=, options=)``,
``Decoder.decode(list, params=, cuda_stream=)`` returning an ``Image`` or ``None`` per
input (never raising for a bad input), ``DecodeParams(apply_exif_orientation=True,
color_spec=SRGB, allow_any_depth=False)``, ``CodeStream(bytes)`` with
``get_sub_code_stream(region=)``, ``Region(start_y, start_x, end_y, end_x)`` and
``Image`` with ``__cuda_array_interface__`` (the fake's "device" memory is host memory,
read through :mod:`tests.fakes.fake_cupy`).

Like the real decoder: the region is in the stored orientation when EXIF orientation
is not applied; chroma is upsampled by nearest neighbour unless the options say
``fancy_upsampling=1``; CMYK and non-JPEG inputs give ``None`` (the fake has no CPU
codecs); ``STATE.refuse_progressive`` makes progressive JPEGs give ``None`` as nvJPEG's
hardware path can; ``STATE.out_of_memory`` makes the next decode call raise as CUDA
allocation failures do.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import numpy as np
from PIL import Image as PILImage
from PIL import ImageOps

__version__ = "0.6.0"


class ColorSpec(IntEnum):
    """0.9's names (0.5 called sRGB ``RGB`` and sYCC ``YCC``)."""

    UNKNOWN = 0
    UNCHANGED = 0
    SRGB = 1
    GRAY = 2
    SYCC = 3
    CMYK = 4
    YCCK = 5


class BackendKind(IntEnum):
    CPU_ONLY = 1
    GPU_ONLY = 2
    HYBRID_CPU_GPU = 3
    HW_GPU_ONLY = 4


@dataclass
class _State:
    decoders: list[Decoder] = field(default_factory=list)
    calls: list[int] = field(default_factory=list)  # batch size of each decode call
    regions: list[Region | None] = field(default_factory=list)  # region of each decoded source
    streams: list[int] = field(default_factory=list)  # cuda_stream of each decode call
    params: list[DecodeParams] = field(default_factory=list)  # params of each decode call
    refuse_progressive: bool = False
    out_of_memory: int = 0  # decode calls left that raise out of memory


STATE = _State()


def reset() -> None:
    global STATE
    STATE = _State()


class Region:
    def __init__(self, start_y: int, start_x: int, end_y: int, end_x: int) -> None:
        self.start = (start_y, start_x)
        self.end = (end_y, end_x)
        self.ndim = 2

    def __repr__(self) -> str:
        return f"Region(start={self.start}, end={self.end})"


class CodeStream:
    def __init__(self, data: bytes, region: Region | None = None) -> None:
        if not isinstance(data, bytes | bytearray | memoryview | np.ndarray):
            raise TypeError(f"CodeStream takes bytes or a uint8 array, not {type(data).__name__}")
        self._data = bytes(data)
        self.region = region
        try:
            with PILImage.open(io.BytesIO(self._data)) as image:
                self.width, self.height = image.size
                self.codec_name = (image.format or "").lower()
                self.channels = len(image.getbands())
        except Exception:  # noqa: BLE001 - the real CodeStream parses lazily too
            self.width = self.height = self.channels = 0
            self.codec_name = ""

    def get_sub_code_stream(self, region: Region | None = None) -> CodeStream:
        return CodeStream(self._data, region)


class DecodeSource:
    """nvImageCodec 0.5's source type (0.6 replaced it by sub code streams)."""

    def __init__(self, code_stream: CodeStream | bytes, region: Region | None = None) -> None:
        stream = code_stream if isinstance(code_stream, CodeStream) else CodeStream(code_stream)
        self.code_stream = CodeStream(stream._data, region)
        self.region = region


class DecodeParams:
    def __init__(
        self,
        apply_exif_orientation: bool = True,
        color_spec: ColorSpec = ColorSpec.SRGB,
        allow_any_depth: bool = False,
    ) -> None:
        self.apply_exif_orientation = apply_exif_orientation
        self.color_spec = color_spec
        self.allow_any_depth = allow_any_depth


class Image:
    """Decoded pixels, HWC uint8, exposed through ``__cuda_array_interface__``."""

    def __init__(self, pixels: np.ndarray) -> None:
        self._pixels = np.ascontiguousarray(pixels)

    @property
    def shape(self) -> tuple[int, ...]:
        return self._pixels.shape

    @property
    def height(self) -> int:
        return self._pixels.shape[0]

    @property
    def width(self) -> int:
        return self._pixels.shape[1]

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        return {
            "shape": self._pixels.shape,
            "typestr": self._pixels.dtype.str,
            "data": (self._pixels.ctypes.data, False),
            "strides": None,
            "version": 3,
            "stream": 1,
        }

    def cpu(self) -> np.ndarray:
        return self._pixels.copy()


class Decoder:
    def __init__(
        self,
        device_id: int = -1,
        max_num_cpu_threads: int = 0,
        backend_kinds: list[BackendKind] | None = None,
        options: str = ":fancy_upsampling=0",
    ) -> None:
        self.device_id = device_id
        self.options = options
        self.fancy_upsampling = bool(re.search(r"(^|\s|:)fancy_upsampling=1\b", options))
        STATE.decoders.append(self)

    def decode(self, srcs: Any, params: DecodeParams | None = None, cuda_stream: int = 0) -> Any:
        if not isinstance(cuda_stream, int):
            raise TypeError(
                f"cuda_stream must be an int (a cudaStream_t), not {type(cuda_stream).__name__}"
            )
        single = not isinstance(srcs, list)
        items = [srcs] if single else srcs
        STATE.calls.append(len(items))
        STATE.streams.append(cuda_stream)
        if STATE.out_of_memory:
            STATE.out_of_memory -= 1
            raise RuntimeError("nvImageCodec: CUDA error: out of memory")
        params = params or DecodeParams()
        STATE.params.append(params)
        out = [self._one(src, params) for src in items]
        return out[0] if single else out

    def _one(self, src: Any, params: DecodeParams) -> Image | None:
        stream = src.code_stream if isinstance(src, DecodeSource) else src
        if isinstance(stream, bytes | bytearray):
            stream = CodeStream(stream)
        STATE.regions.append(stream.region)
        try:
            image = PILImage.open(io.BytesIO(stream._data))
            if image.format != "JPEG" or image.mode == "CMYK":
                return None
            if STATE.refuse_progressive and image.info.get("progressive"):
                return None
            image.load()
        except Exception:  # noqa: BLE001 - the real decoder returns None for undecodable input
            return None
        if params.apply_exif_orientation:
            image = ImageOps.exif_transpose(image)
        rgb = self._rgb(image)
        if stream.region is not None:
            (y0, x0), (y1, x1) = stream.region.start, stream.region.end
            if not (0 <= y0 < y1 <= rgb.shape[0] and 0 <= x0 < x1 <= rgb.shape[1]):
                return None
            rgb = rgb[y0:y1, x0:x1]
        return Image(rgb)

    def _rgb(self, image: PILImage.Image) -> np.ndarray:
        if self.fancy_upsampling or image.mode != "YCbCr" and image.mode != "RGB":
            return np.asarray(image.convert("RGB"))
        # Nearest-neighbour chroma, as nvJPEG without fancy upsampling: every 2x2 block
        # shares the chroma of its top-left pixel.
        ycc = np.asarray(image.convert("YCbCr")).copy()
        h, w = ycc.shape[:2]
        for c in (1, 2):
            coarse = ycc[::2, ::2, c]
            ycc[..., c] = np.repeat(np.repeat(coarse, 2, axis=0), 2, axis=1)[:h, :w]
        return np.asarray(PILImage.fromarray(ycc, "YCbCr").convert("RGB"))
