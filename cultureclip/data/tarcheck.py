"""Read the members of one tar shard and check that the archive really ended.

Python's ``tarfile`` ends iteration quietly when a stream stops at a member boundary, inside a header
block, or at an unreadable header after the first member, so a shard copied half-way reads as a
shorter, valid one. Every tar writer we know (``tarfile``, webdataset's ``TarWriter``, GNU tar) ends
an archive with two zero blocks of 512 bytes, so :func:`shard_files` checks that they are there once
the last member is read. It works on the stream (after any decompression), so local files, ``pipe:``
commands and URLs opened by ``webdataset.gopen`` all get the same check.
"""
from __future__ import annotations

import contextlib
import re
import tarfile
from typing import Iterator, Optional

import webdataset as wds

BLOCK = 512  # tar block size
_SKIP_META = re.compile(r"__[^/]*__($|/)")  # webdataset's own metadata members (tar_file_iterator skips them too)
_DRAIN_CHUNK = 1 << 16


class ShardDamage(ValueError):
    """A shard that cannot be read to its end; ``reason`` is a skip reason, ``url`` names the shard.

    The message is one line naming the shard, for ``on_error="raise"``. Build one with
    :meth:`of`; the plain one-message constructor is what a DataLoader uses to re-raise it from a
    worker with its type kept.
    """

    url: Optional[str] = None
    reason: Optional[str] = None
    detail: str = ""

    @classmethod
    def of(cls, url: str, reason: str, detail: str) -> "ShardDamage":
        exn = cls(f"shard {url}: {detail}")
        exn.url, exn.reason, exn.detail = url, reason, detail
        return exn


class _WatchedTarInfo(tarfile.TarInfo):
    """Remembers on the TarFile why the last header read failed: ``tarfile`` swallows the error after
    the first member and ends iteration, whatever the cause."""

    @classmethod
    def fromtarfile(cls, tarfile_):
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.HeaderError as exn:
            if not isinstance(exn, tarfile.SubsequentHeaderError):  # keep the cause under a pax header
                tarfile_.end_error = exn
            raise


class _CheckedTarFile(tarfile.TarFile):
    tarinfo = _WatchedTarInfo
    end_error: Optional[Exception] = None


# tarfile's messages for a stream that stops before the first header is whole (the TarFile is never
# returned then, so its recorded header error cannot be read)
_CUT_AT_OPEN = ("empty file", "empty header", "truncated header", "unexpected end of data")


def _stream_ended(exn: BaseException, tf: Optional[_CheckedTarFile]) -> bool:
    """Whether a read error means the stream stopped early (rather than bytes being wrong)."""
    if isinstance(exn, EOFError):  # a compressed stream cut short
        return True
    if not isinstance(exn, tarfile.ReadError):
        return False
    if tf is None:
        return str(exn) in _CUT_AT_OPEN
    cut_header = isinstance(tf.end_error, (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError))
    return "unexpected end of data" in str(exn) or cut_header


def _check_end(tf: _CheckedTarFile, url: str, truncated: str, damaged: str) -> None:
    """Raise :class:`ShardDamage` unless the iteration stopped at two zero blocks."""
    err, at = tf.end_error, tf.offset
    if isinstance(err, tarfile.EOFHeaderError):  # one zero block read; the marker needs a second one
        second = tf.fileobj.read(BLOCK)
        if second == tarfile.NUL * BLOCK:
            return
        if len(second) < BLOCK:
            raise ShardDamage.of(url, truncated, f"cut short: the stream ends at byte {at + BLOCK + len(second)} "
                                                 f"after one zero block, without the two that end a tar archive")
        raise ShardDamage.of(url, damaged, f"a lone zero block at byte {at} is followed by more data, which "
                                           f"tar readers would drop")
    if isinstance(err, tarfile.EmptyHeaderError):
        raise ShardDamage.of(url, truncated, f"cut short: the stream ends at byte {at}, after a member, "
                                             f"without the two zero blocks that end a tar archive")
    if isinstance(err, tarfile.TruncatedHeaderError):
        raise ShardDamage.of(url, truncated, f"cut short: the stream ends inside the header block at byte {at}")
    raise ShardDamage.of(url, damaged, f"unreadable tar header at byte {at} ({err}); the rest of the shard is lost")


def shard_files(url: str, truncated: str, damaged: str) -> Iterator[dict]:
    """The regular members of one shard as webdataset file dicts ``{"fname", "data", "__url__"}``.

    Opens ``url`` with ``webdataset.gopen`` (files, ``pipe:``, URLs), reads it as a tar stream
    (compressed ones too), skips webdataset's ``__*__`` metadata members as ``tar_file_iterator``
    does, and after the last member checks the end-of-archive marker.

    Args:
        url: the shard.
        truncated, damaged: the skip reasons to put on :class:`ShardDamage` for a stream that stops
            early and for any other read error.

    Raises:
        ShardDamage: the shard does not open as a tar, a read fails, or the stream ends without the
            two zero blocks (cut at a member boundary, inside a header or inside a member's data).
    """
    tf: Optional[_CheckedTarFile] = None
    stream = None
    try:
        stream = wds.gopen(url)
        tf = _CheckedTarFile.open(fileobj=stream, mode="r|*")
        for info in tf:
            if not info.isreg() or _SKIP_META.match(info.name):
                continue
            data = tf.extractfile(info).read()
            yield {"fname": info.name, "data": data, "__url__": url}
            tf.members = []  # a stream reader needs no member list; it would grow with the shard
        _check_end(tf, url, truncated, damaged)
        while stream.read(_DRAIN_CHUNK):  # the record padding: a pipe's writer then exits cleanly
            pass
        stream, opened = None, stream
        opened.close()  # a pipe command that failed raises here
    except ShardDamage:
        raise
    except Exception as exn:  # anything a stream or tarfile raises is damage to this shard
        if _stream_ended(exn, tf):
            where = f"after byte {tf.offset}" if tf is not None else "before its first member"
            raise ShardDamage.of(url, truncated, f"cut short {where}: {exn}") from exn
        raise ShardDamage.of(url, damaged, f"damaged, skipped the rest of it: {exn!r}") from exn
    finally:
        if stream is not None:  # damaged, or the reader stopped early: the shard's outcome is already decided
            proc = getattr(stream, "proc", None)  # a ``pipe:`` command: its output is no longer wanted, and
            if proc is not None:  # closing waits for it to exit (a stalled source would hold a SIGTERM up)
                with contextlib.suppress(Exception):
                    proc.kill()
            with contextlib.suppress(Exception):
                stream.close()
