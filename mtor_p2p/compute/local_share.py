"""Operands handed to a worker on the same machine through sealed shared memory.

Over a lane, a 256 MiB operand costs both ends far more than the product it feeds on a
2-core machine: the requester seals and sends it, the worker opens it and stores it into
fresh pages (about 0.7 ms per MiB of page faults on the project's VM), once per worker. When
requester and worker run on one machine as one user (the benchmarks' local workers, several
workers on one multi-GPU box), the requester instead copies the operand once into a sealed
``memfd`` and names it in a request on the authenticated channel: the worker opens it
through ``/proc/<pid>/fd/<fd>``, maps it read-only and hashes it, and holds it as it would an
upload. Every local worker of a job maps the same pages.

What holds it safe (see ``docs/threat-model.md``):

* The request names the operand's content hash, and the worker hashes what it mapped: it
  holds exactly the bytes the authenticated requester described, or refuses them. Nothing
  crosses a network; only a process of the same user (which can already read both peers'
  memory) can open the descriptor.
* The worker maps only a memfd sealed against writing, shrinking and growing, so that its
  bytes cannot change after they are hashed and a read of the mapping cannot fault
  (``SIGBUS``) on a truncated file. It refuses anything else: a descriptor that is not a
  regular file (checked before opening, so that no device is opened; opened non-blocking, so
  that a FIFO swapped in meanwhile cannot hold it), a file or a process of another user, a
  size that is not the operand's. Running as root changes none of this: the process and the
  file must still be root's, and a sealed memfd that hashes to the announced content tells
  the requester nothing it did not know.
* Only when both peers say they are on one machine: the requester when its lane to the
  worker is on a loopback address, the worker when the request's host token (boot ID and PID
  namespace) is its own. Anything else falls back to the upload in chunks.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import stat
from dataclasses import dataclass, field

import numpy as np
import trio

from mtor_p2p.records.arrays import ArrayMeta
from mtor_p2p.runtime import BlockingRunner

log = logging.getLogger(__name__)

#: Operands at least this large go through shared memory when they can (smaller ones are one
#: message on the lane: cheaper than a descriptor's round of system calls).
MIN_LOCAL_BYTES = 8 << 20
#: Bytes the requester keeps in sealed copies at once (beside its own operands); an operand
#: that does not fit is uploaded in chunks.
MAX_SHARED_BYTES = 2 << 30
#: The seals a shared operand must carry: no write, no shrinking, no growing.
REQUIRED_SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
#: How a worker refuses an operand it cannot take from shared memory (not a fault: the
#: requester uploads it in chunks, and stops asking that worker).
NOT_LOCAL = "not local: "


class LocalShareError(Exception):
    """A shared operand that cannot be used; ``str(exc)`` says why."""


def _read_host_token() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot = f.read().strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None
    if not hasattr(os, "memfd_create"):
        return None
    return f"{boot}/{namespace}"


#: This machine and PID namespace, as the peers compare it (None: no shared memory here).
HOST_TOKEN = _read_host_token()


def usable() -> bool:
    """Whether this process can share operands (Linux, with memfds)."""
    return HOST_TOKEN is not None


def sealed_copy(data: memoryview) -> int:
    """A new memfd holding ``data``, sealed (a blocking call: one copy of ``data``)."""
    fd = os.memfd_create("mtor-operand", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, len(data))
        offset = 0
        while offset < len(data):
            offset += os.pwrite(fd, data[offset : offset + (16 << 20)], offset)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, REQUIRED_SEALS | fcntl.F_SEAL_SEAL)
    except BaseException:
        os.close(fd)
        raise
    return fd


def map_shared(pid: int, fd: int, nbytes: int) -> memoryview:
    """Map another process's sealed memfd read-only (a blocking call); LocalShareError for
    anything that is not one of this user's sealed memfds of exactly ``nbytes``."""
    if not usable():
        raise LocalShareError("shared memory is not available here")
    if not (0 < pid < 1 << 31 and 0 <= fd < 1 << 20 and nbytes > 0):
        raise LocalShareError("pid, descriptor or size out of range")
    me = os.geteuid()
    try:
        if os.stat(f"/proc/{pid}").st_uid != me:
            raise LocalShareError("the process is another user's")
        path = f"/proc/{pid}/fd/{fd}"
        # Checked before opening: opening a device may do something; a FIFO may block (and
        # is opened non-blocking all the same, in case it was swapped in meanwhile).
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise LocalShareError("not a regular file")
        opened = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as exc:
        raise LocalShareError(f"cannot open it: {os.strerror(exc.errno or errno.EIO)}") from exc
    try:
        info = os.fstat(opened)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != me:
            raise LocalShareError("not a regular file of this user")
        if info.st_size != nbytes:
            raise LocalShareError(f"{info.st_size} bytes where {nbytes} were announced")
        try:
            seals = fcntl.fcntl(opened, fcntl.F_GET_SEALS)
        except OSError as exc:  # not shared memory at all
            raise LocalShareError("not a sealed memfd") from exc
        if seals & REQUIRED_SEALS != REQUIRED_SEALS:
            raise LocalShareError("not sealed against writes and resizing")
        try:
            mapped = mmap.mmap(opened, nbytes, mmap.MAP_SHARED, mmap.PROT_READ)
        except (OSError, ValueError) as exc:
            raise LocalShareError(f"cannot map it: {exc}") from exc
    finally:
        os.close(opened)  # the mapping keeps the pages; nothing else needs the descriptor
    return memoryview(mapped)


