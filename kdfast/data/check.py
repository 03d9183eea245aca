"""A cheap structural check of every image file, run when a folder is indexed, cached per file.

Why: DALI's native JPEG parser can crash the whole process (a segmentation fault, which
Python cannot catch) or fail with a message that names no file (``nvImageCodec failure:
'#3'``) on a truncated or non-image file. So every file a loader will read is checked
*before* any decoder sees it, and a bad one is reported by name while the folder is
indexed. The check reads the file's first bytes (a few KiB, more only to skip large
metadata segments) and its last 4 KiB — not the whole file — and its verdict is cached
keyed by path, size and modification time, so that only new or changed files are checked
again (see :func:`check_files`).

What passes (both loaders decode it):

* **JPEG**: starts with SOI ``FF D8 FF``; the marker segments up to the first scan (SOS)
  are well formed and lie inside the file, with a frame header (SOFn: 1–4 components, a
  non-zero width and height) before the scan; an end-of-image marker ``FF D9`` follows
  the scan data. Bytes after ``FF D9`` (padding, trailing garbage, appended pictures) are
  allowed, as are fill bytes ``FF FF`` between segments; CMYK, grayscale, progressive and
  arithmetic-coded files pass.
* **PNG** (e.g. ImageNet's ``n02105855_2933.JPEG``): the 8-byte signature, an IHDR chunk
  with a non-zero size, an IEND chunk at the end. PNG content is decoded as PNG by both
  loaders (DALI's decoder reads the format from the bytes; Pillow too) and listed by
  ``kdfast data verify`` as misnamed.

What fails, with the reason: an empty or unreadable file (permissions, a broken or
self-referential symbolic link), content that is neither JPEG nor PNG (GIF, BMP, …,
random bytes), a truncated file (no ``FF D9`` / IEND, or a header segment running past
the end), a malformed header (stray bytes between segments — which Pillow tolerates and
DALI's parser does not —, no frame header, a zero image size).

The check is structural: a file whose headers are sound but whose compressed data is
damaged still passes, and decodes with artefacts or fails in the decoder, which each
loader then reports by name (``kdfast data verify`` decodes every file in full).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import stat as stat_module
import time
from pathlib import Path

LOGGER = logging.getLogger("kdfast.data")

#: Bumped whenever the check's rules change: older cached verdicts are then ignored.
CHECK_VERSION = 1

JPEG = "JPEG"
PNG = "PNG"
#: Content formats both loaders decode.
DECODED_FORMATS = (JPEG, PNG)

_HEAD_BYTES = 4096
_TAIL_BYTES = 4096
_CHUNK_BYTES = 1 << 20
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"

#: Other formats recognised by their first bytes, to say what a misnamed file holds.
_SIGNATURES = (
    (b"GIF87a", "GIF"), (b"GIF89a", "GIF"), (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"), (b"\xff\x4f\xff\x51", "JPEG 2000"),
)

# Marker names for the messages; SOFn are the frame headers (C4 DHT, C8 JPG, CC DAC are not).
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_MARKER_NAMES = {0xC4: "DHT", 0xCC: "DAC", 0xDA: "SOS", 0xDB: "DQT", 0xDC: "DNL", 0xDD: "DRI", 0xDE: "DHP",
                 0xDF: "EXP", 0xFE: "COM", **{m: f"SOF{m - 0xC0}" for m in _SOF_MARKERS},
                 **{m: f"APP{m - 0xE0}" for m in range(0xE0, 0xF0)}}


class _Bytes:
    """Random access to a file's bytes, read in blocks as the parser asks for them."""

    def __init__(self, handle, size: int, head: bytes):
        self.handle, self.size = handle, size
        self.start, self.data = 0, head

    def get(self, position: int, count: int) -> bytes:
        end = position + count
        if not (self.start <= position and end <= self.start + len(self.data)):
            self.handle.seek(position)
            self.start, self.data = position, self.handle.read(max(count, _HEAD_BYTES))
        return self.data[position - self.start:end - self.start]

    def find_from(self, position: int, needle: bytes) -> bool:
        """Whether ``needle`` occurs at or after ``position``: the last 4 KiB first, then
        (only when it is not there: trailing data, or a truncated file) everything."""
        tail_start = max(position, self.size - _TAIL_BYTES)
        if needle in self.get(tail_start, self.size - tail_start):
            return True
        overlap = len(needle) - 1
        begin = position
        while begin < tail_start:
            end = min(tail_start + overlap, begin + _CHUNK_BYTES)
            if needle in self.get(begin, end - begin):
                return True
            begin = end - overlap
        return False


