"""AUTOMATIC1111's model hash of a checkpoint file, computed once per file and remembered.

A1111 writes ``Model hash: 6ce0161689`` in its infotext: the first 10 hex digits of the SHA-256
of the whole checkpoint file (its "short hash"), and picks the checkpoint by it when parameters
are pasted. Hashing reads the whole file (2-7 GB: seconds to a minute), so it happens once, in
the thread that loads the model, and is remembered by the file's (path, size, mtime): in memory,
and in a small JSON file (``$XDG_CACHE_HOME/sdbot/hashes.json``, by default
``~/.cache/sdbot/hashes.json``) so that a restart does not hash again. A file that is replaced
has a new size or mtime and is hashed again.

A cache file that cannot be read or written is only a lost shortcut: we hash again and log it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from pathlib import Path

log = logging.getLogger(__name__)

#: Read this much at a time: hashing never holds more than this of the file in memory.
CHUNK_BYTES = 1 << 20
#: A1111's short hash: this many hex digits of the SHA-256.
SHORT_HASH_LENGTH = 10


def sha256_of_file(path: str | Path) -> str:
    """Hex SHA-256 of the file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def default_cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sdbot" / "hashes.json"


class HashCache:
    """SHA-256 of checkpoint files by (path, size, mtime), in memory and in ``path`` (None: memory only)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._entries: dict[str, dict] | None = None  # read from the file on first use
        self._lock = threading.Lock()  # two models loading at once share the file

    def short_hash(self, file: str | Path) -> str:
        """A1111's ``Model hash`` of ``file``: hashed on first sight, then remembered."""
        return self.sha256(file)[:SHORT_HASH_LENGTH]

    def sha256(self, file: str | Path) -> str:
        file = Path(file).resolve()
        stat = file.stat()
        key, stamp = str(file), {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        with self._lock:
            entry = self._load().get(key)
            if entry and all(entry.get(k) == v for k, v in stamp.items()) and isinstance(entry.get("sha256"), str):
                return entry["sha256"]
        log.info("hashing %s (%.1f GB) for its model hash; once per file", file, stat.st_size / 1e9)
        digest = sha256_of_file(file)
        with self._lock:
            self._load()[key] = {**stamp, "sha256": digest}
            self._save()
        return digest

    def _load(self) -> dict[str, dict]:
        if self._entries is None:
            self._entries = {}
            if self.path is not None and self.path.exists():
                try:
                    entries = json.loads(self.path.read_text())
                    self._entries = entries if isinstance(entries, dict) else {}
                except (OSError, ValueError) as e:
                    log.warning("model hash cache %s unreadable (%s); hashing again", self.path, e)
        return self._entries

    def _save(self) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Write aside and rename: a reader (another process) never sees half a file.
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".hashes-", suffix=".json")
            with os.fdopen(fd, "w") as f:
                json.dump(self._entries, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError as e:
            log.warning("model hash cache %s not written (%s); the hash is kept in memory", self.path, e)


#: The process's cache, for loads that are not given one.
_shared: HashCache | None = None


def shared_cache() -> HashCache:
    global _shared
    if _shared is None:
        _shared = HashCache(default_cache_path())
    return _shared
