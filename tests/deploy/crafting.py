"""Take a file written by gblr.save apart and put it back together, with its checksum
recomputed: what someone crafting a file would do. For the loader's tests only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gblr.deploy import io


def split(data: bytes) -> tuple[dict[str, Any], bytes]:
    """The parsed safetensors header (``structure`` left a string) and the tensor bytes."""
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + size]), data[8 + size :]


def records(header: dict[str, Any], body: bytes) -> list[tuple[str, str, list[int], bytes]]:
    return [
        (
            name,
            str(io._STORED_DTYPES[info["dtype"]]),
            info["shape"],
            body[info["data_offsets"][0] : info["data_offsets"][1]],
        )
        for name, info in header.items()
        if name != "__metadata__"
    ]


def resign(header: dict[str, Any], body: bytes) -> None:
    """Recompute the header's sha256 in place, as the file's version computes it; leave it
    when the tensor table is too broken to compute one (the loader refuses that anyway)."""
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict):
        return
    try:
        table = records(header, body)
        if metadata.get("format_version") == "1":
            metadata["sha256"] = io._digest_v1(metadata["structure"], table)
        else:
            metadata["sha256"] = io._digest(metadata, table)
    except Exception:  # a malformed table: no checksum to compute
        return


def join(header: dict[str, Any] | str, body: bytes) -> bytes:
    """The file's bytes: header (JSON text as given, or an object) padded to 8 bytes."""
    text = (header if isinstance(header, str) else json.dumps(header)).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + body


def edit(path: Path, change, *, structure: bool = True, sign: bool = True) -> Path:
    """Rewrite ``path`` after ``change(tree)`` edited its header in place; with
    ``structure``, the tree's ``__metadata__.structure`` is the parsed JSON (dumped back
    after the change). The checksum is recomputed when ``sign``."""
    header, body = split(path.read_bytes())
    metadata = header["__metadata__"]
    if structure:
        metadata["structure"] = json.loads(metadata["structure"])
    change(header)
    metadata = header.get("__metadata__")
    if structure and isinstance(metadata, dict) and not isinstance(metadata["structure"], str):
        metadata["structure"] = json.dumps(metadata["structure"], sort_keys=True)
    if sign:
        resign(header, body)
    path.write_bytes(join(header, body))
    return path
