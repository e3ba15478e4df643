"""Fuzzing `pipelines.images.decode_image` with mutated JPEG, PNG, GIF, WebP, TIFF and BMP bytes.

Every example starts from a small valid image encoded here with OpenCV or Pillow (several variants per
format: progressive, palette, alpha, 16-bit, multi-frame...) and applies 1-4 mutations: byte flips,
insertions, deletions, splices with another seed, truncations anywhere, overwrites, and header patches that
declare absurd or zero sizes (PNG IHDR, JPEG SOF, GIF screen and frame, BMP info header, TIFF IFD tags,
WebP VP8/VP8L/VP8X). The properties, for every input:

* `decode_image` returns a `DecodedImage` (never raises), with a status it may return and a consistent
  image (``ok``: uint8 (H, W, 3), 1 <= H * W <= max_pixels, width/height equal to the array's);
* it takes under `TIME_LIMIT_S` of CPU time (process time, so a busy shared machine does not make it flaky;
  the wall clock gets a looser limit);
* memory: `test_fuzz_memory_is_bounded_by_max_pixels` runs a deterministic corpus of the same mutations in
  a fresh interpreter whose address space is capped (RLIMIT_AS) at its size after warm-up plus a budget
  proportional to max_pixels; it checks the peak resident set growth (ru_maxrss) against that budget and
  that no allocation failed along the way (no MemoryError in a reason, no "Insufficient memory" or
  bad_alloc from OpenCV on stderr), so a decoder that tried to allocate what an absurd header declares is
  caught even when it would not touch the pages.

Size: `SIMPLEPOSE_FUZZ_EXAMPLES` examples per format (default 400, with the rest of this file about 15 s here) and
`SIMPLEPOSE_FUZZ_MEMORY_CASES` mutated objects in the memory check (default 2000). For a long run:

    SIMPLEPOSE_FUZZ_EXAMPLES=3000 SIMPLEPOSE_FUZZ_MEMORY_CASES=20000 .venv/bin/pytest tests/test_fuzz_images.py
"""
from __future__ import annotations

import io
import json
import os
import random
import re
import resource
import struct
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

try:  # the memory check's subprocess runs this file as a script, where pytest's plugins are not loaded
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is in the test extra
    given = None

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipelines.images import DecodedImage, decode_image  # noqa: E402

FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP")
MAX_PIXELS = 1 << 20
"""The fuzz tests' max_pixels: small, so that the memory budget it implies is a sharp bound."""
TIME_LIMIT_S = 1.0
EXAMPLES = int(os.environ.get("SIMPLEPOSE_FUZZ_EXAMPLES", "400"))
MEMORY_CASES = int(os.environ.get("SIMPLEPOSE_FUZZ_MEMORY_CASES", "2000"))
ABSURD_SIZES = (0, 1, 2, 255, 256, 1023, 1024, 4097, 32767, 32768, 65535, 65536, 100_000, 1 << 24,
                (1 << 31) - 1, 1 << 31, (1 << 32) - 1)
WORDS = (0, 0xFFFFFFFF, 0x7FFFFFFF, 0x80000000, 0x8C000000, 0x00FFFFFF, 0x10000, 0xFFFF)
DECODE_STATUSES = {"ok", "decode_error", "too_large"}  # empty only for b"", which no mutation yields here


# ---------------------------------------------------------------------------------------------------------
# Seeds: small valid images in each format.