@dataclass
class _Share:
    fd: int
    nbytes: int
    #: The jobs using it: it is closed when the last of them ends.
    holders: set[str] = field(default_factory=set)
    ready: trio.Event = field(default_factory=trio.Event)


class LocalShares:
    """The requester's sealed copies of operands, for workers on its machine.

    One copy per operand, made on first need (through the blocking hook) and handed to every
    local worker that needs it, in any job; it is closed when the last job using it ends
    (:meth:`release`: a worker that mapped it keeps its pages while it holds the operand).
    Workers that answered they are not on this machine get chunks from then on.
    """

    def __init__(self, run_blocking: BlockingRunner, *, max_bytes: int = MAX_SHARED_BYTES) -> None:
        self._run_blocking = run_blocking
        self.max_bytes = max_bytes
        self._shares: dict[str, _Share] = {}
        self._bytes = 0
        #: Workers that answered NOT_LOCAL: never asked again.
        self.refused: set[str] = set()
        self.enabled = usable()

    @property
    def nbytes(self) -> int:
        """Bytes held in sealed copies now."""
        return self._bytes

    def wanted(self, worker: str, meta: ArrayMeta) -> bool:
        """Whether ``meta`` should go to ``worker`` through shared memory (the caller checks
        that the two are on one machine)."""
        return self.enabled and meta.nbytes >= MIN_LOCAL_BYTES and worker not in self.refused

    async def descriptor(self, meta: ArrayMeta, array: np.ndarray, holder: str) -> int | None:
        """The descriptor of the sealed copy of ``array`` for job ``holder`` (made now if
        there is none), or None when it does not fit MAX_SHARED_BYTES or cannot be made."""
        share = self._shares.get(meta.digest)
        if share is not None:
            share.holders.add(holder)
            await share.ready.wait()
            return share.fd if share.fd >= 0 else None
        if self._bytes + meta.nbytes > self.max_bytes:
            return None
        share = self._shares[meta.digest] = _Share(-1, meta.nbytes, {holder})
        self._bytes += meta.nbytes
        try:
            data = memoryview(np.ascontiguousarray(array)).cast("B")
            share.fd = await self._run_blocking(sealed_copy, data)
        except OSError as exc:
            log.info("cannot share an operand through memory: %s", exc)
        finally:
            share.ready.set()
            if share.fd < 0 or not share.holders:  # failed, or every job ended meanwhile
                self._drop(meta.digest, share)
        return share.fd if share.fd >= 0 else None

    def release(self, holder: str) -> None:
        """Job ``holder`` ended: close the sealed copies no other job uses."""
        for digest, share in list(self._shares.items()):
            share.holders.discard(holder)
            if not share.holders and share.ready.is_set():
                self._drop(digest, share)

    def close(self) -> None:
        """Close every sealed copy."""
        for digest, share in list(self._shares.items()):
            share.holders.clear()
            if share.ready.is_set():
                self._drop(digest, share)

    def _drop(self, digest: str, share: _Share) -> None:
        if self._shares.get(digest) is share:
            del self._shares[digest]
            self._bytes -= share.nbytes
        if share.fd >= 0:
            os.close(share.fd)
            share.fd = -1
