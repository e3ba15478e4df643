"""pipelines.images: every kind of input a labeling job meets, generated here with OpenCV and Pillow."""
from __future__ import annotations

import io
import time

import cv2
import numpy as np
import pytest
from PIL import Image

from pipelines.images import STATUSES, DecodedImage, decode_image, status_table
from pipelines.synthetic import broken_objects, draw_scene, png_header, sample_images

RED_BGR, BLUE_BGR = (0, 0, 255), (255, 0, 0)


def marked_bgr(height: int = 40, width: int = 60) -> np.ndarray:
    """Blue image with a red 10x10 block in the top-left corner: shows channel order and orientation."""
    image = np.empty((height, width, 3), np.uint8)
    image[:] = BLUE_BGR
    image[:10, :10] = RED_BGR
    return image


def pil_bytes(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def cv2_bytes(image: np.ndarray, ext: str, params: tuple = ()) -> bytes:
    ok, encoded = cv2.imencode(ext, image, list(params))
    assert ok
    return encoded.tobytes()


def scene_jpeg(progressive: bool = False) -> bytes:
    """A 480x640 photo-like JPEG (textured background, figures), big enough to truncate anywhere."""
    scene, _ = draw_scene(np.random.default_rng(3), 480, 640, persons=2)
    return pil_bytes(Image.fromarray(scene[..., ::-1]), "JPEG", quality=90, progressive=progressive)


def assert_ok(result: DecodedImage, height: int, width: int) -> np.ndarray:
    assert result.status == "ok", result.error
    assert result.error == ""
    assert result.image.dtype == np.uint8 and result.image.shape == (height, width, 3)
    assert result.image.flags.c_contiguous
    assert (result.width, result.height) == (width, height)
    return result.image.astype(np.int32)


@pytest.mark.parametrize("ext", [".png", ".bmp", ".tiff", ".webp"])
def test_lossless_formats_round_trip_exactly_in_bgr(ext):
    params = (cv2.IMWRITE_WEBP_QUALITY, 101) if ext == ".webp" else ()  # > 100 is WebP lossless
    image = marked_bgr()
    decoded = assert_ok(decode_image(cv2_bytes(image, ext, params)), 40, 60)
    np.testing.assert_array_equal(decoded, image)


def test_jpeg_keeps_bgr_order_and_accepts_any_bytes_like():
    data = cv2_bytes(marked_bgr(), ".jpg", (cv2.IMWRITE_JPEG_QUALITY, 95))
    for value in (data, bytearray(data), memoryview(data)):
        decoded = assert_ok(decode_image(value), 40, 60)
        assert np.abs(decoded[3:7, 3:7] - RED_BGR).max() < 40
        assert np.abs(decoded[20:, 20:] - BLUE_BGR).max() < 40
    assert decode_image(data).format == "JPEG"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_grayscale_becomes_three_equal_channels(fmt):
    gray = np.tile(np.arange(0, 240, 4, dtype=np.uint8), (40, 1))
    decoded = assert_ok(decode_image(pil_bytes(Image.fromarray(gray, "L"), fmt)), 40, 60)
    assert (decoded[..., 0] == decoded[..., 1]).all() and (decoded[..., 1] == decoded[..., 2]).all()
    assert np.abs(decoded[..., 0] - gray).max() <= (0 if fmt == "PNG" else 8)


def test_16_bit_png_is_scaled_not_clipped():
    ramp = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (8, 1))
    expected = ramp / 257.0
    decoded = assert_ok(decode_image(cv2_bytes(ramp, ".png")), 8, 64)  # 16-bit grey
    assert np.abs(decoded[..., 0] - expected).max() <= 1.0
    colour = np.dstack([ramp, ramp[:, ::-1], np.full_like(ramp, 65535)])  # 16-bit BGR
    decoded = assert_ok(decode_image(cv2_bytes(colour, ".png")), 8, 64)
    assert np.abs(decoded - np.dstack([expected, expected[:, ::-1], np.full_like(expected, 255)])).max() <= 1.0


