"""A `gs://` file system for tests: `etils.epath` paths under `gs://` read and write a local
folder (`install`), so the tools run against a URL workdir without a bucket.

Orbax writes array data with TensorStore, whose own GCS driver this does not reach: the
Checkpointer is given the local folder behind the URL instead (`install` patches
`checkpoint.absolute_path`), so checkpoints land where the URL points while every other
workdir operation goes through epath's `gs://` backend.
"""

from __future__ import annotations

import os

from etils.epath import backend as epath_backend
from etils.epath import gpath

from qk_jax import checkpoint as ckpt_lib
from qk_jax import paths

PREFIX = "gs://"


class MappedBackend(epath_backend._OsPathBackend):  # noqa: SLF001 - the os backend, with paths translated
    """`gs://bucket/x` <-> `<root>/bucket/x`; counts the calls it served (`calls`)."""

    def __init__(self, root: str):
        self.root = root
        self.calls = 0

    def local(self, p) -> str:
        """The local file behind a gs:// URL; a local path (the os backend's methods call each
        other with translated paths; a copy may have a local side) is kept."""
        text = os.fspath(p)
        if not text.startswith(PREFIX):
            return text
        self.calls += 1
        return os.path.join(self.root, text[len(PREFIX) :])

    def url(self, p: str) -> str:
        return PREFIX + os.path.relpath(p, self.root)

    def open(self, path, mode):
        if any(m in mode for m in "wa"):
            os.makedirs(os.path.dirname(self.local(path)), exist_ok=True)
        return super().open(self.local(path), mode)

    def exists(self, path):
        return super().exists(self.local(path))

    def isdir(self, path):
        return super().isdir(self.local(path))

    def listdir(self, path):
        return super().listdir(self.local(path))

    def glob(self, path):
        return [self.url(p) for p in super().glob(self.local(path))]

    def walk(self, top, *, top_down=True, on_error=None):
        for d, dirs, files in super().walk(self.local(top), top_down=top_down, on_error=on_error):
            yield self.url(d), dirs, files

    def makedirs(self, path, *, exist_ok=False, mode=None):
        return super().makedirs(self.local(path), exist_ok=exist_ok)

    def mkdir(self, path, *, exist_ok=False, mode=None):
        return super().mkdir(self.local(path), exist_ok=exist_ok)

    def rmtree(self, path):
        return super().rmtree(self.local(path))

    def remove(self, path):
        return super().remove(self.local(path))

    def rename(self, path, dst):
        return super().rename(self.local(path), self.local(dst))

    def replace(self, path, dst):
        return super().replace(self.local(path), self.local(dst))

    def copy(self, path, dst, *, overwrite):
        return super().copy(self.local(path), self.local(dst), overwrite=overwrite)

    def stat(self, path):
        return super().stat(self.local(path))


def install(monkeypatch, root: str) -> MappedBackend:
    """Maps gs:// onto the folder `root` for the test's duration; returns the backend."""
    backend = MappedBackend(root)
    monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, "gs", backend)  # noqa: SLF001
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)  # noqa: SLF001 - epath would pick TF's gfile
    # a copy or move between a local path and gs:// is served by the gs:// backend (as by the real one)
    monkeypatch.setattr(gpath, "_GCS_BACKENDS", gpath._GCS_BACKENDS | {backend})  # noqa: SLF001
    monkeypatch.setattr(paths, "_LOCAL_COPIES", {})
    original = ckpt_lib.absolute_path

    def absolute_path(directory):
        text = os.fspath(directory)
        return original(backend.local(text) if text.startswith(PREFIX) else text)

    monkeypatch.setattr(ckpt_lib, "absolute_path", absolute_path)
    return backend
