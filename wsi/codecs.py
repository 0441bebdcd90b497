"""A JPEG codec for Zarr v3 arrays of RGB tiles.

zarr-python 3 ships no image codec. :class:`JpegCodec` is an array-to-bytes
codec named ``"wsi_pipeline.jpeg"``: each chunk of shape ``(k, H, W, C)``
(uint8, C = 1 or 3) is encoded as ONE baseline JPEG of the ``k`` tiles
stacked vertically, ``(k*H, W, C)``. Tile stores keep one tile per chunk and
group the chunks into zarr v3 shard files, so a chunk is a JPEG stream inside
a shard (its offset and length in the shard's index), not a file of its own.

Reading a store therefore needs this codec registered. Importing
:mod:`wsi.codecs` registers it, and the package declares it under the
``zarr.codecs`` entry point, so zarr finds it by itself once ``wsi-pipeline``
is installed. Without the pipeline, install the codec alone: this module is
also the tiny distribution ``wsi-pipeline-jpeg`` (``codecs-dist/`` in the
repository, module ``wsi_pipeline_jpeg``; it needs zarr, numpy and
imagecodecs), and stock zarr-python then opens the ``tiles`` array.
This file must import nothing of the pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass

import imagecodecs
import numpy as np
from zarr.abc.codec import ArrayBytesCodec
from zarr.core.array_spec import ArraySpec
from zarr.core.buffer import Buffer, NDBuffer
from zarr.registry import register_codec

CODEC_NAME = "wsi_pipeline.jpeg"


@dataclass(frozen=True)
class JpegCodec(ArrayBytesCodec):
    """Lossy JPEG for uint8 image chunks ``(k, H, W, C)`` with C in {1, 3}.

    Parameters
    ----------
    quality : int
        JPEG quality, 1-100 (90 keeps tissue texture with ~8x compression).
    """

    is_fixed_size = False
    quality: int = 90

    def __init__(self, *, quality: int = 90) -> None:
        if not 1 <= int(quality) <= 100:
            raise ValueError(f"JPEG quality must be in [1, 100], got {quality}")
        object.__setattr__(self, "quality", int(quality))

    @classmethod
    def from_dict(cls, data: dict) -> "JpegCodec":
        if data.get("name") != CODEC_NAME:
            raise ValueError(f"not a {CODEC_NAME} codec: {data!r}")
        return cls(**(data.get("configuration") or {}))

    def to_dict(self) -> dict:
        return {"name": CODEC_NAME, "configuration": {"quality": self.quality}}

    def validate(self, *, shape, dtype, chunk_grid) -> None:
        native = dtype.to_native_dtype() if hasattr(dtype, "to_native_dtype") else np.dtype(dtype)
        if np.dtype(native) != np.uint8:
            raise ValueError(f"{CODEC_NAME} needs uint8 data, got {native}")
        if len(shape) not in (3, 4) or (len(shape) == 4 and shape[-1] not in (1, 3)):
            raise ValueError(f"{CODEC_NAME} needs (k, H, W) or (k, H, W, 1|3) arrays, got {shape}")

    def evolve_from_array_spec(self, array_spec: ArraySpec) -> "JpegCodec":
        return self

    def compute_encoded_size(self, input_byte_length: int, chunk_spec: ArraySpec) -> int:
        raise NotImplementedError  # variable size

    @staticmethod
    def _stack(chunk: np.ndarray) -> np.ndarray:
        k, h = chunk.shape[0], chunk.shape[1]
        return np.ascontiguousarray(chunk.reshape((k * h,) + chunk.shape[2:]))

    def encode_array(self, chunk: np.ndarray) -> bytes:
        """Encode one chunk ``(k, H, W[, C])`` to JPEG bytes."""
        chunk = np.asarray(chunk, dtype=np.uint8)
        # One tile: hand the (possibly strided) view to libjpeg as is, no copy.
        img = chunk[0] if chunk.shape[0] == 1 else self._stack(chunk)
        if img.ndim == 3 and img.shape[-1] == 1:
            img = img[..., 0]
        return bytes(imagecodecs.jpeg8_encode(img, level=self.quality))

    @staticmethod
    def decode_bytes(data: bytes, shape: tuple[int, ...]) -> np.ndarray:
        """Decode JPEG bytes back into a chunk of ``shape``."""
        img = imagecodecs.jpeg8_decode(data)
        return np.asarray(img).reshape(shape)

    async def _encode_single(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer | None:
        arr = chunk_array.as_numpy_array()
        return chunk_spec.prototype.buffer.from_bytes(self.encode_array(arr))

    async def _decode_single(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        arr = self.decode_bytes(chunk_bytes.to_bytes(), chunk_spec.shape)
        return chunk_spec.prototype.nd_buffer.from_numpy_array(arr)


register_codec(CODEC_NAME, JpegCodec)
