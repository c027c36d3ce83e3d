"""Builders for real dataset archives (zip, tar, tar.gz) with real images, honest or hostile."""

from __future__ import annotations

import io
import stat
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
from PIL import Image

# name -> file bytes, or None for an explicit directory entry
Members = Mapping[str, bytes | None]


def noise_image(fmt: str = "PNG", size: tuple[int, int] = (16, 16), seed: int = 0) -> bytes:
    """A small random-noise RGB image encoded as ``fmt`` (PNG, JPEG, BMP, ...)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def dataset_members(counts: Mapping[str, int], prefix: str = "", fmt: str = "PNG") -> dict[str, bytes | None]:
    """``{prefix}<class>/<i>.png`` members, each a distinct noise image."""
    ext = {"JPEG": "jpg"}.get(fmt, fmt.lower())
    members: dict[str, bytes | None] = {}
    seed = 0
    for name, n in counts.items():
        for i in range(n):
            seed += 1
            members[f"{prefix}{name}/{i}.{ext}"] = noise_image(fmt, seed=seed)
    return members


def write_zip(path: Path, members: Members, extra: Iterable[tuple[zipfile.ZipInfo, bytes]] = ()) -> Path:
    """A deflated zip of ``members`` plus hand-made ``(ZipInfo, data)`` entries."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            if data is None:
                zf.writestr(zipfile.ZipInfo(name.rstrip("/") + "/"), b"")
            else:
                zf.writestr(name, data)
        for info, data in extra:
            zf.writestr(info, data)
    return path


def zip_symlink(name: str, target: str) -> tuple[zipfile.ZipInfo, bytes]:
    """A zip entry whose Unix external attributes mark it as a symlink to ``target``."""
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info, target.encode()


def write_tar(
    path: Path,
    members: Members,
    *,
    gz: bool = False,
    extra: Iterable[tuple[tarfile.TarInfo, bytes | None]] = (),
    fmt: int = tarfile.PAX_FORMAT,
) -> Path:
    """A tar (or tar.gz) of ``members`` plus hand-made ``(TarInfo, data)`` entries."""
    with tarfile.open(path, "w:gz" if gz else "w", format=fmt) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        for info, payload in extra:
            tf.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return path


def tar_special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    """A data-less tar entry of type ``kind`` (tarfile.SYMTYPE, LNKTYPE, FIFOTYPE, CHRTYPE, ...)."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3
    return info, None


def tar_file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    """A regular tar entry, for names ``write_tar``'s mapping cannot express.

    A name with a NUL byte goes into a pax ``path`` record, the one place a tar can hold it.
    """
    info = tarfile.TarInfo(name)
    info.size = len(data)
    if "\x00" in name:
        info.pax_headers = {"path": name}
    return info, data


def png_header_bomb(width: int, height: int) -> bytes:
    """A genuine 1-bit black PNG of ``width`` x ``height``: huge when decoded, tiny on disk."""
    row = b"\x00" + bytes((width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    parts = []
    block = row * 256
    for _ in range(height // 256):
        parts.append(compressor.compress(block))
    parts.append(compressor.compress(row * (height % 256)))
    parts.append(compressor.flush())
    idat = b"".join(parts)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
