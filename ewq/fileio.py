"""Writing files safely: atomic writes, writable output directories, stale temporary files, digests."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError

PARTIAL_SUFFIX = ".partial"


def ensure_writable_dir(path: Path) -> Path:
    """Create `path` if needed and prove it writable by creating a file in it (os.access says yes
    to root on a read-only mount); remove temporary files left there by killed runs."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create output directory {path}: {error.strerror}") from None
    _prove_writable(path, path)
    remove_stale_partials(path)
    return path


def check_writable_dir(path: Path) -> Path:
    """What ensure_writable_dir would refuse, without creating anything (for --dry-run)."""
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"cannot create output directory {path}: {existing} is not a directory")
    _prove_writable(existing, path)
    return path


def _prove_writable(directory: Path, shown: Path) -> None:
    """Create and remove a file in `directory`: os.access says yes to root on a read-only mount."""
    try:
        handle, probe = tempfile.mkstemp(prefix=".ewq-write-probe.", dir=directory)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise UserError(f"output directory {shown} is not writable: {error.strerror}") from None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(directory: Path) -> list[Path]:
    """Temporary files whose writer (pid in the name) is gone: a run killed with SIGKILL."""
    removed = []
    for temp in Path(directory).glob(f".*{PARTIAL_SUFFIX}"):
        parts = temp.name.split(".")
        pid = parts[-3] if len(parts) >= 4 else ""
        if pid.isdigit() and not _pid_alive(int(pid)):
            temp.unlink(missing_ok=True)
            removed.append(temp)
    return removed


@contextmanager
def atomic_path(target: Path):
    """Yield a temporary path beside `target`; rename it over `target` only on success.
    The temporary name carries the writer's pid, so that a later run can remove it if this one
    is killed before it can clean up (SIGKILL)."""
    target = Path(target)
    handle, temp_name = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=PARTIAL_SUFFIX,
                                         dir=target.parent)
    os.close(handle)
    temp = Path(temp_name)
    try:
        yield temp
        if temp.stat().st_mode & 0o777 == 0o600:  # mkstemp's mode: give the file the usual umask-based one
            temp.chmod(0o666 & ~_umask())
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


@contextmanager
def staged_dir(target: Path, prefix: str = ".staging-"):
    """Yield an empty directory beside `target` to fill; on success it replaces `target` (a directory) by a
    rename, on failure it is removed. It gets the umask's usual mode, not mkdtemp's 0700, so that a model
    or a source tree put in place is readable by whoever could read its parent."""
    target = Path(target)
    staging = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    try:
        staging.chmod(0o777 & ~_umask())
        yield staging
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(target: Path, text: str, mode: int | None = None) -> None:
    try:
        with atomic_path(target) as temp:
            temp.write_text(text)
            if mode is not None:
                temp.chmod(mode)
    except OSError as error:
        raise UserError(f"cannot write {target}: {error.strerror or error}") from None


def write_json_atomic(target: Path, data: dict) -> None:
    write_text_atomic(target, json.dumps(data, indent=2, allow_nan=False) + "\n")


def read_json(path: Path, what: str = ""):
    """A JSON file's content; one UserError naming the file (`what` before its path) if it is not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{what}{path} is not valid JSON: {error}") from None


def read_cache(path: Path, fingerprint: dict, what: str) -> dict:
    """A measurement cache's content if `path` holds one written for `fingerprint`, else {} (an
    unreadable file is logged and measured again, not an error)."""
    from .console import log

    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        log(f"{what}: cache {path} is unreadable; measuring again")
        return {}
    return data if isinstance(data, dict) and data.get("fingerprint") == fingerprint else {}


def file_digest(path: Path) -> str:
    """16 hex digits of the SHA-256 of a file's bytes (an importance matrix's identity in a plan)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]