def _scene(height: int = 24, width: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    image[: height // 2, : width // 2] = (0, 0, 255)
    return image


def _cv2(image: np.ndarray, ext: str, params: tuple = ()) -> bytes:
    ok, encoded = cv2.imencode(ext, image, list(params))
    assert ok, ext
    return encoded.tobytes()


def _pil(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def make_seeds() -> dict[str, list[bytes]]:
    bgr = _scene()
    rgb = Image.fromarray(bgr[..., ::-1].copy())
    rgba = Image.fromarray(np.dstack([bgr[..., ::-1], np.tile(np.arange(0, 256, 8, dtype=np.uint8), (24, 1))]),
                           "RGBA")
    palette = rgb.convert("P")
    grey16 = np.tile(np.linspace(0, 65535, 32).astype(np.uint16), (24, 1))
    exif = Image.Exif()
    exif[0x0112] = 6
    frames = [palette, rgb.rotate(90, expand=False).convert("P")]
    return {
        "JPEG": [_cv2(bgr, ".jpg"), _pil(rgb, "JPEG", progressive=True), _pil(rgb, "JPEG", exif=exif),
                 _pil(rgb.convert("L"), "JPEG"), _pil(rgb.convert("CMYK"), "JPEG")],
        "PNG": [_cv2(bgr, ".png"), _pil(rgba, "PNG"), _pil(palette, "PNG", transparency=0), _cv2(grey16, ".png"),
                _pil(rgb.convert("L"), "PNG", optimize=True), _pil(rgb, "PNG", exif=exif)],
        "GIF": [_pil(palette, "GIF"), _pil(palette, "GIF", transparency=0),
                _pil(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)],
        "WEBP": [_cv2(bgr, ".webp"), _cv2(bgr, ".webp", (cv2.IMWRITE_WEBP_QUALITY, 101)), _pil(rgba, "WEBP"),
                 _pil(rgb, "WEBP", save_all=True, append_images=[rgb.rotate(90)], duration=50)],
        "TIFF": [_cv2(bgr, ".tiff"), _pil(rgb, "TIFF"), _pil(rgba, "TIFF", compression="tiff_deflate"),
                 _pil(Image.fromarray(grey16), "TIFF"), _pil(rgb, "TIFF", save_all=True, append_images=[rgb]),
                 _pil(rgb, "TIFF", compression="jpeg")],
        "BMP": [_cv2(bgr, ".bmp"), _pil(palette, "BMP"), _pil(rgb.convert("L"), "BMP"), _pil(rgba, "BMP")],
    }


SEEDS = make_seeds()


# ---------------------------------------------------------------------------------------------------------
# Header patches: declare a given (width, height) in the format's own size fields.

def _png_size(data: bytes, width: int, height: int, fix_crc: bool) -> bytes:
    out = bytearray(data)
    if len(out) < 33 or out[12:16] != b"IHDR":
        return bytes(out)
    out[16:24] = struct.pack(">II", width & 0xFFFFFFFF, height & 0xFFFFFFFF)
    if fix_crc:
        out[29:33] = struct.pack(">I", zlib.crc32(bytes(out[12:29])))
    return bytes(out)


def _jpeg_size(data: bytes, width: int, height: int) -> bytes:
    out = bytearray(data)
    for match in re.finditer(rb"\xff[\xc0-\xc3\xc5-\xc7\xc9-\xcb\xcd-\xcf]", data):
        at = match.start()
        if at + 9 <= len(out):
            out[at + 5: at + 9] = struct.pack(">HH", height & 0xFFFF, width & 0xFFFF)
    return bytes(out)


def _gif_size(data: bytes, width: int, height: int) -> bytes:
    out = bytearray(data)
    if len(out) >= 10:
        out[6:10] = struct.pack("<HH", width & 0xFFFF, height & 0xFFFF)
    at = out.find(b"\x2c\x00\x00\x00\x00")  # the first image descriptor at (0, 0)
    if at > 0 and at + 9 <= len(out):
        out[at + 5: at + 9] = struct.pack("<HH", width & 0xFFFF, height & 0xFFFF)
    return bytes(out)


def _bmp_size(data: bytes, width: int, height: int) -> bytes:
    out = bytearray(data)
    if len(out) >= 26:
        signed_height = height if height < (1 << 31) else height - (1 << 32)  # negative: top-down rows
        out[18:26] = struct.pack("<iI", (width & 0x7FFFFFFF), signed_height & 0xFFFFFFFF)
    return bytes(out)


def _tiff_size(data: bytes, width: int, height: int) -> bytes:
    out = bytearray(data)
    if len(out) < 8 or out[:2] not in (b"II", b"MM"):
        return bytes(out)
    e = "<" if out[:2] == b"II" else ">"
    (offset,) = struct.unpack(e + "I", out[4:8])
    if offset + 2 > len(out):
        return bytes(out)
    (count,) = struct.unpack(e + "H", out[offset: offset + 2])
    for i in range(min(count, 64)):
        at = offset + 2 + 12 * i
        if at + 12 > len(out):
            break
        tag, kind = struct.unpack(e + "HH", out[at: at + 4])
        if tag in (256, 257):
            value = width if tag == 256 else height
            if kind == 3:  # SHORT
                out[at + 8: at + 12] = struct.pack(e + "HH", value & 0xFFFF, 0)
            else:
                out[at + 2: at + 4] = struct.pack(e + "H", 4)  # make it LONG
                out[at + 8: at + 12] = struct.pack(e + "I", value & 0xFFFFFFFF)
    return bytes(out)


def _webp_size(data: bytes, width: int, height: int) -> bytes:
    out = bytearray(data)
    if len(out) < 30 or out[:4] != b"RIFF":
        return bytes(out)
    kind = bytes(out[12:16])
    w, h = max(width, 1) - 1, max(height, 1) - 1
    if kind == b"VP8X":  # 24-bit canvas width-1, height-1
        out[24:30] = (w & 0xFFFFFF).to_bytes(3, "little") + (h & 0xFFFFFF).to_bytes(3, "little")
    elif kind == b"VP8L":  # 14-bit width-1, height-1 after the 0x2f signature
        bits = int.from_bytes(out[21:25], "little")
        bits = (bits & ~0x0FFFFFFF) | (w & 0x3FFF) | ((h & 0x3FFF) << 14)
        out[21:25] = bits.to_bytes(4, "little")
    elif kind == b"VP8 ":  # 14-bit width and height (2 scale bits) after the 9d 01 2a start code
        out[26:30] = struct.pack("<HH", width & 0x3FFF, height & 0x3FFF)
    return bytes(out)


def declare_size(data: bytes, width: int, height: int, fix_crc: bool = True) -> bytes:
    """Patch every size field this file's format has (found by its signature) to `width` x `height`."""
    if data.startswith(b"\x89PNG"):
        return _png_size(data, width, height, fix_crc)
    if data.startswith(b"\xff\xd8"):
        return _jpeg_size(data, width, height)
    if data.startswith(b"GIF"):
        return _gif_size(data, width, height)
    if data.startswith(b"BM"):
        return _bmp_size(data, width, height)
    if data.startswith((b"II", b"MM")):
        return _tiff_size(data, width, height)
    if data.startswith(b"RIFF"):
        return _webp_size(data, width, height)
    return data


# ---------------------------------------------------------------------------------------------------------
# Mutations: each is (name, *parameters) with positions as fractions of the current length, so one
# description applies to any seed and truncations and edits land in every region (header, data, trailer).

def _at(data: bytes, fraction: float) -> int:
    return min(int(fraction * len(data)), len(data))


def apply(data: bytes, mutations: list[tuple], fmt: str) -> bytes:
    for name, *p in mutations:
        if name == "flip":
            if data:
                i = min(_at(data, p[0]), len(data) - 1)
                data = data[:i] + bytes([data[i] ^ (p[1] or 1)]) + data[i + 1:]
        elif name == "insert":
            i = _at(data, p[0])
            data = data[:i] + p[1] + data[i:]
        elif name == "delete":
            i = _at(data, p[0])
            data = data[:i] + data[i + p[1]:]
        elif name == "overwrite":
            i = _at(data, p[0])
            data = data[:i] + p[1] + data[i + len(p[1]):]
        elif name == "truncate":
            data = data[:_at(data, p[0])]
        elif name == "splice":  # the head of this object, the tail of another seed of any format
            other = SEEDS[FORMATS[p[1] % len(FORMATS)]]
            other = other[p[2] % len(other)]
            data = data[:_at(data, p[0])] + other[_at(other, p[3]):]
        elif name == "size":
            data = declare_size(data, p[0], p[1], p[2])
        elif name == "word":  # an absurd 16- or 32-bit integer, either byte order: lengths, offsets, counts
            value = WORDS[p[1] % len(WORDS)]
            word = value.to_bytes(4, p[2]) if p[3] else (value & 0xFFFF).to_bytes(2, p[2])
            i = _at(data, p[0])
            data = data[:i] + word + data[i + len(word):]
    return data or b"\x00"  # b"" is the `empty` status, tested elsewhere


def random_mutations(rng: random.Random) -> list[tuple]:
    """The same mutation vocabulary as the hypothesis strategy, drawn from `rng` (for the memory check)."""
    def size():
        return rng.choice(ABSURD_SIZES) if rng.random() < 0.8 else rng.randrange(1 << 32)

    out = []
    for _ in range(rng.randint(1, 4)):
        kind = rng.choice(("flip", "insert", "delete", "overwrite", "truncate", "splice", "size", "size", "word"))
        if kind == "flip":
            out.append((kind, rng.random(), rng.randrange(256)))
        elif kind in ("insert", "overwrite"):
            out.append((kind, rng.random(), rng.randbytes(rng.randint(1, 16))))
        elif kind == "delete":
            out.append((kind, rng.random(), rng.randint(1, 64)))
        elif kind == "truncate":
            out.append((kind, rng.random()))
        elif kind == "splice":
            out.append((kind, rng.random(), rng.randrange(6), rng.randrange(8), rng.random()))
        elif kind == "word":
            out.append((kind, rng.random(), rng.randrange(len(WORDS)), rng.choice(("big", "little")),
                        rng.random() < 0.7))
        else:
            out.append((kind, size(), size(), rng.random() < 0.8))
    return out


def check(result: object, max_pixels: int = MAX_PIXELS) -> None:
    """The properties every decode_image result must have."""
    assert isinstance(result, DecodedImage)
    assert result.status in DECODE_STATUSES, result
    assert isinstance(result.error, str) and "\n" not in result.error
    if result.status == "ok":
        image = result.image
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3 and image.flags.c_contiguous
        assert (result.height, result.width) == image.shape[:2]
        assert 1 <= result.width * result.height <= max_pixels
    else:
        assert result.image is None and result.error
        assert result.width >= 0 and result.height >= 0
    if result.status == "too_large":
        assert f"max_pixels {max_pixels}" in result.error, result.error


def timed_decode(data: bytes, max_pixels: int = MAX_PIXELS) -> DecodedImage:
    wall, cpu = time.perf_counter(), time.process_time()
    with warnings.catch_warnings():  # a warning from a decoder must not escape either (`-W error` raises it)
        warnings.simplefilter("error")
        result = decode_image(data, max_pixels)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    assert cpu < TIME_LIMIT_S, f"{cpu:.2f} s of CPU for {len(data)} bytes ({result.status}: {result.error})"
    assert wall < 5 * TIME_LIMIT_S, f"{wall:.2f} s for {len(data)} bytes ({result.status}: {result.error})"
    check(result, max_pixels)
    return result


# ---------------------------------------------------------------------------------------------------------
# Deterministic cases: absurd and zero sizes in every seed, and truncation at every region.

@pytest.mark.parametrize("fmt", FORMATS)
def test_absurd_and_zero_declared_sizes(fmt):
    for seed in SEEDS[fmt]:
        for width, height in [(0, 24), (32, 0), (0, 0), (100_000, 100_000), (65535, 65535), (1 << 24, 1),
                              (1, 1 << 24), ((1 << 31) - 1, (1 << 31) - 1), ((1 << 32) - 1, 2), (1025, 1025),
                              (1024, 1024), (1, 1)]:
            for fix_crc in (True, False):
                data = declare_size(seed, width, height, fix_crc)
                result = timed_decode(data)
                if result.status == "too_large" and result.width and result.height:
                    assert result.width * result.height > MAX_PIXELS
                if result.status == "ok":
                    assert result.width * result.height <= MAX_PIXELS


def test_declared_sizes_are_reported_for_too_large_images():
    """width/height come from the header even above Pillow's own limit; the reason quotes max_pixels."""
    cases = {"PNG": SEEDS["PNG"][0], "JPEG": SEEDS["JPEG"][0], "GIF": SEEDS["GIF"][0], "BMP": SEEDS["BMP"][0],
             "TIFF": SEEDS["TIFF"][1]}
    for fmt, seed in cases.items():
        for width, height in [(2000, 1000), (65535, 65535), (20000, 30000)]:
            if fmt in ("BMP", "TIFF", "PNG") or max(width, height) <= 65535:
                result = timed_decode(declare_size(seed, width, height))
                assert result.status == "too_large", (fmt, width, height, result)
                assert (result.width, result.height) == (width, height), (fmt, result)
                assert f"{width}x{height}" in result.error and "--max-pixels" in result.error, result.error
    png = declare_size(SEEDS["PNG"][0], 100_000, 100_000)
    result = timed_decode(png, max_pixels=50_000_000)
    assert (result.status, result.width, result.height) == ("too_large", 100_000, 100_000)
    assert "max_pixels 50000000" in result.error and "Pillow" not in result.error


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncation_at_every_region(fmt):
    for seed in SEEDS[fmt]:
        step = max(1, len(seed) // 97)
        for end in range(1, len(seed), step):
            result = timed_decode(seed[:end])
            assert result.status in ("decode_error", "ok")
        assert timed_decode(seed).status == "ok"


def test_opencv_png_chunk_length_regression():
    """A corrupt chunk length made OpenCV 5 allocate and fill 2.3 GB (1 s) for a 435-byte PNG."""
    result = timed_decode(apply(SEEDS["PNG"][3], [("overwrite", 0.078125, b"\x8c")], "PNG"))
    assert result.status in ("ok", "decode_error")


@pytest.mark.parametrize("fmt", FORMATS)
def test_absurd_integers_at_every_offset(fmt):
    """0xFFFFFFFF, 0x7FFFFFFF... in either byte order at every offset of the first 256 bytes (lengths,
    offsets, counts, sizes of every header), then at every 7th offset of the rest."""
    for seed in SEEDS[fmt][:3]:
        offsets = list(range(min(256, len(seed)))) + list(range(256, len(seed), 7 * max(1, len(seed) // 2000)))
        for offset in offsets:
            for value in (1, 2, 4):
                for order in ("big", "little"):
                    timed_decode(apply(seed, [("word", offset / len(seed), value, order, True)], fmt))


# ---------------------------------------------------------------------------------------------------------
# Hypothesis: random mutation sequences.

if given is not None:
    fractions = st.floats(0.0, 1.0, allow_nan=False)
    sizes = st.one_of(st.sampled_from(ABSURD_SIZES), st.integers(0, (1 << 32) - 1))
    mutation = st.one_of(
        st.tuples(st.just("flip"), fractions, st.integers(1, 255)),
        st.tuples(st.just("insert"), fractions, st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("delete"), fractions, st.integers(1, 64)),
        st.tuples(st.just("overwrite"), fractions, st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("truncate"), fractions),
        st.tuples(st.just("splice"), fractions, st.integers(0, 5), st.integers(0, 7), fractions),
        st.tuples(st.just("size"), sizes, sizes, st.booleans()),
        st.tuples(st.just("word"), fractions, st.integers(0, len(WORDS) - 1), st.sampled_from(["big", "little"]),
                  st.booleans()),
    )

    @pytest.mark.parametrize("fmt", FORMATS)
    def test_fuzzed_objects_never_raise_and_stay_within_limits(fmt):
        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=False,
                  suppress_health_check=list(HealthCheck))
        @given(seed=st.integers(0, len(SEEDS[fmt]) - 1), mutations=st.lists(mutation, min_size=1, max_size=4))
        def run(seed, mutations):
            timed_decode(apply(SEEDS[fmt][seed], mutations, fmt))

        run()


# ---------------------------------------------------------------------------------------------------------
# Memory: a deterministic corpus in a fresh, address-space-capped interpreter.

MEMORY_BYTES_PER_PIXEL = 64
"""Budget per max_pixels pixel: the Pillow path holds the RGBA core, its array and the float-free uint32
compositing temporaries (about 40 bytes a pixel at the peak)."""
MEMORY_SLACK = 96 << 20


def memory_corpus(cases: int, seed: int = 0):
    rng = random.Random(seed)
    for fmt in FORMATS:  # every seed with every absurd size first
        for data in SEEDS[fmt]:
            for width, height in [(100_000, 100_000), (65535, 65535), (0, 10), ((1 << 31) - 1, 3), (1025, 1024)]:
                yield fmt, declare_size(data, width, height)
            for offset in range(0, min(len(data), 512), 3):  # huge lengths/offsets in every header field
                yield fmt, apply(data, [("word", offset / len(data), 1, "big", True)], fmt)
                yield fmt, apply(data, [("word", offset / len(data), 4, "little", True)], fmt)
    for i in range(cases):
        fmt = FORMATS[i % len(FORMATS)]
        seeds = SEEDS[fmt]
        yield fmt, apply(seeds[rng.randrange(len(seeds))], random_mutations(rng), fmt)


def _memory_main(cases: int) -> None:
    for fmt in FORMATS:  # warm-up: every decoder path once at the largest allowed size
        for data in SEEDS[fmt]:
            decode_image(data, MAX_PIXELS)
    side = int(MAX_PIXELS ** 0.5)
    full = np.random.default_rng(0).integers(0, 256, (side, side, 4), np.uint8)
    decode_image(_pil(Image.fromarray(full, "RGBA"), "PNG", compress_level=1), MAX_PIXELS)
    del full
    budget = MEMORY_BYTES_PER_PIXEL * MAX_PIXELS + MEMORY_SLACK
    vm_size = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm_size + budget, vm_size + budget))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    counts: dict[str, int] = {}
    memory_errors, slowest, started = [], 0.0, time.perf_counter()
    for fmt, data in memory_corpus(cases):
        t = time.process_time()
        result = decode_image(data, MAX_PIXELS)
        slowest = max(slowest, time.process_time() - t)
        check(result)
        counts[result.status] = counts.get(result.status, 0) + 1
        if "memory" in result.error.lower() or "alloc" in result.error.lower():
            memory_errors.append(f"{fmt}: {result.error}")
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"objects": sum(counts.values()), "statuses": counts, "rss_growth": after - before,
                      "budget": budget, "memory_errors": memory_errors[:5], "slowest_cpu_s": slowest,
                      "seconds": time.perf_counter() - started}))


def test_fuzz_memory_is_bounded_by_max_pixels():
    done = subprocess.run([sys.executable, __file__, "--memory", str(MEMORY_CASES)], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    print(report)
    assert report["objects"] >= MEMORY_CASES
    assert not report["memory_errors"], report
    # OpenCV reports a failed allocation as "Insufficient memory" or, for std::bad_alloc, "unknown exception"
    for marker in ("Insufficient memory", "Failed to allocate", "bad_alloc", "MemoryError", "unknown exception"):
        assert marker not in done.stderr, done.stderr[-3000:]
    assert report["rss_growth"] <= report["budget"], report
    assert report["slowest_cpu_s"] < TIME_LIMIT_S, report


if __name__ == "__main__" and sys.argv[1:2] == ["--memory"]:
    _memory_main(int(sys.argv[2]))
