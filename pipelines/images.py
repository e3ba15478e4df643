"""Encoded image bytes to an 8-bit BGR array, or to a status that says why not.

The labeling job reads untrusted objects; `decode_image` never raises on bad data, it returns a
`DecodedImage` whose `status` is one of `STATUSES`:

* ``ok``: decoded. ``image`` is uint8 (H, W, 3) BGR in display orientation (EXIF orientation applied,
  so ``width``/``height`` are the displayed size). Greyscale, palette, CMYK and 16-bit images are converted:
  16-bit samples keep their high byte (``v >> 8``, within 1 of ``round(v / 257)``), as OpenCV does.
  Transparent images (alpha channel, transparent palette entry or colour key) are composited over
  ``background`` (white by default, as viewers show them), because the stored colour under fully
  transparent pixels is arbitrary and the network must not see it.
* ``empty``: the object has 0 bytes.
* ``too_large``: the header declares more than ``max_pixels`` pixels. Only the header is read (Pillow's
  lazy open), so a decompression bomb never allocates its pixels.
* ``decode_error``: not an image, or a corrupt or truncated one; ``error`` names the reason.

Decoding: OpenCV (libjpeg-turbo, libpng, libwebp...) decodes opaque images; Pillow decodes transparent
ones (OpenCV drops alpha without compositing) and anything OpenCV rejects, so Pillow's message becomes the
reason when both fail. A truncated JPEG (no end-of-image marker) is a ``decode_error``: OpenCV 5 rejects
it and Pillow reports "image file is truncated". Known limit: corrupt entropy-coded bytes in the middle
of a complete JPEG are resynchronised by libjpeg (a warning on stderr) and decode, with garbled blocks,
as ``ok``; detecting them would cost a second, strict decode of every image. A header declaring a zero
width or height is a ``decode_error``. A PNG whose chunks do not all lie within the data goes to Pillow,
not OpenCV (whose reader allocates a corrupt chunk length's worth of memory first).
tests/test_fuzz_images.py fuzzes all of this (time, memory and never raising).
"""
from __future__ import annotations

import dataclasses
import io
import logging
import struct
import types
import warnings

import cv2
import numpy as np
from PIL import Image, ImageOps

LOG = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 50_000_000
"""Default pixel limit: a 50 MP photo (8660 x 5773) decodes to 150 MB of BGR; larger ones are refused."""

STATUSES: types.MappingProxyType[str, str] = types.MappingProxyType({
    "ok": "decoded; width and height are the displayed size (after EXIF orientation)",
    "empty": "the object has 0 bytes",
    "decode_error": "not an image, or a corrupt or truncated one; the error column names the reason",
    "too_large": "the header declares more pixels than the job's max_pixels; the pixels were not decoded",
    "read_error": "the object could not be read from storage after retries (set by the labeling job)",
    "inference_error": "the network or the keypoint assignment failed on this image (set by the labeling job)",
})
"""Every status of an image in a labeling run with its meaning, in the order documentation lists them.
`decode_image` returns the first four; the labeling job sets the others."""

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


@dataclasses.dataclass(frozen=True)
class DecodedImage:
    """The outcome of decoding one object.

    image: uint8 (height, width, 3) BGR, C-contiguous, when status is "ok"; else None.
    status: a key of `STATUSES`. error: "" when ok, else a one-line reason.
    width, height: pixels; displayed size when ok, the header's stored size (before EXIF orientation)
    when the header was readable, else 0. format: Pillow's format name ("JPEG", "PNG"...) or "".
    """

    image: np.ndarray | None
    status: str
    error: str
    width: int
    height: int
    format: str = ""

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"DecodedImage: unknown status {self.status!r}; valid: {list(STATUSES)}")
        if (self.status == "ok") != (self.image is not None):
            raise ValueError(f"DecodedImage: status {self.status!r} with image "
                             f"{'missing' if self.image is None else 'present'}")
        if (self.status == "ok") != (self.error == ""):
            raise ValueError(f"DecodedImage: status {self.status!r} needs {'no' if self.status == 'ok' else 'an'} "
                             f"error message, got {self.error!r}")

    @classmethod
    def failure(cls, status: str, error: str, width: int = 0, height: int = 0, format: str = "") -> DecodedImage:
        """A result without pixels, e.g. ``DecodedImage.failure("read_error", "NoSuchKey: ...")``."""
        return cls(None, status, error, int(width), int(height), format)


