"""The per-site on-disk cache of preprocessed tensors.

Layout under ``state_dir/cache``::

    file-digests.json          path -> (size, mtime_ns, content digest), to skip re-hashing
    <preprocessing key>/       one folder per preprocessing configuration
        pack.json              item digests in order, failures by digest, array file names
        images.<id>.npy        float32 (N, C, S, S), one row per item digest
        mask.<name>.<id>.npy   uint8 (N, 1, S, S)

An item digest covers the image file's content and its masks' contents; the folder name
covers every setting that changes preprocessing. A changed file therefore misses alone, and
a changed setting misses everything. Failures are cached too (by content), so a corrupt file
is not decoded again every round. Packs are replaced atomically (new arrays, then the
``pack.json`` pointer), and only the most recently used preprocessing folders are kept.

Arrays are memory-mapped copy-on-write: loading costs no reads, pages come from the page
cache when first touched (shared between the processes of successive rounds), and writes
to the tensors stay private. A replaced pack's files are unlinked, which leaves existing
mappings valid.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["FileDigests", "Pack", "PackStore", "digest_bytes", "digest_parts", "preprocessing_key"]

logger = logging.getLogger(__name__)

#: Bump when preprocessing code changes its output, so that old packs are not reused.
CACHE_VERSION = 1
_KEEP_CONFIGURATIONS = 3
_RACY_NS = 2_000_000_000


def digest_bytes(data: bytes) -> str:
    """Hex digest of a file's content."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def digest_parts(*parts: str) -> str:
    """Hex digest of text parts; NUL never occurs in them, so boundaries are kept."""
    return hashlib.blake2b("\0".join(parts).encode(), digest_size=16).hexdigest()


def preprocessing_key(settings: Mapping[str, Any]) -> str:
    """Folder name for one preprocessing configuration (JSON-serialisable settings)."""
    text = json.dumps({"cache_version": CACHE_VERSION, **settings}, sort_keys=True, default=str)
    return digest_parts(text)[:20]


def _write_json_atomic(path: Path, payload: Any) -> None:
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with temporary.open("w", encoding="utf-8") as stream:
        json.dump(payload, stream)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(temporary, path)


class FileDigests:
    """Content digests of files, reused while a file's size and mtime are unchanged.

    Parameters
    ----------
    index_path
        JSON file that remembers ``path -> (size, mtime_ns, digest)`` (paths as given:
        site configs resolve data paths to absolute ones).
    """

    def __init__(self, index_path: Path) -> None:
        self._path = index_path
        self._entries: dict[str, list[Any]] = {}
        self._changed = False
        try:
            loaded = json.loads(index_path.read_text(encoding="utf-8"))
            if isinstance(loaded, dict):
                self._entries = loaded
        except (OSError, ValueError):
            pass

    def digest(self, path: str | os.PathLike[str]) -> str:
        """Digest of the file's content.

        Raises
        ------
        OSError
            When the file cannot be read (``FileNotFoundError`` when it does not exist).
        """
        name = os.fspath(path)
        stat = os.stat(name)
        known = self._entries.get(name)
        if known is not None and known[0] == stat.st_size and known[1] == stat.st_mtime_ns:
            return str(known[2])
        with open(name, "rb") as stream:
            value = digest_bytes(stream.read())
        # A file written within the timestamp resolution of this hashing could change again
        # with the same size and mtime ("racily clean" in git): hash it again next time.
        if time.time_ns() - stat.st_mtime_ns > _RACY_NS:
            self._entries[name] = [stat.st_size, stat.st_mtime_ns, value]
            self._changed = True
        return value

    def save(self) -> None:
        """Persist the digests learned since loading (no-op when nothing changed)."""
        if self._changed:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            _write_json_atomic(self._path, self._entries)
            self._changed = False


