"""Whole batches of encoded images to one normalized, device-resident model input.

For GPU replicas: a formed batch of image bytes goes in, one tensor in the model's
layout and dtype comes out, already on the GPU, plus a per-input error for the
images that could not be used. Nothing model-sized or larger crosses PCIe except
the JPEG bytes themselves, and no float32 image of the photo's size exists:

1. Each header is read on the host (:mod:`serve.imaging.jpeg_header`, a few hundred
   bytes): size limit, EXIF orientation, and whether the GPU decoder can take it.
2. :func:`serve.imaging.resample.plan_resize` says which upright pixels the model
   sees (the centre crop plus the filter's reach); that rectangle, mapped back to
   stored orientation, is the only part decoded, all JPEGs of the batch in one
   ``nvimgcodec.Decoder.decode`` call with fancy (interpolated) chroma upsampling,
   which is what libjpeg-turbo, and so the CPU path, does. nvImageCodec's Python
   API has no reduced-scale (DCT scaling) decode, so the region is decoded at full
   resolution.
3. The decoded region is turned upright as a view, resampled (Pillow's antialiased
   bilinear filter, uint8 in), normalized and written into the slot of a
   preallocated output buffer, all with the array module ``xp`` (CuPy).

Per image, whatever the GPU decoder refuses or cannot take (CMYK, arithmetic coding,
non-JPEG formats, a JPEG it returns ``None`` for) goes through the CPU decoder
(:func:`serve.imaging.cpu_decode.prepare_image`) with its error semantics
(``not_an_image``, ``image_too_large``), and only the model-sized result is uploaded.
Device out-of-memory is a :class:`~shared.errors.TransientError`: retrying later
may succeed.

The output buffers are *slots* (two by default), each with its own CUDA stream, so
the next batch can be prepared while the engine runs the previous one
(:func:`serve.imaging.overlap.overlapped`); a slot is free again when its
:class:`DeviceBatch` is released.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from serve.imaging.cpu_decode import PreparedImage, prepare_image
from serve.imaging.jpeg_header import JpegHeader, read_jpeg_header
from serve.imaging.resample import Region, orient, plan_resize, resample, stored_region
from serve.model_config import InputSpec, PreprocessSpec
from serve.postprocess.base import ImageGeometry
from shared.errors import ConfigError, ErrorReason, PermanentError, TransientError

logger = logging.getLogger(__name__)

__all__ = [
    "DeviceBatch",
    "DeviceBatchPreparer",
    "device_decode_unavailable",
    "load_device_modules",
]

INSTALL_HINT = (
    "install nvImageCodec and CuPy for the CUDA major of the driver: "
    "pip install nvidia-nvimgcodec-cu12 cupy-cuda12x (or nvidia-nvimgcodec-cu13 cupy-cuda13x)"
)
# libjpeg-turbo (the CPU path) interpolates 4:2:0 chroma; nvImageCodec defaults to
# nearest-neighbour chroma, which alone costs several points of top-1 agreement.
DECODER_OPTIONS = ":fancy_upsampling=1"
_SLOT_WAIT_S = 120.0
ImageError = PermanentError | TransientError


def load_device_modules() -> tuple[Any, Any]:
    """``(nvimgcodec, cupy)``, imported here and only here.

    Raises:
        ConfigError: either is missing, with the install hint.
    """
    try:
        import cupy
    except ImportError as err:
        raise ConfigError(f"device image pipeline needs CuPy ({err}); {INSTALL_HINT}") from err
    try:
        from nvidia import nvimgcodec
    except ImportError as err:
        raise ConfigError(
            f"device image pipeline needs nvImageCodec ({err}); {INSTALL_HINT}"
        ) from err
    return nvimgcodec, cupy


def device_decode_unavailable(device: int = 0) -> str | None:
    """Why batches cannot be decoded on GPU ``device`` here, or None when they can."""
    try:
        _, cupy = load_device_modules()
    except ConfigError as err:
        return str(err)
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as err:  # noqa: BLE001 - CuPy raises its own CUDARuntimeError without a driver
        return f"no CUDA device: {err}"
    if device >= count:
        return f"no CUDA device {device} (have {count})"
    return None


def is_out_of_memory(err: BaseException, cupy: Any) -> bool:
    """CuPy's allocator error, or a CUDA/nvImageCodec error that says out of memory."""
    oom = getattr(getattr(getattr(cupy, "cuda", None), "memory", None), "OutOfMemoryError", None)
    if oom is not None and isinstance(err, oom):
        return True
    text = str(err).lower()
    return "out of memory" in text or "cudaerrormemoryallocation" in text


