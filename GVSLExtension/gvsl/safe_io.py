"""Nothing lost, nothing half-written: one writer per run folder, results staged under
temporary names, read back, then renamed; strict JSON.

* :class:`RunLock`: ``FOLDER/gvsl.lock`` names its owner (command, pid, host, start
  time). The operating system's lock on that file (``flock``; a byte-range lock on
  Windows) is what decides, so a crashed owner never blocks anyone: its lock dies with its
  process and the next run takes the folder over with a note.
* :class:`StagedFiles`: every file of a result is written to ``.gvsl-tmp-*`` beside its
  final name, read back and compared with what was meant to be written (SimpleITK's NIfTI
  writer only *prints* a warning on a full disk), and only when all of them are complete
  are they renamed, in order, over the final names. A failure leaves the folder as it was.
* :func:`strict_json`: ``allow_nan=False``, with the offending keys named.
"""
from __future__ import annotations

import errno
import json
import math
import os
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import numpy as np

LOCK_NAME = "gvsl.lock"
TEMP_PREFIX = ".gvsl-tmp-"


class ResultWriteError(OSError):
    """A result file that could not be written completely; the message names it and why."""

    def __str__(self):  # OSError's default would print "[Errno ...]" before our sentence
        return self.args[0] if self.args else "write failed"


class RunLockedError(RuntimeError):
    """Another live process owns the folder."""


class NonFiniteError(ValueError):
    """A value that must be finite (a result, a JSON number) is NaN or infinite."""


# ------------------------------------------------------------------ messages


def _free_space(folder) -> str:
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "unknown"
    return f"{free / 1e6:.1f} MB" if free >= 1e5 else f"{free} bytes"


def _incomplete_reason(folder) -> str:
    """Why a file came out shorter than written, when the writer did not say."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = 0
    if free < 16 << 20:
        return f"the disk is full ({_free_space(folder)} free in {folder})"
    return f"the write stopped early; {_free_space(folder)} free in {folder}"


def interrupted_by_user(exc: BaseException) -> bool:
    """True when ``exc`` is what a Ctrl-C turned into inside a writer: torch's zip writer,
    interrupted in its Python write callback, raises "unexpected pos" with the
    KeyboardInterrupt as its context."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, KeyboardInterrupt):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def write_failure_reason(exc: BaseException, folder) -> str:
    """What went wrong in plain words (not a torch or ITK internal)."""
    text = str(exc)
    errno_value = getattr(exc, "errno", None)
    if errno_value == errno.ENOSPC or "No space left" in text:
        return f"the disk is full ({_free_space(folder)} free in {folder})"
    if "unexpected pos" in text or "wrote only" in text or "fwrite" in text:
        # A short write without a reason: a full disk only if the disk is (nearly) full.
        return _incomplete_reason(folder)
    if errno_value in (errno.EROFS,) or "Read-only file system" in text:
        return f"{folder} is on a read-only file system"
    if errno_value in (errno.EACCES, errno.EPERM) or "Permission denied" in text:
        return f"no permission to write in {folder}"
    first = text.strip().splitlines()[-1] if text.strip() else type(exc).__name__
    return first[:200]


def check_writable_folder(folder, option: str = "--out") -> Path:
    """Create ``folder`` if needed and prove a file can be written there, before any work."""
    folder = Path(folder)
    probe = folder / f"{TEMP_PREFIX}probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as handle:
            handle.write(b"gvsl")
            handle.flush()
            os.fsync(handle.fileno())
        probe.unlink()
    except FileExistsError:
        raise ResultWriteError(f"{folder}: exists and is not a folder; choose another {option}") from None
    except OSError as exc:
        try:  # a full disk creates the (empty) probe and then refuses its bytes: leave nothing behind
            probe.unlink()
        except OSError:
            pass
        raise ResultWriteError(f"{folder}: cannot write there ({write_failure_reason(exc, folder)}); "
                               f"choose another {option}") from None
    return folder


# --------------------------------------------------------------------- JSON


