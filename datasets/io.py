"""Small shared I/O helpers: atomic writes, strict JSON, untrusted paths, and output folders a job may claim.

Every file a job writes goes through a temporary sibling and a rename, so that an interrupted job (or a full disk)
leaves the previous file or nothing, never half a file and never the temporary file.

Paths read from a table (a ``sample_data`` file name, a scene name) are untrusted: ``path_inside`` and
``safe_component`` are the one check they all go through.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

JOB_MARKER = ".bevjepa-job.json"
"""The file that says which job owns an output folder (``{"job": "train"}``)."""


class UnsafePathError(ValueError):
    """A path from untrusted input would reach outside its root folder."""


class FolderInUseError(ValueError):
    """An output folder holds something other than this job's own earlier output."""


def _write_via_temporary(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a hidden sibling of ``path``, then rename it over ``path``; remove it on any failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (whole or absent, no temporary file left behind)."""
    _write_via_temporary(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_with(path: Path, write: Callable[[Path], None]) -> None:
    """Let ``write(tmp_path)`` produce the file (e.g. a library's ``save_file``), then rename it to ``path``."""
    _write_via_temporary(path, write)


def atomic_write_folder(path: Path, fill: Callable[[Path], None]) -> None:
    """Let ``fill(staging)`` write a whole folder beside ``path``, then rename it to ``path`` (absent or empty).

    The staging folder is removed on any failure, so ``path`` is either the whole folder or as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        fill(staging)
        if path.exists():
            path.rmdir()  # only an empty folder may be replaced
        os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def strict_json(value: object) -> object:
    """``value`` with every non-finite float as ``None`` and paths, numpy scalars and arrays as plain JSON values."""
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.ndarray):
        return strict_json(value.tolist())
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    return value


def dumps_json(value: object, indent: int | None = 1, sort_keys: bool = False) -> str:
    """Strict JSON text of ``value`` (NaN and infinities become ``null``)."""
    return json.dumps(strict_json(value), indent=indent, sort_keys=sort_keys, allow_nan=False)


def atomic_write_json(path: Path, value: object, indent: int | None = 1, sort_keys: bool = False) -> None:
    """Write ``value`` as strict JSON atomically."""
    atomic_write_text(path, dumps_json(value, indent=indent, sort_keys=sort_keys))


def atomic_write_npz(path: Path, compressed: bool = True, **arrays: np.ndarray) -> None:
    """Write numpy arrays as an ``.npz`` file atomically."""
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def read_json_object(path: Path, what: str = "file") -> dict:
    """Read a JSON file that must hold an object; a clear ``ValueError`` names the file otherwise."""
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{what} {path} is not valid JSON ({error}); remove or repair it") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what} {path} holds a JSON {type(value).__name__}, not an object; remove or repair it")
    return value


_SAFE_COMPONENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def safe_component(name: str, what: str) -> str:
    """Return ``name`` if it is one harmless path component (letters, digits, ``._-``), else raise ``UnsafePathError``.

    Used for names from a table that become file or folder names (scene names, tokens).
    """
    if not isinstance(name, str) or not _SAFE_COMPONENT.match(name) or name in {".", ".."}:
        raise UnsafePathError(
            f"{what} {name!r} cannot be used as a file name: it must be one path component of letters, digits, "
            "'.', '_' or '-' (no '/', no '..', not absolute)"
        )
    return name


def path_inside(root: Path, relative: str, what: str) -> Path:
    """Join an untrusted relative path from a table onto ``root``, refusing anything that would leave ``root``.

    The check is on the text the table gives, not on the folders it passes through: links that the user placed
    inside ``root`` (``samples/`` on another disk, as many nuScenes installs have) are the user's own and are
    followed, as the devkit follows them.

    Args:
        root: the folder the path must stay inside (a dataroot, an output folder).
        relative: the path as the table gives it, e.g. ``samples/LIDAR_TOP/x.pcd.bin``.
        what: what the path is, for the error (e.g. ``"sample_data abc123 filename"``).

    Raises:
        UnsafePathError: the path is empty, absolute, or holds ``..``, a backslash or a NUL.
    """
    if not isinstance(relative, str) or not relative or "\x00" in relative:
        raise UnsafePathError(f"{what} {relative!r} is not a usable relative path")
    candidate = Path(relative)
    if candidate.is_absolute() or "\\" in relative or ".." in candidate.parts:
        raise UnsafePathError(f"{what} {relative!r} points outside {root}: only paths relative to it, without '..'")
    return Path(root) / candidate


def claim_output_folder(folder: Path, job: str, own_files: Callable[[Path], bool] | None = None) -> Path:
    """Make ``folder`` the output folder of ``job``, refusing one that holds other work.

    A folder may be used when it does not exist, is empty, or already belongs to ``job``: it holds this module's
    marker naming ``job``, or (for output written before the marker existed) ``own_files(folder)`` says so.

    Raises:
        FolderInUseError: ``folder`` is a file, or holds another job's output or files of unknown origin.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FolderInUseError(f"output {folder} is a file, not a folder; choose a folder path")
    marker = folder / JOB_MARKER
    if folder.is_dir() and any(folder.iterdir()):
        owner = None
        if marker.is_file():
            try:
                owner = json.loads(marker.read_text()).get("job")
            except (json.JSONDecodeError, AttributeError):
                owner = None
        if owner != job and not (owner is None and own_files is not None and own_files(folder)):
            held = f"the output of 'bevjepa {owner}'" if owner else "files that are not this job's output"
            raise FolderInUseError(
                f"output folder {folder} holds {held}; 'bevjepa {job}' writes only into an empty folder or its own "
                "earlier output: choose another --out"
            )
    folder.mkdir(parents=True, exist_ok=True)
    if not marker.is_file():
        atomic_write_json(marker, {"job": job})
    return folder


def format_report(result: dict) -> str:
    """One benchmark measurement as aligned ``name  value`` lines (floats to three decimals, ints with separators)."""
    width = max(len(k) for k in result)
    lines = []
    for key, value in result.items():
        shown = f"{value:,.3f}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) else value
        lines.append(f"{key.ljust(width)}  {shown}")
    return "\n".join(lines)
