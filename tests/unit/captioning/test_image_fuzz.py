"""Seeded mutation fuzz of captioning.images.prepare_image: dirty bytes become one `Prepared`, never an exception.

Small valid images of every format Pillow writes here (plus EXIF-rotated, animated and odd-mode variants)
are mutated the ways real corruption and hostile files look: cut short, bit rot, overwritten or shifted
runs, duplicated chunks, zeroed headers, headers claiming huge sizes, PNG edits with their CRCs fixed (so
the decoder, not the checksum, sees them) and splices of two files. The run is bounded by count, not time:
IMAGE_FUZZ_INPUTS cases (raise it for a longer soak), case i mutating seed image i (round robin) with a
generator seeded from (IMAGE_FUZZ_SEED, i) alone, so any case can be replayed by itself on any machine: a
failure names the case and the command, IMAGE_FUZZ_CASE=<i>[,<j>...] runs just those cases and lets their
exceptions through. `pytest -s` shows the figures.
"""

from __future__ import annotations

import io
import os
import random
import struct
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import pytest
from PIL import Image, features

from pipeline.captioning.images import SIZE, Prepared, prepare_image

SEED = int(os.environ.get("IMAGE_FUZZ_SEED", "20240611"))
INPUTS = int(os.environ.get("IMAGE_FUZZ_INPUTS", "15000"))  # about 15 s on 2 cores
REPLAY = os.environ.get("IMAGE_FUZZ_CASE")  # case indices, comma-separated: just those, exceptions let through
# A small limit keeps every input cheap (a mutated header may claim anything up to it); the code path that
# enforces it is the one the default 64 M limit takes.
MAX_PIXELS = 2_000_000
HUGE_SIZES = ((100_000, 100_000), (9_000, 9_000), (65_535, 65_535), (3_000, 1_000), (1, 1_000_000), (0, 0),
              (2**31 - 1, 1), (2**32 - 1, 2**32 - 1))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------------- seeds


def _picture(width: int = 40, height: int = 30) -> Image.Image:
    """A gradient with noise, so every encoder has real data to compress."""
    y, x = np.mgrid[0:height, 0:width]
    noise = np.random.default_rng(SEED).integers(0, 40, (height, width, 3))
    array = np.dstack([x * 255 // width, y * 255 // height, (x + y) * 127 // (width + height)]) + noise
    return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), "RGB")