def _describe(head: bytes) -> str | None:
    """The format the first bytes show, when it is one kdfast recognises."""
    if head.startswith(b"\xff\xd8\xff"):
        return JPEG
    if head.startswith(_PNG_SIGNATURE):
        return PNG
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    if head[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypavif"):
        return "HEIF/AVIF"
    for signature, name in _SIGNATURES:
        if head.startswith(signature):
            return name
    return None


def _check_jpeg(data: _Bytes) -> str | None:
    """Why the JPEG's structure is unsound, or None."""
    position, frame = 2, None
    while True:
        chunk = data.get(position, 4)  # marker and segment length
        marker_bytes, length_bytes = chunk[:2], chunk[2:]
        if len(marker_bytes) < 2:
            return f"truncated JPEG: the file ends at byte {data.size}, before the image data (SOS)"
        if marker_bytes[0] != 0xFF:
            stray = data.get(position, _HEAD_BYTES).find(b"\xff")
            if stray > 0:
                return (f"corrupt JPEG: {stray} stray byte(s) before the marker at byte {position + stray} "
                        f"(Pillow tolerates them, DALI's parser does not)")
            return f"corrupt JPEG: no marker at byte {position} (0x{marker_bytes[0]:02x})"
        marker = marker_bytes[1]
        if marker == 0xFF:  # fill bytes before a marker
            position += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # TEM, RSTn: no length
            position += 2
            continue
        if marker == 0xD8:
            return f"corrupt JPEG: a second start-of-image marker at byte {position}"
        if marker == 0xD9:
            return f"corrupt JPEG: the image ends (FF D9 at byte {position}) before any image data"
        if marker == 0x00:
            return f"corrupt JPEG: no marker at byte {position} (FF 00)"
        name = _MARKER_NAMES.get(marker, f"0x{marker:02X}")
        if len(length_bytes) < 2:
            return f"truncated JPEG: the file ends ({data.size} bytes) inside the {name} segment at byte {position}"
        length = int.from_bytes(length_bytes, "big")
        if length < 2:
            return f"corrupt JPEG: the {name} segment at byte {position} has length {length}"
        end = position + 2 + length
        if end > data.size:
            return (f"truncated JPEG: the {name} segment at byte {position} ({length} bytes) runs past the end of "
                    f"the file ({data.size} bytes)")
        if marker in _SOF_MARKERS and frame is None:
            header = data.get(position + 4, 6)
            if len(header) < 6 or length < 8:
                return f"corrupt JPEG: a {name} frame header of {length} bytes"
            height, width = int.from_bytes(header[1:3], "big"), int.from_bytes(header[3:5], "big")
            components = header[5]
            if width == 0 or height == 0:
                return f"corrupt JPEG: image size {width}×{height} in the frame header"
            if not 1 <= components <= 4 or length < 8 + 3 * components:
                return f"corrupt JPEG: {components} colour components in a {length}-byte frame header"
            frame = (width, height)
        if marker == 0xDA:
            if frame is None:
                return f"corrupt JPEG: a scan (SOS at byte {position}) without a frame header (SOFn) before it"
            if not data.find_from(end, b"\xff\xd9"):
                return (f"truncated JPEG: no end-of-image marker (FF D9) after the image data "
                        f"({data.size} bytes)")
            return None
        position = end


def _check_png(data: _Bytes) -> str | None:
    """Why the PNG's structure is unsound, or None."""
    header = data.get(8, 25)
    if len(header) < 25:
        return f"truncated PNG: {data.size} bytes, fewer than a PNG header"
    if header[4:8] != b"IHDR" or int.from_bytes(header[:4], "big") != 13:
        return "corrupt PNG: it does not start with an IHDR chunk"
    width, height = int.from_bytes(header[8:12], "big"), int.from_bytes(header[12:16], "big")
    if width == 0 or height == 0:
        return f"corrupt PNG: image size {width}×{height}"
    if header[16] not in (1, 2, 4, 8, 16) or header[17] not in (0, 2, 3, 4, 6):
        return f"corrupt PNG: bit depth {header[16]}, colour type {header[17]}"
    if not data.find_from(33, _PNG_IEND):
        return f"truncated PNG: no IEND chunk at the end ({data.size} bytes)"
    return None


def check_file(path: str, size: int | None = None) -> tuple[str | None, str | None]:
    """``(format, reason)`` of one file: the format its bytes show ("JPEG", "PNG", "GIF", …
    or None) and why the loaders cannot read it, or reason None when both loaders decode it."""
    try:
        with open(path, "rb") as handle:
            if size is None:
                size = os.fstat(handle.fileno()).st_size
            if size == 0:
                return None, "empty file (0 bytes)"
            head = handle.read(_HEAD_BYTES)
            found = _describe(head)
            data = _Bytes(handle, size, head)
            if found == JPEG:
                return found, _check_jpeg(data)
            if found == PNG:
                return found, _check_png(data)
    except OSError as error:
        return None, f"unreadable ({error.strerror or error})"
    if found is not None:
        return found, (f"{found} content with a JPEG name: the loaders read JPEG and PNG only; convert it to JPEG "
                       f"(e.g. with Pillow: Image.open(path).convert('RGB').save(path, 'JPEG', quality=95))")
    shown = " ".join(f"{b:02x}" for b in head[:4])
    return None, f"not an image: it starts with {shown} (a JPEG starts with ff d8 ff, a PNG with 89 50 4e 47)"


# ----------------------------------------------------------------------------- cache


def cache_folder() -> Path | None:
    """Where verdicts are cached: ``$KDFAST_CACHE_DIR`` (``off``: nowhere), else
    ``$XDG_CACHE_HOME/kdfast``, else ``~/.cache/kdfast``."""
    configured = os.environ.get("KDFAST_CACHE_DIR")
    if configured is not None:
        return None if configured.strip().lower() in ("", "off", "none", "0") else Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kdfast"


def _cache_file(key: str) -> Path | None:
    folder = cache_folder()
    if folder is None:
        return None
    return folder / "image-checks" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"


def _load_cache(path: Path | None, key: str) -> dict:
    if path is None:
        return {}
    try:
        with open(path) as handle:
            content = json.load(handle)
    except (OSError, ValueError):
        return {}
    if not isinstance(content, dict) or content.get("version") != CHECK_VERSION or content.get("key") != key:
        return {}
    entries = content.get("entries")
    return entries if isinstance(entries, dict) else {}


def _save_cache(path: Path | None, key: str, entries: dict) -> None:
    if path is None:
        return
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "w") as handle:
            json.dump({"version": CHECK_VERSION, "key": key, "entries": entries}, handle, separators=(",", ":"))
        os.replace(temporary, path)  # atomic: ranks indexing the same folder at once never see half a file
    except OSError as error:
        LOGGER.warning("cannot cache the image checks in %s (%s); every run will check every file again "
                       "(set KDFAST_CACHE_DIR to a writable folder)", path, error)
        try:
            os.unlink(temporary)
        except OSError:
            pass


