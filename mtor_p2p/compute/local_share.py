"""Operands handed to a worker on the same machine through sealed shared memory.

Over a lane, a 256 MiB operand costs both ends far more than the product it feeds on a
2-core machine: the requester seals and sends it, the worker opens it and stores it into
fresh pages (about 0.7 ms per MiB of page faults on the project's VM), once per worker. When
requester and worker run on one machine as one user (the benchmarks' local workers, several
workers on one multi-GPU box), the requester instead copies the operand once into a sealed
``memfd`` and names it in a request on the authenticated channel: the worker opens it
through ``/proc/<pid>/fd/<fd>``, maps it read-only and hashes it, and holds it as it would an
upload. Every local worker of a job maps the same pages.

Outputs come back the other way (:func:`sealed_output`, :func:`take_shared_output`): the
worker moves a large output once into a sealed memfd named for its hash and the worker, and
the requester maps it privately over the shard's rows of the job's output (or reads it into
place), with the same checks and its hash compared as a download's.

What holds it safe (see ``docs/threat-model.md``; a hostile review's findings shaped it):

* The request names the operand's content hash, and the worker hashes what it mapped: it
  holds exactly the bytes the authenticated requester described, or refuses them. Nothing
  crosses a network; only a process of the same user can open the descriptor (such a
  process can read both peers' files, their keys among them; where ptrace is not restricted,
  their memory too; a sealed copy holds nothing but an operand or output they exchange).
* The worker maps only a memfd named for that hash and that requester (:func:`memfd_name`),
  so a request cannot point it at the worker's own key, database or sockets, nor at another
  requester's copy, nor make it hash memory that is not an operand: the name is read from the
  process table before anything is opened, the descriptor is taken as a path first (no device
  is ever opened, even one swapped in meanwhile) and must be on the kernel's mount of plain
  memfds (a file that only reads like one, on a file system whose server may never answer,
  cannot hold the thread). Everything that fails these gets the same answer, so the worker's
  descriptors are no oracle. The memfd must be sealed against writing, shrinking and
  growing, so that its bytes cannot change after they are hashed and a read of the mapping
  cannot fault (``SIGBUS``; huge-page memfds, which can fault when their pool runs out, are on
  another mount); have no holes (reading them would fill them with the worker's memory); be
  of this user and exactly the operand's size. The worker reserves the bytes under its budget
  of uploads in progress before mapping them, and refuses operands under
  :data:`MIN_LOCAL_BYTES` or over its cache.
* Only when both peers say they are on one machine: the requester when its lane to the
  worker (or a connection it dialled) is on a loopback address, the worker when the
  request's host token is its own (:func:`host_token`: the boot ID and PID namespace hashed
  with both peer IDs, so that the token names neither the machine nor its other peers).
  Anything else falls back to the upload in chunks. Running as root changes none of this.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import math
import mmap
import os
import stat
import weakref
from dataclasses import dataclass, field
from typing import Any

import blake3
import numpy as np
import trio

from mtor_p2p.records.arrays import ArrayMeta, content_hasher
from mtor_p2p.runtime import BlockingRunner

log = logging.getLogger(__name__)

#: Operands at least this large go through shared memory when they can (smaller ones are one
#: message on the lane: cheaper than a descriptor's round of system calls).
MIN_LOCAL_BYTES = 8 << 20
#: Bytes the requester keeps in sealed copies at once (beside its own operands); an operand
#: that does not fit is uploaded in chunks.
MAX_SHARED_BYTES = 2 << 30


class LocalShareError(Exception):
    """A shared operand that cannot be used; ``str(exc)`` says why."""


class NotLocal(LocalShareError):
    """A shared operand that this worker can never take from that requester (another user's
    process, one it may not open): the requester uploads in chunks from then on."""


def _read_host() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot = f.read().strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None
    if not hasattr(os, "memfd_create") or not hasattr(fcntl, "F_ADD_SEALS"):
        return None  # not Linux (or too old a Python): operands go in chunks
    return f"{boot}/{namespace}"


#: This machine and PID namespace (None: no shared memory here). Never sent as it is: any
#: local user can read it, and it would tie together every peer ID run on this machine.
_HOST = _read_host()
#: The seals a shared operand must carry: no write, no shrinking, no growing (0 where the
#: platform has no seals: then nothing is shared, see usable()).
REQUIRED_SEALS = (
    getattr(fcntl, "F_SEAL_WRITE", 0)
    | getattr(fcntl, "F_SEAL_SHRINK", 0)
    | getattr(fcntl, "F_SEAL_GROW", 0)
)
#: How a worker refuses an operand it can never take from that requester (not a fault: the
#: requester uploads it in chunks, and stops asking that worker).
NOT_LOCAL = "not local: "
#: A refused sharing attempt that may succeed later (a network failure, an old worker that
#: does not serve the protocol) is not tried again with that worker for this long.
RETRY_AFTER_S = 600.0
#: A worker's shared output that could not be opened (evicted from its store before we opened
#: it, or a descriptor that was never its copy) is not asked for again for this long: long
#: enough that a worker answering so costs a request per job at most, short enough that an
#: honest worker's eviction race costs little.
RETRY_OUTPUT_AFTER_S = 30.0
#: Workers remembered as refusing (only peers on loopback can be among them).
MAX_REFUSED = 4096


def usable() -> bool:
    """Whether this process can share operands (Linux, with memfds whose mount the process
    table shows)."""
    return _HOST is not None and _MEMFD_MOUNT is not None


def host_token(requester: str, worker: str) -> str:
    """What a requester and a worker on one machine both compute for each other: a hash of
    the machine's boot ID and PID namespace with both peer IDs (so that it names neither
    the machine nor the other peers run on it to anyone else). Empty where unusable."""
    if _HOST is None:
        return ""
    return blake3.blake3(f"mtor-host/{_HOST}/{requester}/{worker}".encode()).hexdigest()


def memfd_name(digest: str, owner: str) -> str:
    """The name the sealed copy of the operand with content hash ``digest`` made by peer
    ``owner`` is created under: a worker maps only a memfd so named, so a request can point
    it at nothing else (not even another requester's copy)."""
    return f"mtor-{digest}-{blake3.blake3(owner.encode()).hexdigest()[:16]}"


def sealed_copy(data: memoryview, digest: str, owner: str) -> int:
    """A new memfd holding ``data``, named for ``digest`` and ``owner`` and sealed (a
    blocking call: one copy of ``data``)."""
    fd = os.memfd_create(memfd_name(digest, owner), os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
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


def sealed_output(array: np.ndarray, digest: str, owner: str) -> tuple[int, np.ndarray]:
    """A worker's output moved into a sealed copy named for ``digest`` and ``owner`` (the
    worker), for a requester on this machine to map (a blocking call: one copy). Returns the
    copy's descriptor (the caller closes it) and a read-only array on the copy, to be held in
    the output's place: its mapping holds no descriptor of its own (Python's ``mmap`` keeps a
    duplicate for each mapping, so a store of sealed outputs would hold a descriptor per
    output: a hostile review counted 255 at the default cache), and is unmapped once nothing
    refers to the array."""
    fd = sealed_copy(memoryview(np.ascontiguousarray(array)).cast("B"), digest, owner)
    try:
        view = _map_read_only(fd, array.nbytes)
    except BaseException:
        os.close(fd)
        raise
    shared = np.frombuffer(view, array.dtype, count=array.size).reshape(array.shape)
    shared.flags.writeable = False  # its pages are mapped read-only: a write would fault
    return fd, shared


def _map_read_only(fd: int, nbytes: int) -> Any:
    """A shared read-only mapping of ``fd`` as a ctypes buffer that unmaps itself when it is
    collected (no descriptor kept)."""
    if _mmap_call is None or _munmap_call is None:
        raise OSError("no mmap(2) here")
    address = _mmap_call(None, nbytes, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if address is None or address == _MAP_FAILED:
        raise OSError(ctypes.get_errno(), "cannot map the sealed output")
    buffer = (ctypes.c_char * nbytes).from_address(address)
    weakref.finalize(buffer, _munmap_call, address, nbytes).atexit = False
    return buffer


def _sealed_copy_of(array: np.ndarray, digest: str, owner: str) -> int:
    # On the blocking hook with the copy itself: an operand that is not C-contiguous is made
    # so here, not on the event loop.
    return sealed_copy(memoryview(np.ascontiguousarray(array)).cast("B"), digest, owner)


def _mount_id(fd: int) -> int | None:
    """The mount a descriptor's file is on, from the process table (asks no file system)."""
    try:
        with open(f"/proc/self/fdinfo/{fd}", encoding="ascii") as f:
            for line in f:
                if line.startswith("mnt_id:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def _memfd_mount() -> int | None:
    """The kernel's internal mount of plain memfds (huge-page memfds are on another)."""
    try:
        fd = os.memfd_create("mtor-probe", os.MFD_CLOEXEC)
    except OSError:
        return None
    try:
        return _mount_id(fd)
    finally:
        os.close(fd)


_MEMFD_MOUNT = _memfd_mount() if _HOST is not None else None
#: How anything that is not the named, sealed copy is refused: one answer for all, so that
#: the worker's own descriptors (which exist, which are files, how large) are no oracle.
NOT_THE_COPY = "not this operand's sealed copy"


def open_shared(pid: int, fd: int, nbytes: int, digest: str, owner: str) -> int:
    """Open the sealed copy of the array ``digest`` that peer ``owner`` made in process
    ``pid`` (its descriptor ``fd`` there) read-only, and return the new descriptor (a
    blocking call; the caller closes it); LocalShareError for anything else.

    Nothing is opened, nor any file system asked, before the descriptor is known to be that
    memfd: its link in ``/proc`` (read from the process table) must name it; it is then
    taken as a path only (``O_PATH``: no device is opened), and must be on the kernel's mount
    of memfds (a file that merely reads like one, on a lazily unmounted file system whose
    server may never answer, is not) with its link unchanged; only then is it opened for
    reading. It must belong to this user, have no holes (reading them would fill them with
    this process's memory), be sealed against writes, shrinking and growing, and be exactly
    ``nbytes``.
    """
    if _HOST is None or _MEMFD_MOUNT is None:
        raise NotLocal("shared memory is not available here")
    if not (0 < pid < 1 << 31 and 0 <= fd < 1 << 20 and nbytes > 0):
        raise LocalShareError("pid, descriptor or size out of range")
    me = os.geteuid()
    expected = f"/memfd:{memfd_name(digest, owner)} (deleted)"
    link = f"/proc/{pid}/fd/{fd}"
    try:
        if os.stat(f"/proc/{pid}").st_uid != me:
            raise NotLocal("the process is another user's")
        if os.readlink(link) != expected:
            raise LocalShareError(NOT_THE_COPY)
        path_only = os.open(link, os.O_PATH | os.O_CLOEXEC)
    except PermissionError as exc:
        raise NotLocal("this process may not open the other peer's memory") from exc
    except OSError as exc:  # no such process or descriptor: the same answer as any other
        raise LocalShareError(NOT_THE_COPY) from exc
    try:
        if (
            _mount_id(path_only) != _MEMFD_MOUNT
            or os.readlink(f"/proc/self/fd/{path_only}") != expected
        ):
            raise LocalShareError(NOT_THE_COPY)
        opened = os.open(f"/proc/self/fd/{path_only}", os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise LocalShareError(NOT_THE_COPY) from exc
    finally:
        os.close(path_only)
    try:
        info = os.fstat(opened)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != me:
            raise NotLocal("not a file of this user")
        if info.st_size != nbytes:
            raise LocalShareError(f"{info.st_size} bytes where {nbytes} were announced")
        try:
            hole = os.lseek(opened, 0, os.SEEK_HOLE)
        except OSError as exc:
            raise LocalShareError(NOT_THE_COPY) from exc
        if hole < nbytes:
            raise LocalShareError("not every byte of it is written")
        try:
            seals = fcntl.fcntl(opened, fcntl.F_GET_SEALS)
        except OSError as exc:
            raise LocalShareError(NOT_THE_COPY) from exc
        if seals & REQUIRED_SEALS != REQUIRED_SEALS:
            raise LocalShareError("not sealed against writes and resizing")
    except BaseException:
        os.close(opened)
        raise
    return opened


def map_shared(pid: int, fd: int, nbytes: int, digest: str, owner: str) -> memoryview:
    """Map the sealed copy of the array ``digest`` that peer ``owner`` made in process ``pid``
    read-only (a blocking call; see :func:`open_shared` for what it must be)."""
    opened = open_shared(pid, fd, nbytes, digest, owner)
    try:
        mapped = mmap.mmap(opened, nbytes, mmap.MAP_SHARED, mmap.PROT_READ)
    except (OSError, ValueError) as exc:
        raise LocalShareError(f"cannot map it: {exc}") from exc
    finally:
        os.close(opened)  # the mapping keeps the pages; nothing else needs the descriptor
    return memoryview(mapped)


def take_shared_output(
    pid: int, fd: int, meta: ArrayMeta, owner: str, out: np.ndarray | None, in_place: bool
) -> tuple[memoryview, str, bool]:
    """A worker's output from its sealed copy (see :func:`open_shared`), its content hash, and
    whether it was mapped in place (a blocking call). The bytes land in ``out``
    (C-contiguous, of ``meta``'s size) or, when it is None, in a new buffer.

    With ``in_place`` (the caller owns ``out``'s memory as a private mapping no one else
    writes now, see :meth:`mtor_p2p.memory.RecycledArrays.owns`), ``out``'s pages are
    replaced by a private mapping of the copy when they are whole pages: no byte is copied
    and no fresh page faulted in (a write to them later copies that page only, and the copy's
    pages stay alive beside it until :func:`fresh_pages` or the region's end). Otherwise the
    copy is read into place, which still spares both peers the transfer. A mapped copy whose
    hash is not ``meta``'s is unmapped again before this returns (fresh zeroed pages in its
    place): a lying worker's pages are not kept alive by rows that will be written again.
    """
    opened = open_shared(pid, fd, meta.nbytes, meta.digest, owner)
    mapped_in_place = False
    try:
        if out is not None and in_place and _map_fixed(out, opened):
            target = memoryview(out).cast("B")
            mapped_in_place = True
        else:
            target = memoryview(bytearray(meta.nbytes) if out is None else out).cast("B")
            try:
                mapped = mmap.mmap(opened, meta.nbytes, mmap.MAP_SHARED, mmap.PROT_READ)
            except (OSError, ValueError) as exc:
                raise LocalShareError(f"cannot map it: {exc}") from exc
            try:
                with memoryview(mapped) as source:
                    target[:] = source
            finally:
                mapped.close()
    finally:
        os.close(opened)
    hasher = content_hasher(meta.dtype, meta.shape)
    hasher.update(target)
    digest = str(hasher.hexdigest())
    if mapped_in_place and digest != meta.digest:
        assert out is not None
        fresh_pages(out)
        mapped_in_place = False
    return target, digest, mapped_in_place


def fresh_pages(rows: np.ndarray) -> bool:
    """Put fresh private memory (zeroed) in place of ``rows``' pages, dropping a worker's copy
    mapped there by :func:`take_shared_output`, before rows are written again: else each page
    written would be held twice, the requester's copy and the worker's. Whether it did (False:
    not whole pages; the rows are left as they are). The caller writes every byte after."""
    if not _whole_pages(rows):
        return False
    assert _mmap_call is not None
    prot = mmap.PROT_READ | mmap.PROT_WRITE
    anonymous = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED
    address = rows.ctypes.data
    if _mmap_call(address, rows.nbytes, prot, anonymous, -1, 0) != address:
        raise MemoryError("could not map fresh memory in place of a job's rows")
    return True


def _whole_pages(rows: np.ndarray) -> bool:
    return (
        _mmap_call is not None
        and rows.flags.c_contiguous
        and rows.flags.writeable
        and rows.nbytes > 0
        and rows.ctypes.data % _PAGE == 0
        and rows.nbytes % _PAGE == 0
    )


#: mmap(2)'s flags that Python's mmap module does not name (the same on every Linux ABI).
_MAP_FIXED = 0x10
_PAGE = mmap.PAGESIZE


def _libc_function(name: str, argtypes: list[Any], restype: Any) -> Any:
    """libc's ``name`` through ctypes (errno kept), or None where there is none."""
    try:
        function = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    function.argtypes = argtypes
    function.restype = restype
    return function


_SIZE, _POINTER, _INT = ctypes.c_size_t, ctypes.c_void_p, ctypes.c_int
_mmap_call = (
    _libc_function("mmap", [_POINTER, _SIZE, _INT, _INT, _INT, ctypes.c_long], _POINTER)
    if _HOST is not None
    else None
)
_munmap_call = _libc_function("munmap", [_POINTER, _SIZE], _INT) if _HOST is not None else None
#: What mmap(2) returns on failure, as ctypes gives it back.
_MAP_FAILED = ctypes.c_void_p(-1).value


def _map_fixed(out: np.ndarray, fd: int) -> bool:
    """Replace ``out``'s pages with a private, writable mapping of ``fd`` (of ``out``'s size);
    whether it did (False: not whole pages, or the kernel refused, ``out`` unchanged)."""
    if not _whole_pages(out):
        return False
    assert _mmap_call is not None
    address = out.ctypes.data
    nbytes = out.nbytes
    prot = mmap.PROT_READ | mmap.PROT_WRITE
    placed = _mmap_call(address, nbytes, prot, mmap.MAP_PRIVATE | _MAP_FIXED, fd, 0)
    if placed == address:
        return True
    # A failed MAP_FIXED may have unmapped the range already: fresh private memory in its
    # place (the caller writes every byte of it next, by copy).
    anonymous = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED
    if _mmap_call(address, nbytes, prot, anonymous, -1, 0) != address:
        raise MemoryError("could not map fresh memory back in place of a job's rows")
    return False


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

    def __init__(
        self, run_blocking: BlockingRunner, owner: str, *, max_bytes: int = MAX_SHARED_BYTES
    ) -> None:
        self._run_blocking = run_blocking
        #: This requester's peer ID: its copies are named for it (see memfd_name).
        self.owner = owner
        self.max_bytes = max_bytes
        self._shares: dict[str, _Share] = {}
        self._bytes = 0
        #: worker -> until when it is not asked (inf: it answered NOT_LOCAL).
        self.refused: dict[str, float] = {}
        #: The same for taking workers' outputs from their sealed copies.
        self.outputs_refused: dict[str, float] = {}
        self.enabled = usable()
        #: job -> (operands, bytes) that workers took through shared memory, until it ends.
        self._handed: dict[str, tuple[int, int]] = {}
        #: job -> (outputs, bytes) taken from workers' sealed copies, until it ends.
        self._taken: dict[str, tuple[int, int]] = {}

    @property
    def nbytes(self) -> int:
        """Bytes held in sealed copies now."""
        return self._bytes

    def wanted(self, worker: str, meta: ArrayMeta) -> bool:
        """Whether ``meta`` should go to ``worker`` through shared memory (the caller checks
        that the two are on one machine)."""
        return self._worth_asking(self.refused, worker, meta)

    def output_wanted(self, worker: str, meta: ArrayMeta) -> bool:
        """Whether ``worker``'s output ``meta`` should be taken from its sealed copy rather
        than downloaded (the caller checks that the two are on one machine)."""
        return self._worth_asking(self.outputs_refused, worker, meta)

    def refuse(self, worker: str, *, for_good: bool) -> None:
        """Stop handing ``worker`` operands: for good (it is not on this machine, or may never
        map this process's memory), else for RETRY_AFTER_S. At most MAX_REFUSED are
        remembered (the lapsed first, then the oldest): a forgotten one is only asked once
        more."""
        self._refuse(self.refused, worker, for_good)

    def refuse_outputs(
        self, worker: str, *, for_good: bool, retry_after: float = RETRY_AFTER_S
    ) -> None:
        """Stop taking ``worker``'s outputs from shared memory, as :meth:`refuse` does for
        operands (a worker that cannot share its outputs may still take operands), for
        ``retry_after`` seconds unless ``for_good``."""
        self._refuse(self.outputs_refused, worker, for_good, retry_after)

    def _worth_asking(self, refused: dict[str, float], worker: str, meta: ArrayMeta) -> bool:
        if not self.enabled or meta.nbytes < MIN_LOCAL_BYTES:
            return False
        until = refused.get(worker)
        if until is not None and until <= trio.current_time():
            del refused[worker]
            until = None
        return until is None

    @staticmethod
    def _refuse(
        refused: dict[str, float], worker: str, for_good: bool, retry_after: float = RETRY_AFTER_S
    ) -> None:
        if len(refused) >= MAX_REFUSED and worker not in refused:
            now = trio.current_time()
            for lapsed in [w for w, until in refused.items() if until <= now]:
                del refused[lapsed]
            while len(refused) >= MAX_REFUSED:
                del refused[next(iter(refused))]
        refused[worker] = math.inf if for_good else trio.current_time() + retry_after

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
            share.fd = await self._run_blocking(_sealed_copy_of, array, meta.digest, self.owner)
        except OSError as exc:
            log.info("cannot share an operand through memory: %s", exc)
        finally:
            share.ready.set()
            if share.fd < 0 or not share.holders:  # failed, or every job ended meanwhile
                self._drop(meta.digest, share)
        return share.fd if share.fd >= 0 else None

    def note_handed(self, holder: str, nbytes: int) -> None:
        """A worker took an operand of ``nbytes`` for job ``holder`` through shared memory."""
        count, total = self._handed.get(holder, (0, 0))
        self._handed[holder] = (count + 1, total + nbytes)

    def handed(self, holder: str) -> tuple[int, int]:
        """How many operands, and how many bytes, went to job ``holder``'s workers through
        shared memory so far (one operand counts once per worker that took it)."""
        return self._handed.get(holder, (0, 0))

    def note_taken(self, holder: str, nbytes: int) -> None:
        """An output of ``nbytes`` for job ``holder`` was taken from a worker's sealed copy."""
        count, total = self._taken.get(holder, (0, 0))
        self._taken[holder] = (count + 1, total + nbytes)

    def taken(self, holder: str) -> tuple[int, int]:
        """How many outputs, and how many bytes, job ``holder`` took from workers' sealed
        copies so far."""
        return self._taken.get(holder, (0, 0))

    def release(self, holder: str) -> None:
        """Job ``holder`` ended: close the sealed copies no other job uses."""
        self._handed.pop(holder, None)
        self._taken.pop(holder, None)
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