def test_cmyk_jpeg_is_converted_to_bgr():
    rgb = Image.fromarray(marked_bgr()[..., ::-1].copy())
    data = pil_bytes(rgb.convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    decoded = assert_ok(decode_image(data), 40, 60)
    assert np.abs(decoded[3:7, 3:7] - RED_BGR).max() < 40
    assert np.abs(decoded[20:, 20:] - BLUE_BGR).max() < 40


def test_exif_orientation_is_applied_and_reported_in_width_height():
    exif = Image.Exif()
    exif[0x0112] = 6  # stored image must be rotated 90 degrees clockwise to display
    data = pil_bytes(Image.fromarray(marked_bgr()[..., ::-1].copy()), "JPEG", quality=95, exif=exif)
    decoded = assert_ok(decode_image(data), 60, 40)  # stored 60 wide x 40 high, displayed 40 x 60
    assert np.abs(decoded[3:7, -7:-3] - RED_BGR).max() < 40  # top-left corner went to the top-right
    assert np.abs(decoded[3:7, 3:7] - BLUE_BGR).max() < 40


def test_rgba_png_is_composited_over_the_background():
    rgba = np.zeros((4, 3, 4), np.uint8)
    rgba[..., :3] = (10, 20, 30)  # B, G, R stored under the alpha
    rgba[:, 0, 3], rgba[:, 1, 3], rgba[:, 2, 3] = 255, 0, 128
    data = cv2_bytes(rgba, ".png")
    decoded = assert_ok(decode_image(data), 4, 3)
    np.testing.assert_array_equal(decoded[:, 0], np.tile([10, 20, 30], (4, 1)))  # opaque: stored colour
    np.testing.assert_array_equal(decoded[:, 1], np.full((4, 3), 255))  # transparent: white
    np.testing.assert_allclose(decoded[:, 2], np.tile([132.5, 137.5, 142.5], (4, 1)), atol=1)  # half
    black = assert_ok(decode_image(data, background=(0, 0, 0)), 4, 3)
    np.testing.assert_array_equal(black[:, 1], np.zeros((4, 3)))


def test_transparent_palette_grey_alpha_and_16_bit_colour_key_are_composited():
    palette = Image.fromarray(marked_bgr()[..., ::-1].copy()).convert("P")
    opaque = assert_ok(decode_image(pil_bytes(palette, "PNG")), 40, 60)
    assert np.abs(opaque[3:7, 3:7] - RED_BGR).max() < 10
    red_index = palette.getpixel((0, 0))
    keyed = assert_ok(decode_image(pil_bytes(palette, "PNG", transparency=red_index)), 40, 60)
    np.testing.assert_array_equal(keyed[:10, :10], np.full((10, 10, 3), 255))  # the red entry is transparent
    assert np.abs(keyed[20:, 20:] - BLUE_BGR).max() < 10

    grey_alpha = Image.new("LA", (5, 5), (100, 0))
    assert (assert_ok(decode_image(pil_bytes(grey_alpha, "PNG")), 5, 5) == 255).all()

    ramp = np.tile(np.array([0, 1000, 65535], np.uint16), (2, 1))
    keyed16 = assert_ok(decode_image(pil_bytes(Image.fromarray(ramp), "PNG", transparency=1000)), 2, 3)
    np.testing.assert_array_equal(keyed16[0, :, 0], [0, 255, 255])  # 0 -> black, key -> white, max -> 255


def test_exif_orientation_is_applied_on_the_pillow_path_too():
    exif = Image.Exif()
    exif[0x0112] = 6
    rgba = Image.fromarray(np.dstack([marked_bgr()[..., ::-1], np.full((40, 60), 255, np.uint8)]), "RGBA")
    decoded = assert_ok(decode_image(pil_bytes(rgba, "PNG", exif=exif)), 60, 40)
    np.testing.assert_array_equal(decoded[0, -1], RED_BGR)


@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.9, 0.999])
@pytest.mark.parametrize("progressive", [False, True])
def test_truncated_jpeg_is_a_decode_error(fraction, progressive):
    data = scene_jpeg(progressive)
    result = decode_image(data[: int(len(data) * fraction)])
    assert result.status == "decode_error" and result.image is None
    assert "truncated" in result.error and result.error.startswith("JPEG")
    assert (result.width, result.height) == (640, 480)  # the header was readable