@dataclass
class DeviceBatch:
    """One prepared batch: rows of ``tensor`` are the usable inputs, in input order.

    Attributes:
        tensor: Device array ``(rows, ...)`` in the model's layout and dtype (a view of
            the preparer's buffer: valid until :meth:`release`).
        positions: Input position of each row.
        geometries: Geometry of each row, as the CPU path reports it.
        decoded_on: ``"gpu"`` or ``"cpu"`` per row (the CPU decoder took that image).
        errors: Input position -> the error that input deserves.
    """

    tensor: Any
    positions: list[int]
    geometries: list[ImageGeometry]
    decoded_on: list[str]
    errors: dict[int, ImageError]
    size: int
    _release: Any = field(default=None, repr=False)

    def outcomes(self) -> list[tuple[int, ImageGeometry] | ImageError]:
        """Per input: ``(row, geometry)`` or its error (one entry per input)."""
        out: list[tuple[int, ImageGeometry] | ImageError] = [None] * self.size  # type: ignore[list-item]
        for row, (pos, geometry) in enumerate(zip(self.positions, self.geometries, strict=True)):
            out[pos] = (row, geometry)
        for pos, err in self.errors.items():
            out[pos] = err
        return out

    def release(self) -> None:
        """Give the buffer slot back (after the engine has read ``tensor``)."""
        if self._release is not None:
            self._release()
            self._release = None

    def __enter__(self) -> DeviceBatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass(frozen=True, slots=True)
class _Planned:
    header: JpegHeader
    region: Region  # stored orientation
    plan: Any  # ResizePlan