def _parallelism(count: int) -> int:
    if count < 256:
        return 1
    return max(1, min(16, 2 * len(os.sched_getaffinity(0))))  # I/O bound: reads release the GIL


def check_files(paths: list[str], stats: list, key: str) -> list[tuple[str | None, str | None]]:
    """``(format, reason)`` of each file (see :func:`check_file`), from the cache where the
    file's size and modification time are those recorded.

    ``stats[i]`` is ``os.stat(paths[i])``, or an error message when it failed (such a file is
    reported unreadable and never cached). ``key`` names the cache (the indexed folder or
    file list); paths under it are recorded relative to it.
    """
    cache_path = _cache_file(key)
    cached = _load_cache(cache_path, key)
    prefix = key.rstrip(os.sep) + os.sep
    results: list = [None] * len(paths)
    entries: dict = {}
    missing, hits = [], 0
    for number, (path, status) in enumerate(zip(paths, stats)):
        if isinstance(status, str):
            results[number] = (None, status)
            continue
        if not stat_module.S_ISREG(status.st_mode):
            results[number] = (None, "not a regular file")
            continue
        name = path[len(prefix):] if path.startswith(prefix) else path
        entry = cached.get(name)
        if (isinstance(entry, list) and len(entry) == 4 and entry[0] == status.st_size
                and entry[1] == status.st_mtime_ns):
            results[number] = (entry[2], entry[3])
            entries[name] = entry
            hits += 1
        else:
            missing.append((number, name, status))
    if missing:
        begin = time.perf_counter()
        workers = _parallelism(len(missing))
        sizes = [status.st_size for _, _, status in missing]
        names = [paths[number] for number, _, _ in missing]
        if workers > 1:
            with concurrent.futures.ThreadPoolExecutor(workers) as pool:
                verdicts = list(pool.map(check_file, names, sizes))
        else:
            verdicts = [check_file(name, size) for name, size in zip(names, sizes)]
        for (number, name, status), verdict in zip(missing, verdicts):
            results[number] = verdict
            if not (verdict[1] or "").startswith("unreadable"):
                entries[name] = [status.st_size, status.st_mtime_ns, verdict[0], verdict[1]]
        elapsed = time.perf_counter() - begin
        if len(missing) >= 1000:
            LOGGER.info("%s: checked %d image file(s) in %.1f s (%d others known from the cache)", key,
                        len(missing), elapsed, hits)
    if missing or entries.keys() != cached.keys():
        _save_cache(cache_path, key, entries)
    return results
