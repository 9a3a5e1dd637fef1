"""Run folders as local paths or URLs (`gs://bucket/run`): every workdir operation of the tools
(checkpoints, metrics, TensorBoard, processor, surgery and sampling outputs) goes through here,
on `etils.epath`, so a pod run writes to a bucket as a workstation run writes to a disk.

A URL is never handed to `os.path` / `open` / `shutil` (`os.path.join("gs://b", "x")` still
reads as a URL, but `os.makedirs` on it creates a local folder named `gs:`). Local paths keep
their local behaviour: appends append, renames are atomic. Object stores have neither, so for
a URL an append rewrites the object and a folder move copies its entries, the named `last`
ones last (a reader that checks for them sees a complete folder).

Libraries that read only local files (the tokenizer) get a local copy (`local_folder`); tools
that write only local files (the profiler) write to a local folder that is copied in
(`upload_folder`).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import uuid

from etils import epath


def is_url(path: str | os.PathLike) -> bool:
    """Whether `path` names a remote location (`gs://...`) rather than a local file."""
    return "://" in os.fspath(path)


def path(p: str | os.PathLike) -> epath.Path:
    return epath.Path(os.fspath(p))


def join(base: str | os.PathLike, *parts: str) -> str:
    """`os.path.join` for local paths and URLs alike."""
    return os.fspath(path(base).joinpath(*parts))


def normalize(p: str | os.PathLike) -> str:
    """`p` without a trailing slash or `.` parts (a URL keeps its `//`)."""
    return os.fspath(path(p)) if is_url(p) else os.path.normpath(os.fspath(p))


def dirname(p: str | os.PathLike) -> str:
    return os.fspath(path(normalize(p)).parent)


def parent_folder(p: str | os.PathLike) -> str:
    """The folder that the file `p` lands in (a relative local path taken from the working
    directory, so that `out.png` gives the working directory, not '')."""
    return dirname(p if is_url(p) else os.path.abspath(os.fspath(p)))


def basename(p: str | os.PathLike) -> str:
    return path(normalize(p)).name


def exists(p: str | os.PathLike) -> bool:
    return path(p).exists()


def isdir(p: str | os.PathLike) -> bool:
    return path(p).is_dir()


def isfile(p: str | os.PathLike) -> bool:
    q = path(p)
    return q.exists() and not q.is_dir()


def listdir(p: str | os.PathLike) -> list[str]:
    return sorted(c.name for c in path(p).iterdir())


def makedirs(p: str | os.PathLike) -> None:
    path(p).mkdir(parents=True, exist_ok=True)


def prove_writable(folder: str | os.PathLike) -> None:
    """Creates `folder` and writes and removes a probe file in it, so that a read-only, full or
    forbidden location fails before any work; raises the OSError of the step that failed. (On an
    object store a folder is only a name: only a write proves it.)"""
    makedirs(folder)
    probe = join(folder, f".write_test_{uuid.uuid4().hex}")
    write_text(probe, "ok")
    remove(probe)


class WorkdirError(OSError):
    """A workdir that cannot be created or written (the message names it)."""


def check_workdir(workdir: str | os.PathLike) -> None:
    """Creates the workdir and proves it writable, or raises WorkdirError naming it."""
    try:
        makedirs(workdir)
    except OSError as e:
        raise WorkdirError(f"workdir {workdir} cannot be created: {e.strerror or e}") from None
    try:
        prove_writable(workdir)
    except OSError as e:
        raise WorkdirError(f"workdir {workdir} is not writable: {e.strerror or e}") from None


class OutputError(OSError):
    """An output file that cannot be written (the message names its flag, path and the cause)."""


def check_output_file(p: str | os.PathLike, flag: str = "--out") -> None:
    """Creates the folder of the output file `p` and proves it writable before the work that
    produces the file, or raises OutputError naming `flag` (a read-only or full location, or a
    file where a folder should be, fails now rather than after the work)."""
    try:
        prove_writable(parent_folder(p))
    except OSError as e:
        raise OutputError(f"{flag} {p} cannot be written: {e.strerror or e}") from None


def read_text(p: str | os.PathLike) -> str:
    return path(p).read_text()


def write_text(p: str | os.PathLike, text: str) -> None:
    """Writes `text` to the file `p` (its folder created)."""
    q = path(p)
    q.parent.mkdir(parents=True, exist_ok=True)
    q.write_text(text)


def write_bytes(p: str | os.PathLike, data: bytes) -> None:
    q = path(p)
    q.parent.mkdir(parents=True, exist_ok=True)
    q.write_bytes(data)


def append_text(p: str | os.PathLike, text: str) -> None:
    """Appends `text` to the file `p`; an object store cannot append, so a URL's object is
    rewritten whole (metrics files are small)."""
    if not is_url(p):
        with open(p, "a") as f:
            f.write(text)
        return
    q = path(p)
    write_text(q, (q.read_text() if q.exists() else "") + text)


def remove(p: str | os.PathLike) -> None:
    path(p).unlink(missing_ok=True)


def rmtree(p: str | os.PathLike) -> None:
    path(p).rmtree(missing_ok=True)


def replace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Moves the file `src` over `dst` (atomic on a local disk)."""
    path(src).replace(path(dst))


def move_folder(src: str | os.PathLike, dst: str | os.PathLike, last: tuple[str, ...] = ()) -> None:
    """Moves the folder `src` to `dst` (absent or empty): one atomic rename on a local disk; for a
    URL entry by entry, the entries named in `last` after all others."""
    if not is_url(src) and not is_url(dst):
        os.replace(src, dst)
        return
    s, d = path(src), path(dst)
    d.mkdir(parents=True, exist_ok=True)
    children = sorted(s.iterdir(), key=lambda c: (c.name in last, last.index(c.name) if c.name in last else 0))
    for child in children:
        child.replace(d / child.name)
    s.rmtree(missing_ok=True)


def copy_folder(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copies the folder `src` into `dst` (merged; files overwritten), local or URL on either side."""
    s, d = path(src), path(dst)
    if not is_url(src) and not is_url(dst):
        shutil.copytree(s, d, dirs_exist_ok=True)
        return
    d.mkdir(parents=True, exist_ok=True)
    for child in s.iterdir():
        if child.is_dir():
            copy_folder(child, d / child.name)
        else:
            child.copy(d / child.name, overwrite=True)


_LOCAL_COPIES: dict[str, str] = {}


def local_folder(p: str | os.PathLike) -> str:
    """`p` itself when local; for a URL, a local copy of the folder (made once per process,
    removed at exit), for libraries that read local files only (e.g. a HF tokenizer)."""
    text = os.fspath(p)
    if not is_url(text):
        return text
    if text not in _LOCAL_COPIES:
        local = tempfile.mkdtemp(prefix="qk_jax_")
        atexit.register(shutil.rmtree, local, True)
        copy_folder(text, local)
        _LOCAL_COPIES[text] = local
    return _LOCAL_COPIES[text]


def upload_folder(local: str, dst: str | os.PathLike) -> None:
    """Copies the local folder `local` into `dst` (a URL or a local path)."""
    copy_folder(local, dst)
