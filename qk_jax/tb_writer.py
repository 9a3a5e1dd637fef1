"""TensorBoard event files in a run folder, local or a URL (`gs://bucket/run/tb`).

tensorboardX writes local folders itself; for a URL it looks its scheme up in a table of
record-writer factories, whose `gs` entry needs `google-cloud-storage`. `summary_writer`
puts an entry for each URL scheme there that writes through `paths` (`etils.epath`), the
layer every other workdir write uses: the event file is buffered and the object rewritten
whole at each flush (an object store cannot append; scalar event files stay small).
"""

from __future__ import annotations

import io

from qk_jax import paths

URL_SCHEMES = ("gs", "s3", "az")


class EpathRecordWriter:
    """A tensorboardX record writer for one event file at a URL."""

    def __init__(self, path: str):
        self.path = path
        self.buffer = io.BytesIO()

    def write(self, data: bytes) -> None:
        self.buffer.write(data)

    def flush(self) -> None:
        paths.write_bytes(self.path, self.buffer.getvalue())

    def close(self) -> None:
        self.flush()


class EpathRecordWriterFactory:
    def open(self, path: str) -> EpathRecordWriter:
        return EpathRecordWriter(path)

    def directory_check(self, path: str) -> None:
        paths.makedirs(path)


def summary_writer(logdir: str, purge_step: int | None = None):
    """A tensorboardX `SummaryWriter` for `logdir` (a local folder or a URL)."""
    from tensorboardX import SummaryWriter, record_writer

    for scheme in URL_SCHEMES:
        record_writer.register_writer_factory(scheme, EpathRecordWriterFactory())
    return SummaryWriter(logdir, purge_step=purge_step)