class DeviceBatchPreparer:
    """Decodes, resizes, crops and normalizes batches on one GPU (see the module doc).

    ``modules`` is ``(nvimgcodec, cupy)``; by default :func:`load_device_modules`.
    """

    def __init__(
        self,
        spec: InputSpec,
        pre: PreprocessSpec,
        *,
        max_batch: int,
        max_pixels: int,
        device: int = 0,
        slots: int = 2,
        modules: tuple[Any, Any] | None = None,
    ) -> None:
        if max_batch < 1 or slots < 1:
            raise ValueError(f"max_batch and slots must be >= 1, got {max_batch}, {slots}")
        nvimgcodec, cupy = modules or load_device_modules()
        self._nv, self._xp = nvimgcodec, cupy
        self._spec, self._pre = spec, pre
        self._max_batch, self._max_pixels, self.device = max_batch, max_pixels, device
        with cupy.cuda.Device(device):
            # One decoder per slot: batches in two slots are decoded concurrently, and a
            # decoder keeps per-call state (its buffers, its streams).
            self._decoders = [
                nvimgcodec.Decoder(device_id=device, options=DECODER_OPTIONS) for _ in range(slots)
            ]
            self._streams = [cupy.cuda.Stream(non_blocking=True) for _ in range(slots)]
        # Orientation is applied on the device, after the region decode: nvImageCodec would
        # otherwise rotate the whole image and the region would have to be given upright.
        # sRGB is ColorSpec.SRGB from nvImageCodec 0.7 on, ColorSpec.RGB before.
        srgb = getattr(nvimgcodec.ColorSpec, "SRGB", None) or nvimgcodec.ColorSpec.RGB
        self._params = nvimgcodec.DecodeParams(
            apply_exif_orientation=False, color_spec=srgb, allow_any_depth=False
        )
        self._buffers: list[Any] = [None] * slots
        self._free: queue.Queue[int] = queue.Queue()
        for slot in range(slots):
            self._free.put(slot)
        mean = np.asarray(pre.mean, dtype=np.float32) / pre.scale
        inv_std = pre.scale / np.asarray(pre.std, dtype=np.float32)
        self._mean, self._inv_std = mean, inv_std
        pad = np.full(3, pre.pad_value, dtype=np.float32)
        self._pad = pad if spec.dtype == "uint8" else (pad - mean) * inv_std

    @property
    def max_batch(self) -> int:
        """The most inputs one :meth:`prepare` call takes."""
        return self._max_batch

    @property
    def name(self) -> str:
        """What decodes, for results' ``decode`` field."""
        return f"nvimgcodec:cuda:{self.device}"

    def _shape(self, rows: int) -> tuple[int, ...]:
        h, w, c = self._spec.height, self._spec.width, self._spec.channels
        return (rows, c, h, w) if self._spec.layout == "NCHW" else (rows, h, w, c)

    def _buffer(self, slot: int) -> Any:
        if self._buffers[slot] is None:
            try:
                self._buffers[slot] = self._xp.empty(
                    self._shape(self._max_batch), dtype=self._spec.dtype
                )
            except Exception as err:
                if is_out_of_memory(err, self._xp):
                    raise TransientError(
                        f"GPU {self.device} out of memory for the batch buffer: {err}"
                    ) from err
                raise
        return self._buffers[slot]

    def prepare(self, datas: Sequence[bytes]) -> DeviceBatch:
        """Prepare ``datas`` (at most ``max_batch``) into a free slot; release the result after use.

        Raises:
            TransientError: the batch buffer cannot be allocated (device out of memory).
        """
        if len(datas) > self._max_batch:
            raise ValueError(f"batch of {len(datas)} exceeds max_batch {self._max_batch}")
        try:
            slot = self._free.get(timeout=_SLOT_WAIT_S)
        except queue.Empty as err:
            raise RuntimeError("no free batch slot: a DeviceBatch was not released") from err
        try:
            with self._xp.cuda.Device(self.device), self._streams[slot]:
                batch = self._prepare(datas, slot)
                self._streams[slot].synchronize()
        except BaseException:
            self._free.put(slot)
            raise
        batch._release = lambda: self._free.put(slot)
        return batch

    def _prepare(self, datas: Sequence[bytes], slot: int) -> DeviceBatch:
        buf = self._buffer(slot)
        errors: dict[int, ImageError] = {}
        planned: dict[int, _Planned] = {}
        for i, data in enumerate(datas):
            header = read_jpeg_header(data)
            if header is None or not header.for_gpu:
                continue  # the CPU decoder decides (another format, CMYK, or not an image)
            if header.width * header.height > self._max_pixels:
                errors[i] = PermanentError(
                    ErrorReason.IMAGE_TOO_LARGE,
                    f"image is {header.width}x{header.height} = {header.width * header.height} "
                    f"pixels, limit {self._max_pixels}",
                )
                continue
            width, height = header.upright_size
            plan = plan_resize(width, height, self._spec, self._pre)
            region = stored_region(plan.region, header.orientation, header.width, header.height)
            planned[i] = _Planned(header, region, plan)
        decoded = self._decode(datas, planned, slot, errors)
        batch = DeviceBatch(buf, [], [], [], errors, len(datas))
        for i, data in enumerate(datas):
            if i in errors:
                continue
            try:
                if decoded.get(i) is not None:
                    self._write_decoded(buf, len(batch.positions), decoded[i], planned[i])
                    geometry, where = planned[i].plan.geometry, "gpu"
                else:
                    prepared = prepare_image(data, self._spec, self._pre, self._max_pixels)
                    self._write_prepared(buf, len(batch.positions), prepared)
                    geometry, where = prepared.geometry, "cpu"
            except PermanentError as err:
                errors[i] = err
                continue
            except Exception as err:
                if not is_out_of_memory(err, self._xp):
                    raise
                errors[i] = TransientError(
                    f"GPU {self.device} out of memory preparing input {i}: {err}"
                )
                continue
            batch.positions.append(i)
            batch.geometries.append(geometry)
            batch.decoded_on.append(where)
        batch.tensor = buf[: len(batch.positions)]
        return batch

    def _decode(
        self,
        datas: Sequence[bytes],
        planned: dict[int, _Planned],
        slot: int,
        errors: dict[int, ImageError],
    ) -> dict[int, Any]:
        """One decoder call for every planned JPEG: position -> decoded region, or None
        where the decoder refused (that image goes to the CPU)."""
        if not planned:
            return {}
        positions = list(planned)
        sources = [self._source(datas[i], planned[i].region) for i in positions]
        try:
            images = self._decoders[slot].decode(
                sources, params=self._params, cuda_stream=self._streams[slot].ptr
            )
        except Exception as err:  # noqa: BLE001 - classified: OOM is transient, the rest goes to the CPU
            if is_out_of_memory(err, self._xp):
                for i in positions:
                    errors[i] = TransientError(f"GPU {self.device} out of memory decoding: {err}")
                return {}
            logger.warning(
                "nvImageCodec failed on a batch of %d (%s); decoding it on the CPU",
                len(positions),
                err,
            )
            return {}
        out: dict[int, Any] = {}
        for i, image in zip(positions, images, strict=True):
            if image is None:
                logger.info("nvImageCodec refused input %d; decoding it on the CPU", i)
            out[i] = image
        return out

    def _source(self, data: bytes, region: Region) -> Any:
        """A decode source for ``region`` of ``data``: ``CodeStream.get_sub_code_stream``
        (nvImageCodec >= 0.6) or ``DecodeSource`` (0.5)."""
        nv = self._nv
        roi = nv.Region(region.y0, region.x0, region.y1, region.x1)
        stream = nv.CodeStream(data)
        if hasattr(stream, "get_sub_code_stream"):
            return stream.get_sub_code_stream(region=roi)
        return nv.DecodeSource(stream, roi)

    def _write_decoded(self, buf: Any, row: int, image: Any, item: _Planned) -> None:
        xp = self._xp
        pixels = xp.asarray(image)  # zero copy through __cuda_array_interface__
        region, header = item.region, item.header
        if pixels.shape[:2] == (header.height, header.width) and (region.height, region.width) != (
            header.height,
            header.width,
        ):
            pixels = pixels[
                region.y0 : region.y1, region.x0 : region.x1
            ]  # decoder ignored the region
        if pixels.shape[:2] != (region.height, region.width):
            raise PermanentError(
                ErrorReason.NOT_AN_IMAGE,
                f"decoder returned {pixels.shape} for region {region} of a "
                f"{header.width}x{header.height} JPEG",
            )
        if pixels.ndim == 2 or pixels.shape[2] == 1:
            pixels = xp.broadcast_to(
                pixels.reshape(pixels.shape[0], pixels.shape[1], 1), (*pixels.shape[:2], 3)
            )
        values = resample(xp, orient(xp, pixels, header.orientation), item.plan)
        if self._pre.channel_order == "BGR":
            values = values[..., ::-1]
        self._store(buf, row, values, item.plan.offset, letterbox=self._pre.resize == "letterbox")

    def _write_prepared(self, buf: Any, row: int, prepared: PreparedImage) -> None:
        """A CPU-decoded image: already model-sized, padded and in channel order."""
        values = self._xp.asarray(prepared.pixels).astype(self._xp.float32)
        self._store(buf, row, values, (0, 0), letterbox=False)

    def _store(
        self, buf: Any, row: int, values: Any, offset: tuple[int, int], *, letterbox: bool
    ) -> None:
        xp = self._xp
        if self._spec.dtype != "uint8":
            values = (values - xp.asarray(self._mean)) * xp.asarray(self._inv_std)
        slot = buf[row].transpose(1, 2, 0) if self._spec.layout == "NCHW" else buf[row]
        if letterbox:
            slot[...] = xp.asarray(self._pad)
            top, left = offset
            slot[top : top + values.shape[0], left : left + values.shape[1]] = values
        else:
            slot[...] = values