def non_finite_paths(obj, prefix: str = "") -> List[str]:
    """Where NaN or infinity hides in a JSON-like object (``key[0].sub``)."""
    found = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            found += non_finite_paths(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            found += non_finite_paths(v, f"{prefix}[{i}]")
    elif isinstance(obj, (float, np.floating)) and not math.isfinite(float(obj)):
        found.append(prefix or "<value>")
    return found


def finite_or_none(obj):
    """NaN and infinity replaced by ``None`` (JSON null) where "no value" is the truth."""
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    if isinstance(obj, (float, np.floating)) and not math.isfinite(float(obj)):
        return None
    return obj


def strict_json(obj, what: str, **dump_options) -> str:
    """``json.dumps`` that refuses NaN and infinity (which no JSON reader accepts)."""
    bad = non_finite_paths(obj)
    if bad:
        raise NonFiniteError(f"{what}: non-finite values at {', '.join(bad[:5])}"
                             f"{' and more' if len(bad) > 5 else ''}; nothing was written")
    return json.dumps(obj, allow_nan=False, default=float, **dump_options)


# ------------------------------------------------------------ staged writes


# gzip level 1: ITK's NIfTI writer ignores SimpleITK's compression level and always deflates at
# the default level, 4.5x slower than level 1 for files about 25 % smaller (measured on a
# 256 x 256 x 300 float32 volume: 4.9 s against 1.1 s).
NIFTI_GZIP_LEVEL = 1


def write_nifti_gz(image, path: Path, level: int = NIFTI_GZIP_LEVEL, threads: Optional[int] = None):
    """Write ``image`` as a gzip NIfTI at ``path`` (any name): ITK writes the plain NIfTI
    beside it, which is then deflated at ``level`` on ``threads`` cores (default: all) and
    removed."""
    import SimpleITK as sitk
    path = Path(path)
    plain = path.with_name(path.name + ".plain.nii")
    try:
        sitk.WriteImage(image, str(plain))
        with open(plain, "rb") as source, open(path, "wb") as target:
            gzip_parallel(source, target, level, threads)
    finally:
        plain.unlink(missing_ok=True)


GZIP_CHUNK_BYTES = 1 << 22
_DEFLATE_WINDOW = 1 << 15


def gzip_parallel(source, target, level: int = NIFTI_GZIP_LEVEL, threads: Optional[int] = None):
    """Deflate the binary file ``source`` into ``target`` as one gzip member (RFC 1952),
    compressing 4 MiB chunks on ``threads`` threads (zlib releases the GIL), as pigz does:
    each chunk is a raw deflate stream primed with the 32 KiB before it and ended by a sync
    flush (the last by a final block), so the chunks join into one stream that any gunzip,
    ITK and nibabel read, and the trailer holds the CRC-32 and length of the whole file.
    A 0.6 GB float32 volume: 2 cores take about half the time of Python's gzip module."""
    import struct
    import zlib
    from concurrent.futures import ThreadPoolExecutor

    workers = max(1, min(int(threads or os.cpu_count() or 1), 16))

    def deflate(chunk: bytes, primer: bytes, last: bool) -> bytes:
        compressor = zlib.compressobj(level, zlib.DEFLATED, -15, 9, zlib.Z_DEFAULT_STRATEGY,
                                      **({"zdict": primer} if primer else {}))
        return compressor.compress(chunk) + compressor.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)

    # mtime 0 keeps the file reproducible; XFL 4 = fastest, 2 = best; OS 255 = unknown.
    target.write(b"\x1f\x8b\x08\x00" + struct.pack("<I", 0) + (b"\x04" if level <= 1 else b"\x00") + b"\xff")
    crc, length, primer = 0, 0, b""
    pending = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        chunk = source.read(GZIP_CHUNK_BYTES)
        while True:
            following = source.read(GZIP_CHUNK_BYTES) if chunk else b""
            last = not following
            crc = zlib.crc32(chunk, crc)
            length += len(chunk)
            pending.append(pool.submit(deflate, chunk, primer, last))
            # A bounded window: memory stays a few chunks, not the file.
            while len(pending) > 2 * workers or (last and pending):
                target.write(pending.pop(0).result())
            if last:
                break
            primer = chunk[-_DEFLATE_WINDOW:]
            chunk = following
    target.write(struct.pack("<II", crc & 0xFFFFFFFF, length & 0xFFFFFFFF))