def test_jpeg_without_its_end_marker_is_a_decode_error():
    data = scene_jpeg()
    assert data.endswith(b"\xff\xd9")
    assert decode_image(data[:-2]).status == "decode_error"
    assert_ok(decode_image(data + b"trailing bytes after the end marker"), 480, 640)


def test_truncated_png_and_webp_are_decode_errors():
    scene, _ = draw_scene(np.random.default_rng(4), 120, 160, persons=1)
    for ext in (".png", ".webp"):
        data = cv2_bytes(scene, ext)
        result = decode_image(data[: len(data) // 2])
        assert result.status == "decode_error", ext
        assert result.error


@pytest.mark.parametrize("data", [
    b"hello, this is a text file and not an image\n" * 5,
    b"<html><body>404 Not Found</body></html>",
    np.random.default_rng(0).bytes(4096),
    b"\xff\xd8\xff",  # a JPEG signature and nothing else
], ids=["text", "html", "random", "jpeg-signature-only"])
def test_non_images_are_decode_errors_naming_the_reason(data):
    result = decode_image(data)
    assert result.status == "decode_error" and result.image is None
    assert result.error
    if not data.startswith(b"\xff"):
        assert "not a recognised image format" in result.error and repr(data[:16]) in result.error


def test_empty_object():
    result = decode_image(b"")
    assert (result.status, result.image, result.width, result.height) == ("empty", None, 0, 0)


@pytest.mark.parametrize("width, height", [(40000, 40000), (12000, 12000), (8000, 7000)])
def test_oversized_headers_are_refused_before_decoding(width, height):
    data = png_header(width, height)
    started = time.perf_counter()
    result = decode_image(data)
    assert time.perf_counter() - started < 0.5  # decoding 1.6 G pixels would take seconds and 4.8 GB
    assert result.status == "too_large" and result.image is None
    assert str(width * height) in result.error
    if width * height < 178_956_970:  # below Pillow's own hard limit our check reports the header size
        assert (result.width, result.height) == (width, height)


def test_max_pixels_applies_to_real_images():
    data = cv2_bytes(marked_bgr(), ".png")
    assert decode_image(data, max_pixels=40 * 60).status == "ok"
    result = decode_image(data, max_pixels=40 * 60 - 1)
    assert result.status == "too_large" and (result.width, result.height) == (60, 40)
    assert "60x40" in result.error


def test_invalid_arguments_raise():
    with pytest.raises(TypeError, match="bytes-like"):
        decode_image("image.jpg")
    with pytest.raises(TypeError, match="bytes-like"):
        decode_image(np.zeros(10, np.uint8))
    with pytest.raises(ValueError, match="max_pixels"):
        decode_image(b"x", max_pixels=0)
    with pytest.raises(ValueError, match="background"):
        decode_image(b"x", background=(0, 0, 256))


def test_decoded_image_validates_its_fields():
    failure = DecodedImage.failure("read_error", "NoSuchKey: missing")
    assert (failure.status, failure.image, failure.width) == ("read_error", None, 0)
    with pytest.raises(ValueError, match="unknown status"):
        DecodedImage.failure("broken", "x")
    with pytest.raises(ValueError, match="image"):
        DecodedImage(None, "ok", "", 1, 1)
    with pytest.raises(ValueError, match="error message"):
        DecodedImage.failure("decode_error", "")


def test_status_table_lists_every_status():
    table = status_table()
    assert table.count("\n") == len(STATUSES) + 1
    for status in ("ok", "empty", "decode_error", "too_large", "read_error", "inference_error"):
        assert f"`{status}`" in table


def test_sample_objects_decode_to_their_expected_status():
    for sample in sample_images(3, seed=1, size=(96, 128)) + broken_objects(seed=1):
        result = decode_image(sample.data)
        assert result.status == sample.expected_status, (sample.name, result.error)
        if result.status == "ok":
            assert (result.height, result.width) == (96, 128)
