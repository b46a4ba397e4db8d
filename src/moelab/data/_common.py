"""Small helpers shared by the text and image loaders (private)."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path


def stable_seed(*parts: object) -> int:
    """A 63-bit integer derived from ``parts`` that is the same on every machine and version.

    Used for fixed splits and per-step/per-epoch RNG seeds, so they never depend on Python's
    salted ``hash`` or on a library's RNG stream staying the same.
    """
    digest = hashlib.blake2b(repr(parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def package_dir(package: str, pip_command: str) -> Path:
    """Folder of an installed top-level package, found WITHOUT importing it.

    Raises ModuleNotFoundError naming ``pip_command`` when the package is not installed.
    """
    spec = importlib.util.find_spec(package)  # top-level name: does not execute the package
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the data package {package!r} is not installed; install it with:\n    {pip_command}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def require_file(path: Path, what: str, how_to_get: str) -> Path:
    """Return ``path`` if it is a file, else raise FileNotFoundError saying what and how (a
    directory is named as such: this loader reads one file)."""
    if path.is_dir():
        raise FileNotFoundError(f"{what}: {path} is a directory; this loader reads one file: "
                                f"give the file's path. {how_to_get}")
    if not path.is_file():
        raise FileNotFoundError(f"{what}: file not found: {path}. {how_to_get}")
    return path


def require_dir(path: str | Path, what: str, how_to_get: str) -> Path:
    """Return ``path`` as a Path if it is a directory, else raise FileNotFoundError."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"{what}: directory not found: {p}. {how_to_get}")
    return p


def read_utf8(path: Path) -> str:
    """Read a UTF-8 text file strictly (a leading BOM is dropped, CRLF/CR become LF).

    Raises ValueError naming the file and the byte offset when it is not valid UTF-8.
    """
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path} is not valid UTF-8 (bad byte 0x{data[e.start]:02x} at offset {e.start}); "
            "convert it first, e.g. `iconv -f latin1 -t utf-8`"
        ) from None
    if text.startswith("\ufeff"):
        text = text[1:]
    return text.replace("\r\n", "\n").replace("\r", "\n")
