"""Archive bombs, built in memory in well under a second (no gigabytes are ever compressed here)."""

from __future__ import annotations

import bz2
import gzip
import io
import json
import struct
import tarfile
import zipfile

MiB = 1024 * 1024
# One gzip member of 1 MiB of zeros (about 1 KiB): gzip readers decompress concatenated members as one stream, so
# N copies are N MiB of zeros for N KiB of upload.
_GZIP_MIB_OF_ZEROS = gzip.compress(b"\0" * MiB, compresslevel=9)


def tar_header(name: str, size: int, kind: bytes = tarfile.REGTYPE, fmt: int = tarfile.GNU_FORMAT) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.type = size, kind
    return info.tobuf(format=fmt)  # type: ignore[arg-type]  # one of tarfile's *_FORMAT ints


def many_empty_members(n: int = 100_000, *, compress: str = "gz") -> bytes:
    """A tar of n empty members (the same header n times), gzip- or bz2-compressed: n x 512 bytes of headers."""
    raw = tar_header("empty", 0) * n + b"\0" * 1024
    return gzip.compress(raw, compresslevel=1) if compress == "gz" else bz2.compress(raw, compresslevel=1)


def zip_of_many_members(n: int) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i in range(n):
            archive.writestr(f"m{i}", b"")
    return buffer.getvalue()


def declared_huge_over_zeros(declared: int = 100 * 1024**3, zeros_mib: int = 16) -> bytes:
    """A .tar.gz whose first member says it is `declared` bytes long, followed by a gzip stream of zeros."""
    return gzip.compress(tar_header("adapter_model.safetensors", declared)) + _GZIP_MIB_OF_ZEROS * zeros_mib


def slow_to_skip(pad_mib: int, good: dict[str, bytes]) -> bytes:
    """A .tar.gz with a member of pad_mib MiB of zeros before the adapter's files: finding them decompresses all of it."""
    out = [gzip.compress(tar_header("padding", pad_mib * MiB))]
    out += [_GZIP_MIB_OF_ZEROS] * pad_mib
    tail = io.BytesIO()
    with tarfile.open(fileobj=tail, mode="w") as archive:
        for name, data in good.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    out.append(gzip.compress(tail.getvalue()))
    return b"".join(out)


def long_name_bomb(name_mib: int) -> bytes:
    """A GNU long-name record of name_mib MiB (zeros): tarfile reads a member's long name into memory whole."""
    return (
        gzip.compress(tar_header("././@LongLink", name_mib * MiB, tarfile.GNUTYPE_LONGNAME))
        + _GZIP_MIB_OF_ZEROS * name_mib
    )


def safetensors(header: object, *, declared_len: int | None = None, data: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if declared_len is None else declared_len) + raw + data


def tar_gz(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()
