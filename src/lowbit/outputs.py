"""Where lowbit writes: every output file and directory goes through here.

The rules, for every command's ``-o`` and every file a command writes:

* **Checked before any work.** `check_dir` / `check_file` refuse a bad target with one line
  (a file where a directory is meant, a path under a regular file, a broken symbolic link, a
  read-only or missing parent, a name too long for the file system, the command's own input)
  before a model is loaded, so minutes of calibration are never lost to a typo.
* **Never delete or overwrite what lowbit did not write.** An existing directory is replaced
  only when its record file (``lowbit.json`` for a checkpoint) is a valid lowbit record and every
  file in it is one a checkpoint holds; anything else (a project folder, a checkpoint with the
  user's notes in it) needs ``force``. An existing file is replaced only when it is the kind being
  written (a GGUF file by a GGUF file), is not an input of the command, and is not inside a
  checkpoint; again ``force`` overrides.
* **Atomic.** Everything is written under a temporary name beside the target, fsync'ed and
  renamed into place; a directory that exists is swapped with the new one in a single
  ``renameat2(RENAME_EXCHANGE)`` (on file systems without it: renamed aside, the new one renamed
  in, the old one restored if that fails), so the path always holds a complete old or new result.
* **Locked.** A second run writing the same path fails at once with a one-line error instead of
  silently replacing the first one's result (`lock`; the lock is held for the whole command).
  Leftover temporaries of a killed run on the same path are removed by the next run that holds
  the lock.
* **The user's umask.** Temporary files and folders are created private (mkstemp/mkdtemp) and
  given the permissions the umask allows before they are renamed into place.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Iterable, Iterator

from lowbit.errors import LowbitError

# Files a lowbit checkpoint (or a compressed-tensors export) consists of; a directory holding
# anything else is not replaced without force.
_OWN_FILES = re.compile(
    r"(lowbit\.json|lowbit_export\.json|lowbit_train\.json|config\.json|generation_config\.json|model\.safetensors|"
    r"model-\d{5}-of-\d{5}\.safetensors|model\.safetensors\.index\.json|tokenizer\.json|"
    r"tokenizer_config\.json|special_tokens_map\.json|added_tokens\.json|chat_template\.jinja|"
    r"chat_template\.json|vocab\.json|vocab\.txt|merges\.txt|tokenizer\.model|spiece\.model|"
    r"adapter_config\.json|adapter_model\.safetensors)")
_KINDS = {"lowbit.json": "lowbit checkpoint", "lowbit_export.json": "lowbit compressed-tensors export",
          "lowbit_train.json": "lowbit trained model"}
_PARTIAL = ".partial-"
_TEMP_FILE = ".tmp"

_umask_lock = threading.Lock()


def umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def give_umask_mode(path: Path) -> None:
    """chmod a path made by mkstemp/mkdtemp (0600/0700) to what a plain create would give:
    0666 or 0777 less the umask (directories: also every folder and file inside, which the
    writers created themselves and so already honour the umask, are left as they are)."""
    full = 0o777 if path.is_dir() else 0o666
    os.chmod(path, full & ~umask())


# -- checks ------------------------------------------------------------------------------------
def _check_name(out: Path) -> None:
    """A name the file system takes, with the temporary prefix and suffix lowbit adds."""
    try:
        limit = os.pathconf(out.parent if out.parent.is_dir() else "/", "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    if len(os.fsencode(f".{out.name}{_PARTIAL}xxxxxxxx")) > limit:
        raise LowbitError(f"output name {out.name[:40]}... is too long for this file system ({len(out.name)} characters)")


def _check_parent(out: Path) -> None:
    """The folder ``out`` goes into exists (or can be made) and takes a new entry there."""
    for p in [out.parent, *out.parent.parents]:
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                raise LowbitError(f"cannot write {out}: {p} is not a directory")
            break
    if out.is_symlink() and not out.exists():
        raise LowbitError(f"output {out} is a broken symbolic link")
    cwd = Path.cwd().resolve()
    res = out.resolve()
    if res == cwd or res in cwd.parents:
        raise LowbitError(f"output {out} is the current directory or holds it; choose another path")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LowbitError(f"cannot create {out.parent}: {e.strerror or e}") from None
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise LowbitError(f"cannot write in {out.parent}: permission denied or read-only file system")


def _same(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def valid_record(path: Path) -> bool:
    """A lowbit record file: a JSON object naming the lowbit version that wrote it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and isinstance(data.get("lowbit_version"), str)


def _in_a_checkpoint(path: Path) -> Path | None:
    """The lowbit checkpoint directory ``path`` lies in (``path`` itself excluded), if any."""
    for p in path.resolve().parents:
        if (p / "lowbit.json").is_file():
            return p
    return None


