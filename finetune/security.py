"""Guards for a shared box: safe names and paths inside the data dir, checked archives, users and limits.

Everything the app writes, serves or deletes goes through `safe_path`, so a run name like `../../etc`
or an absolute path can never reach outside `finetune.home()`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import sqlite3
import unicodedata
import zipfile
from collections.abc import Iterator
from pathlib import Path

from finetune import FinetuneError, home
from finetune.settings import Settings

MAX_NAME = 64
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(name: str, fallback: str = "unnamed") -> str:
    """A file-system-safe name: ASCII letters, digits, `._-`; no leading dots; at most 64 characters."""
    text = unicodedata.normalize("NFKD", str(name)).encode("ascii", "ignore").decode()
    text = _UNSAFE.sub("-", text.replace("\x00", "")).strip(".-_")[:MAX_NAME].strip(".-_")
    return text or fallback


def safe_path(*parts: str, root: Path | None = None) -> Path:
    """`root/parts...` (root: the data dir), refusing anything that would resolve outside root."""
    root = (root or home()).resolve()
    if any("\x00" in str(p) for p in parts):
        raise FinetuneError("File names cannot contain NUL bytes.")
    path = root.joinpath(*parts).resolve()
    if path != root and root not in path.parents:
        raise FinetuneError(f"{'/'.join(map(str, parts))!r} is outside the app's data folder.")
    return path


def check_upload_size(path: str | Path, limit_mb: float | None = None) -> None:
    limit_mb = limit_mb if limit_mb is not None else Settings.current().max_upload_mb
    size = Path(path).stat().st_size
    if size > limit_mb * 2**20:
        raise FinetuneError(f"The file is {size / 2**20:.0f} MB; the limit is {limit_mb:.0f} MB.")


def extract_zip(archive: str | Path, dest: Path, max_bytes: int = 2 * 2**30, max_files: int = 1000) -> Path:
    """Extract a zip after checking every member: no absolute or `..` paths, no links, bounded total size."""
    with zipfile.ZipFile(archive) as zf:
        members = zf.infolist()
        if len(members) > max_files:
            raise FinetuneError(f"The archive has {len(members)} files; at most {max_files} are accepted.")
        if sum(m.file_size for m in members) > max_bytes:
            raise FinetuneError(f"The archive unpacks to more than {max_bytes / 2**30:.0f} GB.")
        for m in members:
            name = m.filename
            is_link = (m.external_attr >> 16) & 0o170000 == 0o120000
            if is_link or name.startswith(("/", "\\")) or ".." in Path(name).parts or ":" in name or "\x00" in name:
                raise FinetuneError(f"The archive holds an unsafe path ({name!r}); it was not extracted.")
        dest.mkdir(parents=True, exist_ok=True)
        for m in members:
            safe_path(m.filename, root=dest)  # belt and braces: resolves inside dest
        zf.extractall(dest)
    return dest


_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_READ_ONLY = {errno.EROFS, errno.EACCES, errno.EPERM}


@contextlib.contextmanager
def saving(what: str) -> Iterator[None]:
    """Turn "disk full" and "read-only" failures while writing `what` into one clear `FinetuneError`.

    Whatever was saved before stays as it was: callers write to a temp name first, or in one SQLite transaction.
    """
    try:
        yield
    except (OSError, sqlite3.OperationalError) as e:  # SQLite says it in words, the OS with an errno
        code, text = getattr(e, "errno", None), str(e)
        full = code in _FULL or "disk is full" in text
        read_only = code in _READ_ONLY or any(w in text for w in ("readonly database", "unable to open database"))
        if not (full or read_only):
            raise
        raise FinetuneError(
            f"Could not save {what}: the data folder {home()} {'is full' if full else 'is read-only'}. Free space "
            "or make it writable (or set FINETUNE_HOME); what was saved before is unchanged."
        ) from e


def parse_auth(spec: str | None = None) -> list[tuple[str, str]]:
    """Users from `FINETUNE_AUTH`: "user:pass,user2:pass2", or a path to a file with one user:pass per line."""
    spec = spec if spec is not None else Settings.current().auth
    if not spec.strip():
        return []
    if os.path.isfile(spec):
        spec = Path(spec).read_text(encoding="utf-8").replace("\n", ",")
    users = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        user, sep, password = item.partition(":")
        if not sep or not user or not password:
            raise FinetuneError("FINETUNE_AUTH entries must look like user:password, separated by commas.")
        users.append((user, password))
    return users


def is_admin(user: str | None) -> bool:
    return bool(user) and user in Settings.current().admins