def _fsync_file(path):
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _fsync_folder(folder):
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temporaries(folder, patterns=(f"{TEMP_PREFIX}*",), log=None) -> int:
    """Delete what an interrupted write left behind (call only while holding the folder's
    lock, or another writer's file in progress could go)."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    removed, size = 0, 0
    for pattern in patterns:
        for path in folder.glob(pattern):
            try:
                size += path.stat().st_size
                path.unlink()
                removed += 1
            except OSError:
                pass
    if removed and log:
        log(f"removed {removed} temporary file(s) ({size / 1e6:.1f} MB) that an interrupted write left in {folder}")
    return removed


class StagedFiles:
    """``with StagedFiles(folder) as stage: stage.write_image("warped.nii.gz", image) ...``:
    each file goes to a temporary name and is read back; the renames happen at the end of
    the block, in the order written, only if every write succeeded."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.staged: List[Tuple[Path, Path]] = []  # (temporary, final)
        self._token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> "StagedFiles":
        self.folder.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            try:
                self.commit()
            except BaseException:
                self.discard()
                raise
        else:
            self.discard()
        return False

    def temporary(self, name: str) -> Path:
        # The final suffix (.nii.gz, .png, ...) is kept: writers choose the format by it.
        return self.folder / f"{TEMP_PREFIX}{self._token}-{name}"

    def _stage(self, name: str, write: Callable[[Path], None], verify: Optional[Callable[[Path], None]]) -> Path:
        final = self.folder / name
        tmp = self.temporary(name)
        self.staged.append((tmp, final))
        try:
            write(tmp)
            if not tmp.exists():
                raise ResultWriteError(f"{final}: the writer produced no file")
            _fsync_file(tmp)
            if verify is not None:
                verify(tmp)
        except (ResultWriteError, NonFiniteError):
            raise
        except (OSError, RuntimeError, ValueError) as exc:
            if interrupted_by_user(exc):
                raise KeyboardInterrupt from None
            raise ResultWriteError(f"{final}: not written ({write_failure_reason(exc, self.folder)}); "
                                   f"the folder keeps its previous files") from None
        return final

    def write_bytes(self, name: str, data: bytes) -> Path:
        def write(tmp):
            with open(tmp, "wb") as handle:
                handle.write(data)

        def verify(tmp):
            if tmp.read_bytes() != data:
                raise ResultWriteError(f"{self.folder / name}: incomplete on disk "
                                       f"({_incomplete_reason(self.folder)})")
        return self._stage(name, write, verify)

    def write_text(self, name: str, text: str) -> Path:
        return self.write_bytes(name, text.encode("utf-8"))

    def write_json(self, name: str, obj, indent: int = 2) -> Path:
        return self.write_text(name, strict_json(obj, str(self.folder / name), indent=indent))

    def write_image(self, name: str, image) -> Path:
        import SimpleITK as sitk
        expected = sitk.GetArrayViewFromImage(image)
        if np.issubdtype(expected.dtype, np.floating) and not np.isfinite(expected).all():
            bad = int((~np.isfinite(expected)).sum())
            raise NonFiniteError(f"{self.folder / name}: {bad} voxels are NaN or infinite; nothing was written")

        def verify(tmp):
            # SimpleITK's NIfTI writer reports a short write only as a printed warning, and a
            # truncated .nii.gz reads back with zeros: NIfTI files are checked against their
            # header (cheap: the gzip trailer), other formats are read back and compared.
            from .data import NIFTI_SUFFIXES, nifti_shortfall
            if name.lower().endswith(NIFTI_SUFFIXES):
                complete = nifti_shortfall(str(tmp), require_header=True) is None
            else:
                try:
                    back = sitk.ReadImage(str(tmp))
                    complete = back.GetSize() == image.GetSize() and \
                        np.array_equal(sitk.GetArrayViewFromImage(back), expected)
                except RuntimeError:
                    complete = False
            if not complete:
                raise ResultWriteError(f"{self.folder / name}: the file on disk is incomplete "
                                       f"({_incomplete_reason(self.folder)})")
        if name.lower().endswith(".nii.gz"):
            return self._stage(name, lambda tmp: write_nifti_gz(image, tmp), verify)
        return self._stage(name, lambda tmp: sitk.WriteImage(image, str(tmp)), verify)

    def write_transform(self, name: str, transform) -> Path:
        import SimpleITK as sitk
        parameters = np.asarray(transform.GetParameters(), dtype=float)
        if not np.isfinite(parameters).all():
            raise NonFiniteError(f"{self.folder / name}: the transform holds NaN or infinite parameters; "
                                 f"nothing was written")

        def verify(tmp):
            try:
                back = np.asarray(sitk.ReadTransform(str(tmp)).GetParameters(), dtype=float)
            except RuntimeError:
                back = np.empty(0)
            if back.shape != parameters.shape or not np.allclose(back, parameters, rtol=1e-12, atol=1e-12):
                raise ResultWriteError(f"{self.folder / name}: the file on disk is incomplete "
                                       f"({_incomplete_reason(self.folder)})")
        return self._stage(name, lambda tmp: sitk.WriteTransform(transform, str(tmp)), verify)

    def write_with(self, name: str, write: Callable[[Path], None],
                   verify: Optional[Callable[[Path], None]] = None) -> Path:
        """Any writer that takes a path (matplotlib, numpy); ``verify(tmp)`` should raise if
        the file is not what was meant. Python writers raise on a full disk themselves."""
        def nonempty_then(tmp):
            if tmp.stat().st_size == 0:
                raise ResultWriteError(f"{self.folder / name}: the writer produced an empty file")
            if verify is not None:
                verify(tmp)
        return self._stage(name, write, nonempty_then)

    def commit(self):
        for tmp, final in self.staged:
            os.replace(tmp, final)
        _fsync_folder(self.folder)
        self.staged = []

    def discard(self):
        for tmp, _final in self.staged:
            try:
                tmp.unlink()
            except OSError:
                pass
        self.staged = []