def check_dir(out: str | os.PathLike, record: str = "lowbit.json", *, force: bool = False,
              inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Refuse an output directory that cannot or must not be written; returns it as a Path.
    ``record`` is the file that marks a replaceable result of this kind; ``inputs`` are paths the
    command reads (never an output)."""
    out = Path(out).expanduser()
    _check_name(out)
    if out.exists() and not out.is_dir():
        raise LowbitError(f"output path {out} exists and is not a directory")
    _check_parent(out)
    for i in inputs:
        i = Path(i).expanduser()
        if _same(out, i) or (i.exists() and _inside(i, out)):
            raise LowbitError(f"output {out} would replace the input {i}")
    home = _in_a_checkpoint(out)
    if home is not None and not force:
        raise LowbitError(f"output {out} is inside the checkpoint {home}; choose a path outside it (or --force)")
    if out.is_dir():
        entries = [p for p in out.iterdir() if not p.name.startswith(".")]
        if entries and not force:
            if not valid_record(out / record):
                what = _KINDS.get(record, "lowbit result")
                raise LowbitError(f"output directory {out} is not empty and is not a {what} (no valid {record}); "
                                  "refusing to replace it (choose another path, or --force)")
            foreign = sorted(p.name for p in entries if not (p.is_file() and _OWN_FILES.fullmatch(p.name)))
            if foreign:
                shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
                raise LowbitError(f"output directory {out} holds files that are not part of a checkpoint ({shown}); "
                                  "refusing to replace it (choose another path, or --force)")
    return out


def check_file(out: str | os.PathLike, magic: bytes | None = None, *, force: bool = False,
               inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Refuse an output file that cannot or must not be written; returns it as a Path. An
    existing file is replaced only if it starts with ``magic`` (the kind being written) and is
    not one of a checkpoint's files; a new file may go anywhere."""
    out = Path(out).expanduser()
    _check_name(out)
    if out.is_dir():
        raise LowbitError(f"output path {out} is a directory")
    _check_parent(out)
    for i in inputs:
        if _same(out, Path(i).expanduser()):
            raise LowbitError(f"output {out} is the input {i}; write to another file")
    if not force and out.exists():
        home = _in_a_checkpoint(out)
        if home is not None:
            raise LowbitError(f"{out} is a file of the checkpoint {home}; refusing to overwrite it "
                              "(choose another path, or --force)")
        if magic is not None:
            try:
                with open(out, "rb") as f:
                    head = f.read(len(magic))
            except OSError as e:
                raise LowbitError(f"cannot read the existing {out}: {e.strerror or e}") from None
            if head != magic:
                raise LowbitError(f"{out} exists and is not a {magic.decode(errors='replace')} file; "
                                  "refusing to overwrite it (choose another path, or --force)")
    return out


# -- locking -----------------------------------------------------------------------------------
_held: dict[str, int] = {}
_held_lock = threading.Lock()


@contextlib.contextmanager
def lock(out: str | os.PathLike) -> Iterator[None]:
    """Hold the write lock of ``out`` (a ``.NAME.lock`` file beside it, removed afterwards).
    Re-entrant within a process; another process gets a one-line error at once. Temporaries
    that a killed run left for ``out`` are removed once the lock is held."""
    import fcntl

    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.parent / f".{out.name}.lock"
    key = str(path.resolve())
    with _held_lock:
        if key in _held:
            _held[key] += 1
            nested = True
        else:
            nested = False
    if nested:
        try:
            yield
        finally:
            with _held_lock:
                _held[key] -= 1
        return
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~umask())
        except OSError as e:
            raise LowbitError(f"cannot write in {out.parent}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise LowbitError(f"another lowbit run is writing {out}; wait for it or choose another output") from None
        try:  # the file we locked must still be the one at the path (a finishing run unlinks it)
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    with _held_lock:
        _held[key] = 1
    try:
        _remove_leftovers(out)
        yield
    finally:
        with _held_lock:
            _held.pop(key, None)
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def _remove_leftovers(out: Path) -> None:
    for p in out.parent.glob(f".{glob_escape(out.name)}.*"):
        if p.name.startswith(f".{out.name}{_PARTIAL}") or p.name.startswith(f".{out.name}.old-") or \
                (p.name.startswith(f".{out.name}.") and p.name.endswith(_TEMP_FILE)):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()


def resume_dir(out: str | os.PathLike) -> Path:
    """Where a long run writing ``out`` keeps its finished work until ``out`` is complete
    (`lowbit.calibration.resume`): ``.NAME.resume`` beside it. Not a leftover: a killed run's
    folder stays for ``--resume``."""
    out = Path(out).expanduser().absolute()
    return out.parent / f".{out.name}.resume"


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


# -- atomic writes -----------------------------------------------------------------------------
def _fsync_tree(path: Path) -> None:
    for p in path.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _swap_in(tmp: Path, out: Path) -> None:
    """Put the finished ``tmp`` at ``out``; a previous ``out`` is removed only once it is replaced."""
    if not out.exists():
        os.replace(tmp, out)
        return
    if _exchange(tmp, out):      # tmp now holds the old result
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink()
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)     # the previous result goes back
        raise
    shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike) -> Iterator[Path]:
    """Build a directory under a temporary name beside ``out`` (holding ``out``'s lock) and swap
    it into place when the block completes (fsynced; umask permissions). If the block raises, the
    partial directory is removed and ``out`` is left as it was."""
    out = Path(out).expanduser()
    with lock(out):
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{_PARTIAL}", dir=out.parent))
        except OSError as e:
            raise LowbitError(f"cannot write in {out.parent}: {e.strerror or e}") from None
        try:
            yield tmp
            _fsync_tree(tmp)
            give_umask_mode(tmp)
            _swap_in(tmp, out)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.ENAMETOOLONG):
                raise LowbitError(f"cannot write {out}: {e.strerror}") from None
            raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


@contextlib.contextmanager
def atomic_file(out: str | os.PathLike) -> Iterator[Path]:
    """A temporary file beside ``out`` (holding ``out``'s lock) for the block to write; fsynced,
    given umask permissions and renamed onto ``out`` when the block completes, removed if it
    raises."""
    out = Path(out).expanduser()
    with lock(out):
        try:
            fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=_TEMP_FILE, dir=out.parent)
        except OSError as e:
            raise LowbitError(f"cannot write in {out.parent}: {e.strerror or e}") from None
        os.close(fd)
        tmp = Path(name)
        try:
            yield tmp
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            give_umask_mode(tmp)
            os.replace(tmp, out)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.ENAMETOOLONG):
                raise LowbitError(f"cannot write {out}: {e.strerror}") from None
            raise
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