def status_table() -> str:
    """`STATUSES` as a Markdown table (for docs/tables.md and `--help` texts)."""
    rows = [f"| `{status}` | {meaning} |" for status, meaning in STATUSES.items()]
    return "\n".join(["| status | meaning |", "|---|---|", *rows])


def decode_image(data: bytes | bytearray | memoryview, max_pixels: int = DEFAULT_MAX_PIXELS, *,
                 background: tuple[int, int, int] = (255, 255, 255)) -> DecodedImage:
    """Decode encoded image bytes (JPEG, PNG, WebP, BMP, TIFF, GIF, ...) to uint8 BGR; never raises on bad data.

    max_pixels: refuse images whose header declares more than this many pixels (width * height): status
      too_large, width and height from the header, the reason quoting max_pixels (`--max-pixels`).
      Pillow's own limit (`PIL.Image.MAX_IMAGE_PIXELS`) is not used, so max_pixels may exceed it.
    background: BGR colour (0-255) that transparent pixels are composited over.
    Raises TypeError/ValueError only for invalid arguments (not bytes-like, max_pixels < 1, bad background).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"decode_image: data must be bytes-like, got {type(data).__name__}")
    if int(max_pixels) < 1:
        raise ValueError(f"decode_image: max_pixels must be >= 1, got {max_pixels}")
    if len(background) != 3 or not all(0 <= int(c) <= 255 for c in background):
        raise ValueError(f"decode_image: background must be 3 values in 0..255 (BGR), got {background!r}")
    data = bytes(data)
    if not data:
        return DecodedImage.failure("empty", "the object has 0 bytes")
    with warnings.catch_warnings():  # Pillow warns on corrupt EXIF etc.; under `-W error` that would raise
        warnings.simplefilter("ignore")
        return _decode(data, int(max_pixels), background)


def _decode(data: bytes, max_pixels: int, background: tuple[int, int, int]) -> DecodedImage:
    """`decode_image` after its argument checks, for non-empty bytes."""
    try:  # Pillow reads only the header here: size, mode and format, no pixels.
        header = _open_header(data)
    except _PillowLimit as exc:  # a plugin refused a size above Pillow's hard limit before reporting it
        return DecodedImage.failure("too_large", f"header declares more than {exc} pixels > max_pixels "
                                    f"{max_pixels} (--max-pixels)")
    except Exception as exc:  # untrusted bytes: any failure to identify them is data, not a crash
        LOG.debug("unidentified image (%s: %s)", type(exc).__name__, exc)
        return DecodedImage.failure("decode_error", f"not a recognised image format (starts with {data[:16]!r})")
    width, height, fmt = header.width, header.height, header.format or ""
    if width < 1 or height < 1:
        return DecodedImage.failure("decode_error", f"{fmt} header declares a {width}x{height} image (no pixels)",
                                    max(width, 0), max(height, 0), fmt)
    if width * height > max_pixels:
        return DecodedImage.failure("too_large", f"{fmt} header declares {width}x{height} = {width * height} "
                                    f"pixels > max_pixels {max_pixels} (--max-pixels)", width, height, fmt)

    transparent = header.mode in _ALPHA_MODES or "transparency" in header.info
    image = None if transparent or not _safe_for_opencv(data, fmt) else _decode_with_opencv(data)
    if image is None:
        try:
            image = _decode_with_pillow(header, background)
        except Exception as exc:  # any decoder failure on untrusted bytes is reported, never raised
            return DecodedImage.failure("decode_error", f"{fmt} data is corrupt or truncated: "
                                        f"{type(exc).__name__}: {exc}", width, height, fmt)
    decoded_height, decoded_width = image.shape[:2]
    if decoded_width * decoded_height > max_pixels:  # a decoder read another size than Pillow's header
        return DecodedImage.failure("too_large", f"{fmt} data decodes to {decoded_width}x{decoded_height} = "
                                    f"{decoded_width * decoded_height} pixels > max_pixels {max_pixels} "
                                    "(--max-pixels)", decoded_width, decoded_height, fmt)
    if decoded_width < 1 or decoded_height < 1:
        return DecodedImage.failure("decode_error", f"{fmt} data decodes to an image without pixels",
                                    width, height, fmt)
    return DecodedImage(image, "ok", "", decoded_width, decoded_height, fmt)


class _PillowLimit(Exception):
    """A Pillow plugin refused a declared size above its hard limit without reporting the size."""


def _open_header(data: bytes) -> Image.Image:
    """Pillow's lazy open (header only) without Pillow's own pixel limit, which `max_pixels` replaces.

    `Image.open` refuses headers above 2 * `Image.MAX_IMAGE_PIXELS` without saying their size; for those
    the plugins are tried directly, as `Image.open` does, so width and height are known for `too_large`.
    Changing `Image.MAX_IMAGE_PIXELS` instead would lift the limit for every thread of the process.
    """
    try:  # (the caller ignores warnings: DecompressionBombWarning is noise, max_pixels is checked after)
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        pass
    Image.init()
    prefix = data[:16]
    for name in Image.ID:
        factory, accept = Image.OPEN[name]
        verdict = not accept or accept(prefix)
        if not verdict or isinstance(verdict, str):
            continue
        try:
            return factory(io.BytesIO(data), "")
        except Image.DecompressionBombError:  # the plugin checks the size itself (GIF frames...)
            raise _PillowLimit(2 * (Image.MAX_IMAGE_PIXELS or 0)) from None
        except (SyntaxError, IndexError, TypeError, struct.error):  # not this format: as Image.open does
            continue
    raise Image.UnidentifiedImageError("no Pillow plugin accepts the data")


_PNG_MAX_CHUNKS_CHECKED = 1 << 16


def _safe_for_opencv(data: bytes, fmt: str) -> bool:
    """False for inputs that make OpenCV allocate what a corrupt field declares instead of the image size.

    OpenCV 5's PNG reader allocates (and fills) a buffer of a chunk's declared length before noticing
    that the data ends first: one corrupt length byte makes a 400-byte file cost 2.3 GB and a second.
    A PNG is passed to OpenCV only when every chunk up to IEND lies within the data; others go to Pillow,
    which reads chunks in bounded blocks (and reports the truncation).
    """
    if fmt != "PNG":
        return True
    position, size = 8, len(data)
    for _ in range(_PNG_MAX_CHUNKS_CHECKED):
        if position + 12 > size:
            return False
        end = position + 12 + int.from_bytes(data[position:position + 4], "big")
        if end > size:
            return False
        if data[position + 4:position + 8] == b"IEND":
            return True
        position = end
    return False  # tens of thousands of chunks: not worth walking, Pillow decodes it


def _decode_with_opencv(data: bytes) -> np.ndarray | None:
    """OpenCV decode (applies EXIF orientation, converts to 8-bit BGR); None when OpenCV cannot."""
    try:
        return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error as exc:  # OpenCV 5 raises on some malformed buffers instead of returning None
        LOG.debug("OpenCV could not decode: %s", exc)
        return None


def _decode_with_pillow(image: Image.Image, background: tuple[int, int, int]) -> np.ndarray:
    """Full Pillow decode: EXIF orientation, 16-bit to 8-bit, alpha composited over `background` (BGR)."""
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I"):  # 16/32-bit grey: Pillow's convert() would clip at 255 instead of scaling
        values = np.asarray(image).astype(np.int64)
        key = image.info.get("transparency")
        alpha = np.where(values == key, 0, 255).astype(np.uint8) if key is not None else None
        rgb = np.repeat((np.clip(values, 0, 65535) >> 8).astype(np.uint8)[..., None], 3, axis=2)
    else:
        rgba = np.asarray(image.convert("RGBA"))
        rgb, alpha = rgba[..., :3], rgba[..., 3]
    bgr = rgb[..., ::-1]
    if alpha is not None:
        a = alpha[..., None].astype(np.uint32)
        bgr = (bgr * a + np.asarray(background, np.uint32) * (255 - a) + 127) // 255
    return np.ascontiguousarray(bgr, dtype=np.uint8)