def write_json_atomic(path, obj, indent: int = 2) -> Path:
    path = Path(path)
    with StagedFiles(path.parent) as stage:
        stage.write_json(path.name, obj, indent=indent)
    return path


# -------------------------------------------------------------------- locks


def _describe_owner(text: str) -> str:
    try:
        owner = json.loads(text)
        return (f"{owner.get('command', 'gvsl')} (pid {owner.get('pid')} on host {owner.get('host')}, "
                f"started {owner.get('started')})")
    except (ValueError, AttributeError):
        return "another process (its lock file is unreadable)"


class RunLock:
    """Exclusive ownership of a folder for one run: ``with RunLock(folder, "gvsl pretrain"):``.

    A second writer gets :class:`RunLockedError` naming the owner. A lock file left by a
    process that died is taken over, with a note through ``log``."""

    def __init__(self, folder, command: str, log: Optional[Callable[[str], None]] = None, enabled: bool = True):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.command = command
        self.log = log or (lambda message: None)
        self.enabled = enabled
        self._fd = None
        self._created_folder = False

    # The operating-system lock: released by the kernel when the owner exits in any way.
    @staticmethod
    def _try_os_lock(fd) -> bool:
        try:
            import fcntl
        except ImportError:  # Windows: lock one byte far past the owner text, which stays readable
            import msvcrt
            os.lseek(fd, 1 << 20, os.SEEK_SET)
            try:
                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            except OSError:
                return False
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                return False
            raise
        return True

    @staticmethod
    def _read(fd) -> str:
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, 4096).decode("utf-8", "replace")

    def acquire(self) -> "RunLock":
        if not self.enabled:
            return self
        self._created_folder = not self.folder.exists()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ResultWriteError(f"{self.folder}: cannot create the folder "
                                   f"({write_failure_reason(exc, self.folder.parent)}); choose another --out") from None
        for _attempt in range(100):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise ResultWriteError(f"{self.folder}: cannot write there ({write_failure_reason(exc, self.folder)}); "
                                       f"choose another --out") from None
            if not self._try_os_lock(fd):
                owner = _describe_owner(self._read(fd))
                os.close(fd)
                raise RunLockedError(f"{self.folder}: in use by {owner}; wait for it to finish (or stop it), "
                                     f"or choose another --out")
            try:
                same_file = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same_file = False
            if not same_file:  # the previous owner removed the file between our open and lock
                os.close(fd)
                continue
            self._fd = fd
            break
        else:
            raise RunLockedError(f"{self.folder}: could not take {LOCK_NAME} (it keeps changing)")
        previous = self._read(self._fd).strip()
        if previous:
            self.log(f"took over {self.path}: its owner {_describe_owner(previous)} is no longer running")
        record = {"command": self.command, "pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())}
        try:
            os.lseek(self._fd, 0, os.SEEK_SET)
            os.ftruncate(self._fd, 0)
            os.write(self._fd, (json.dumps(record) + "\n").encode("utf-8"))
            os.fsync(self._fd)
        except OSError as exc:  # e.g. a disk already full: the lock file exists, its owner text does not
            self.release()
            raise ResultWriteError(f"{self.folder}: cannot write there ({write_failure_reason(exc, self.folder)}); "
                                   f"choose another --out") from None
        return self

    def release(self):
        if self._fd is None:
            return
        try:
            if os.name == "posix":
                os.unlink(self.path)  # while still locked: nobody can take a file we are deleting
            os.close(self._fd)
            if os.name != "posix":
                os.unlink(self.path)
        except OSError:
            pass
        self._fd = None
        if self._created_folder:
            try:
                self.folder.rmdir()  # only if the refused or failed run left it empty
            except OSError:
                pass

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False