@dataclass
class Pack:
    """Preprocessed items of one configuration, as rows of stacked arrays.

    Attributes
    ----------
    keys
        Item digest per row.
    images
        float32 ``(N, C, S, S)`` in [0, 1].
    masks
        uint8 ``(N, 1, S, S)`` per mask name.
    has_mask
        bool ``(N,)`` per mask name: whether the item declares that mask.
    failures
        Item digest -> ``(reason, message)`` for items that could not be used.
    """

    keys: list[str]
    images: np.ndarray
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    has_mask: dict[str, np.ndarray] = field(default_factory=dict)
    failures: dict[str, tuple[str, str]] = field(default_factory=dict)

    def row_of(self) -> dict[str, int]:
        """Item digest -> first row holding it."""
        rows: dict[str, int] = {}
        for row, key in enumerate(self.keys):
            rows.setdefault(key, row)
        return rows


class PackStore:
    """Reads and atomically replaces the pack of one preprocessing configuration.

    Parameters
    ----------
    cache_root
        ``state_dir/cache``.
    settings
        The preprocessing settings (recorded in ``pack.json`` for humans; the folder name is
        their digest).
    """

    def __init__(self, cache_root: Path, settings: Mapping[str, Any]) -> None:
        self.cache_root = cache_root
        self.settings = dict(settings)
        self.directory = cache_root / preprocessing_key(settings)

    def load(self) -> Pack | None:
        """The current pack, or ``None`` when there is none (or it is damaged)."""
        pointer = self.directory / "pack.json"
        try:
            manifest = json.loads(pointer.read_text(encoding="utf-8"))
            images = np.load(self.directory / manifest["images"], mmap_mode="c")
            masks = {
                name: np.load(self.directory / file_name, mmap_mode="c")
                for name, file_name in manifest["masks"].items()
            }
            has_mask = {
                name: np.array([flag == "1" for flag in flags], dtype=bool)
                for name, flags in manifest["has_mask"].items()
            }
            failures = {key: (value[0], value[1]) for key, value in manifest["failures"].items()}
            pack = Pack(manifest["keys"], images, masks, has_mask, failures)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            logger.warning("The preprocessed-image cache is damaged; rebuilding it")
            return None
        if images.shape[0] != len(pack.keys) or any(
            len(array) != len(pack.keys) for array in (*masks.values(), *has_mask.values())
        ):
            logger.warning("The preprocessed-image cache is inconsistent; rebuilding it")
            return None
        os.utime(pointer)
        return pack

    def save(self, pack: Pack) -> None:
        """Write ``pack`` as the current pack, then drop files no pack refers to."""
        self.directory.mkdir(parents=True, exist_ok=True)
        tag = uuid.uuid4().hex[:12]
        images_name = f"images.{tag}.npy"
        np.save(self.directory / images_name, pack.images, allow_pickle=False)
        mask_names = {}
        for name, array in pack.masks.items():
            mask_names[name] = f"mask.{name}.{tag}.npy"
            np.save(self.directory / mask_names[name], array, allow_pickle=False)
        manifest = {
            "settings": self.settings,
            "keys": pack.keys,
            "images": images_name,
            "masks": mask_names,
            "has_mask": {
                name: "".join("1" if flag else "0" for flag in flags)
                for name, flags in pack.has_mask.items()
            },
            "failures": {key: list(value) for key, value in pack.failures.items()},
        }
        _write_json_atomic(self.directory / "pack.json", manifest)
        referenced = {images_name, *mask_names.values(), "pack.json"}
        for path in self.directory.glob("*.npy"):
            if path.name not in referenced:
                path.unlink(missing_ok=True)
        self._drop_old_configurations()

    def _drop_old_configurations(self) -> None:
        folders = [
            folder
            for folder in self.cache_root.iterdir()
            if folder.is_dir() and (folder / "pack.json").exists()
        ]
        folders.sort(key=lambda folder: (folder / "pack.json").stat().st_mtime_ns, reverse=True)
        for folder in folders[_KEEP_CONFIGURATIONS:]:
            logger.info("Removing the cache of an older preprocessing configuration")
            shutil.rmtree(folder, ignore_errors=True)