def _save(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _exif(orientation: int = 6) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_exif_after_idat(image: Image.Image) -> bytes:
    """A PNG whose eXIf chunk follows the pixel data: Pillow only sees it while decoding the image."""
    data = _save(image, "PNG")
    exif = _exif(6).tobytes()
    return data[:-12] + _png_chunk(b"eXIf", exif) + data[-12:]  # just before IEND


def _animation(fmt: str, **options: object) -> bytes:
    """Three frames; new ones each time, as saving leaves encoder settings on the frames appended."""
    first, *rest = (_picture().point(lambda value, k=k: (value + 80 * k) % 256) for k in range(3))
    return _save(first, fmt, save_all=True, append_images=rest, **options)


def _seeds() -> dict[str, bytes]:
    rgb = _picture()
    rgba = rgb.copy()
    rgba.putalpha(Image.linear_gradient("L").resize(rgb.size))
    palette = rgb.quantize(16)
    gray16 = Image.fromarray(np.asarray(rgb.convert("L"), np.uint16) * 257)  # I;16
    seeds = {
        "JPEG": _save(rgb, "JPEG", quality=80),
        "JPEG-progressive": _save(rgb, "JPEG", quality=80, progressive=True),
        "JPEG-exif6": _save(rgb, "JPEG", quality=80, exif=_exif(6)),
        "JPEG-gray": _save(rgb.convert("L"), "JPEG"),
        "JPEG-cmyk": _save(rgb.convert("CMYK"), "JPEG"),
        "MPO": _animation("MPO"),
        "PNG-rgb": _save(rgb, "PNG"),
        "PNG-rgba": _save(rgba, "PNG"),
        "PNG-palette": _save(palette, "PNG", transparency=0),
        "PNG-gray16": _save(gray16, "PNG"),
        "PNG-interlaced": _save(rgb, "PNG", interlace=1),
        "PNG-exif6": _save(rgb, "PNG", exif=_exif(6)),
        "PNG-exif-after-idat": _png_exif_after_idat(rgb),
        "APNG": _animation("PNG", duration=100),
        "GIF": _save(palette, "GIF"),
        "GIF-animated": _animation("GIF", duration=100, loop=0),
        "BMP": _save(rgb, "BMP"),
        "BMP-palette": _save(palette, "BMP"),
        "TIFF": _save(rgb, "TIFF"),
        "TIFF-lzw-exif6": _save(rgb, "TIFF", compression="tiff_lzw", exif=_exif(6)),
        "TIFF-deflate-rgba": _save(rgba, "TIFF", compression="tiff_adobe_deflate"),
        "TIFF-jpeg": _save(rgb, "TIFF", compression="jpeg"),
        "TIFF-multipage": _animation("TIFF"),
        "TIFF-gray16": _save(gray16, "TIFF"),
        "TIFF-float": _save(Image.fromarray(np.asarray(rgb.convert("L"), np.float32) / 7), "TIFF"),
        "PPM": _save(rgb, "PPM"),
        "PGM": _save(rgb.convert("L"), "PPM"),
        "PBM": _save(rgb.convert("1"), "PPM"),
        "TGA": _save(rgb, "TGA"),
        "TGA-rle": _save(rgba, "TGA", compression="tga_rle"),
        "ICO": _save(rgba, "ICO", sizes=[(32, 32), (16, 16)]),
    }
    if features.check("webp"):
        seeds["WEBP-lossy"] = _save(rgb, "WEBP", quality=70)
        seeds["WEBP-lossless-exif6"] = _save(rgba, "WEBP", lossless=True, exif=_exif(6))
        seeds["WEBP-animated"] = _animation("WEBP", duration=100)
    if features.check("jpg_2000"):
        seeds["JPEG2000"] = _save(rgb, "JPEG2000")
        seeds["JPEG2000-j2k"] = _save(rgb, "JPEG2000", no_jp2=True)
    if features.check("avif"):
        seeds["AVIF"] = _save(rgb, "AVIF", quality=60, exif=_exif(6))
    return seeds


SEEDS = _seeds()


# ---------------------------------------------------------------------------------------------------- mutators

Mutator = Callable[[random.Random, bytes], bytes]


def _interesting(rng: random.Random, length: int) -> bytes:
    """Random bytes, or a run of one boundary value (0, 0xFF, 0x7F, 0x80): what length fields hate most."""
    if rng.random() < 0.5:
        return rng.randbytes(length)
    return bytes([rng.choice((0x00, 0xFF, 0x7F, 0x80))]) * length


def truncate(rng: random.Random, data: bytes) -> bytes:
    return data[: rng.randrange(len(data))]


def flip(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    return bytes(out)


def overwrite(rng: random.Random, data: bytes) -> bytes:
    at, length = rng.randrange(len(data)), rng.randint(1, 16)
    return data[:at] + _interesting(rng, length) + data[at + length:]


def insert(rng: random.Random, data: bytes) -> bytes:
    at = rng.randrange(len(data))
    return data[:at] + _interesting(rng, rng.randint(1, 64)) + data[at:]


def delete(rng: random.Random, data: bytes) -> bytes:
    at = rng.randrange(len(data))
    return data[:at] + data[at + rng.randint(1, 64):]


def duplicate(rng: random.Random, data: bytes) -> bytes:
    """A slice copied elsewhere: for PNG a whole chunk (two IHDRs, IDAT twice), else any run."""
    chunks = _png_chunks(data)
    if chunks and rng.random() < 0.7:
        start, end = rng.choice(chunks)
        where = rng.choice(chunks)[rng.randrange(2)]
    else:
        start = rng.randrange(len(data))
        end, where = start + rng.randint(1, 256), rng.randrange(len(data))
    return data[:where] + data[start:end] + data[where:]


def zero_header(rng: random.Random, data: bytes) -> bytes:
    at = rng.randrange(min(64, len(data)))
    return data[:at] + bytes(rng.randint(1, 8)) + data[at + 8:]


def huge_size(rng: random.Random, data: bytes) -> bytes:
    """The header claims another size (mostly a huge one), the rest of the file unchanged."""
    width, height = rng.choice(HUGE_SIZES)
    if (at := data.find(b"IHDR")) >= 4:  # PNG, APNG, a PNG inside an ICO: with a valid CRC
        ihdr = struct.pack(">II", width, height) + data[at + 12: at + 21]
        return data[:at + 4] + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) + data[at + 21 + 4:]
    small = (min(width, 0xFFFF), min(height, 0xFFFF))
    if data[:3] == b"GIF":
        out = data[:6] + struct.pack("<HH", *small) + data[10:]
        descriptor = out.find(b",", 13)
        return out if descriptor < 0 else out[:descriptor + 5] + struct.pack("<HH", *small) + out[descriptor + 9:]
    if data[:2] == b"BM":
        signed = (min(width, 2**31 - 1), min(height, 2**31 - 1))
        return data[:18] + struct.pack("<ii", *signed) + data[26:]
    if data[:2] == b"\xff\xd8" and (at := max(data.find(b"\xff\xc0"), data.find(b"\xff\xc2"))) > 0:
        return data[:at + 5] + struct.pack(">HH", small[1], small[0]) + data[at + 9:]
    if data[:1] == b"P" and data[1:2] in b"123456":
        body = data.split(b"\n", 3 if data[1:2] not in b"14" else 2)[-1]
        return data[:2] + f"\n{width} {height}\n".encode() + (b"255\n" if data[1:2] not in b"14" else b"") + body
    if data[:4] == b"RIFF" and data[12:16] == b"VP8X":
        canvas = ((width - 1) % 2**24).to_bytes(3, "little") + ((height - 1) % 2**24).to_bytes(3, "little")
        return data[:24] + canvas + data[30:]
    if data[:4] in (b"II*\x00", b"MM\x00*"):  # TIFF: rewrite the ImageWidth and ImageLength entries
        return _tiff_size(data, width, height)
    if data[2:3] in (b"\x02", b"\x0a") and len(data) > 18:  # TGA (no magic): width and height at 12
        return data[:12] + struct.pack("<HH", *small) + data[16:]
    at = rng.randrange(len(data))
    return data[:at] + struct.pack("<I", min(width, 2**32 - 1)) + data[at + 4:]


def _tiff_size(data: bytes, width: int, height: int) -> bytes:
    order = "<" if data[:2] == b"II" else ">"
    out = bytearray(data)
    ifd = struct.unpack_from(order + "I", data, 4)[0] if len(data) >= 8 else len(data)
    if ifd + 2 > len(data):
        return data
    for index in range(struct.unpack_from(order + "H", data, ifd)[0]):
        entry = ifd + 2 + 12 * index
        if entry + 12 > len(data):
            break
        tag = struct.unpack_from(order + "H", data, entry)[0]
        if tag in (256, 257):  # ImageWidth, ImageLength: stored as LONG
            value = min(width if tag == 256 else height, 2**32 - 1)
            struct.pack_into(order + "HII", out, entry + 2, 4, 1, value)
    return bytes(out)


def splice(rng: random.Random, data: bytes) -> bytes:
    """The start of this file and the end of another (a concatenated or mis-sliced download)."""
    other = SEEDS[rng.choice(sorted(SEEDS))]
    return data[: rng.randrange(len(data))] + other[rng.randrange(len(other)):]


def _png_chunks(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each well-formed chunk of a PNG, empty for anything else."""
    chunks: list[tuple[int, int]] = []
    at = len(PNG_MAGIC) if data.startswith(PNG_MAGIC) else len(data)
    while at + 12 <= len(data):
        end = at + 12 + struct.unpack_from(">I", data, at)[0]
        if end > len(data):
            break
        chunks.append((at, end))
        at = end
    return chunks


def fix_png_crcs(data: bytes) -> bytes:
    """Recompute every chunk CRC, so a PNG edit reaches the decoder instead of failing the checksum."""
    out = bytearray(data)
    for start, end in _png_chunks(data):
        struct.pack_into(">I", out, end - 4, zlib.crc32(data[start + 4: end - 4]))
    return bytes(out)


MUTATORS: dict[str, Mutator] = {mutator.__name__: mutator for mutator in (
    truncate, flip, overwrite, insert, delete, duplicate, zero_header, huge_size, splice)}


def mutate(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    """One or two mutations; PNGs often get their CRCs fixed afterwards (the strategy name says so)."""
    name = rng.choice(sorted(MUTATORS))
    out = MUTATORS[name](rng, data) or data[:1]
    if rng.random() < 0.2:
        second = rng.choice(sorted(MUTATORS))
        out, name = MUTATORS[second](rng, out) or out[:1], f"{name}+{second}"
    if out.startswith(PNG_MAGIC) and rng.random() < 0.6:
        out, name = fix_png_crcs(out), f"{name}+crc"
    return name, out


# ---------------------------------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class Case:
    """One fuzz input; `fuzz_case(index)` makes it again, anywhere."""

    index: int
    seed_image: str
    strategy: str
    data: bytes

    def __str__(self) -> str:
        return f"case {self.index} (seed {SEED}): {self.seed_image} / {self.strategy}, {len(self.data)} bytes"

    def replay(self) -> str:
        return (f"IMAGE_FUZZ_SEED={SEED} IMAGE_FUZZ_CASE={self.index} python -m pytest -s "
                f"tests/unit/captioning/test_image_fuzz.py::test_mutated_images_never_raise")


def fuzz_case(index: int) -> Case:
    """Case `index`: the seed image by round robin (every format gets its share), mutated by a generator seeded
    from (SEED, index) alone, so it does not depend on the cases before it or on how fast the machine is."""
    names = sorted(SEEDS)
    seed_image = names[index % len(names)]
    strategy, data = mutate(random.Random(f"{SEED}:{index}"), SEEDS[seed_image])
    return Case(index, seed_image, strategy, data)


@dataclass
class FuzzSummary:
    """What a run did; each failure keeps its case, whose `replay()` says how to run it alone."""

    tried: Counter[str] = field(default_factory=Counter)  # by seed image
    mutations: Counter[str] = field(default_factory=Counter)  # by mutation kind (a case may have two)
    ok: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    escaped: list[tuple[Case, str]] = field(default_factory=list)  # case, exception
    bad_results: list[tuple[Case, str]] = field(default_factory=list)  # case, what is wrong with its result
    reasons: Counter[str] = field(default_factory=Counter)  # error reasons up to the first colon
    seconds: float = 0.0

    def report(self) -> str:
        lines = [f"image fuzz: {self.tried.total()} cases in {self.seconds:.1f} s (seed {SEED}): "
                 f"{self.ok.total()} ok, {self.errors.total()} errors, {len(self.escaped)} exceptions escaped, "
                 f"{len(self.bad_results)} malformed results",
                 f"  {'seed image':22} {'tried':>6} {'ok':>6} {'errors':>6} {'escaped':>7}"]
        escaped = Counter(case.seed_image for case, _ in self.escaped)
        lines += [f"  {name:22} {count:6} {self.ok[name]:6} {self.errors[name]:6} {escaped[name]:7}"
                  for name, count in sorted(self.tried.items())]
        lines.append("  mutations: " + ", ".join(f"{name} {count}" for name, count in sorted(self.mutations.items())))
        lines += [f"  reason {reason!r}: {count}" for reason, count in self.reasons.most_common()]
        classes = Counter(exception.split(":", 1)[0] for _, exception in self.escaped)
        lines += [f"  escaped {name}: {count}" for name, count in classes.most_common()]
        failures = [(case, f"raised {exception}") for case, exception in self.escaped]
        failures += [(case, f"malformed result: {problem}") for case, problem in self.bad_results]
        for case, problem in failures[:10]:
            lines += [f"  {case}: {problem}", f"    replay: {case.replay()}"]
        if len(failures) > 10:
            lines.append(f"  ... and {len(failures) - 10} more failing cases, IMAGE_FUZZ_CASE="
                         + ",".join(str(case.index) for case, _ in failures[10:60]))
        return "\n".join(lines)


def _check(prepared: object) -> str | None:
    """What is wrong with one result, or None: exactly one of 384 x 384 RGB pixels or a reason."""
    if not isinstance(prepared, Prepared):
        return f"not a Prepared: {type(prepared).__name__}"
    if prepared.error is None:
        return None if isinstance(prepared.pixels, bytes) and len(prepared.pixels) == SIZE * SIZE * 3 \
            else f"ok row with {len(prepared.pixels or b'')} pixel bytes"
    if not isinstance(prepared.error, str) or not prepared.error.strip():
        return f"error row with reason {prepared.error!r}"
    return None if prepared.pixels is None else "error row with pixels"


def run_fuzz(summary: FuzzSummary, cases: Iterable[int] = range(INPUTS)) -> FuzzSummary:
    start = time.monotonic()  # for the figures only: what runs is fixed by the count
    for index in cases:
        case = fuzz_case(index)
        summary.tried[case.seed_image] += 1
        summary.mutations.update(name for name in case.strategy.split("+") if name in MUTATORS)
        try:
            prepared = prepare_image(case.data, "fuzz", MAX_PIXELS)
        except Exception as err:  # the bug under test: record it and go on, to see the whole picture
            summary.escaped.append((case, f"{type(err).__name__}: {err}"[:200]))
            continue
        if problem := _check(prepared):
            summary.bad_results.append((case, problem))
        elif prepared.error is None:
            summary.ok[case.seed_image] += 1
        else:
            summary.errors[case.seed_image] += 1
            summary.reasons[prepared.error.split(":", 1)[0].split(" (", 1)[0]] += 1
    summary.seconds = time.monotonic() - start
    return summary


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_every_seed_decodes(name: str) -> None:
    # The fuzz starts from files that work: a seed that fails already would test nothing.
    prepared = prepare_image(SEEDS[name], "seed", MAX_PIXELS)
    assert prepared.error is None, prepared.error
    assert len(prepared.pixels or b"") == SIZE * SIZE * 3


def test_a_case_is_the_same_input_whatever_ran_before_it() -> None:
    # What makes a failure replayable on its own: no state is shared between cases.
    first = fuzz_case(1234)
    run_fuzz(FuzzSummary(), range(50))
    assert fuzz_case(1234) == first
    assert fuzz_case(7).data != fuzz_case(7 + len(SEEDS)).data  # same seed image, another mutation


def test_mutated_images_never_raise() -> None:
    if REPLAY:  # just these cases, their exceptions and tracebacks let through
        for index in (int(word) for word in REPLAY.split(",")):
            case = fuzz_case(index)
            print(f"\nimage fuzz {case}")
            problem = _check(prepare_image(case.data, "fuzz", MAX_PIXELS))
            assert problem is None, f"{case}: malformed result: {problem}"
        return
    summary = run_fuzz(FuzzSummary())
    print("\n" + summary.report())
    if summary.escaped or summary.bad_results:
        pytest.fail(summary.report())
    # Coverage: every seed image and every kind of mutation was tried, and the mix is real (some
    # mutations survive, most do not).
    assert set(summary.tried) == set(SEEDS), f"seed images never tried: {set(SEEDS) - set(summary.tried)}"
    assert set(summary.mutations) == set(MUTATORS), f"mutations never tried: {set(MUTATORS) - set(summary.mutations)}"
    assert summary.ok and summary.errors
