"""File-backed slot store for swapped-out KV blocks: one file of N fixed-size slots.

Papers: LAMPS (arXiv 2410.18248) gives the Swap strategy for a request paused on an API call
(copy its KV out, copy it back on return); MQSSD (arXiv 2507.06349) says to keep enough
requests in flight to use the disk, so `max_in_flight` comes from the calibrated knee depth
(`SlotStore.from_profile`, `vllm_ext.swap.disk`). Keys (request_id, block_index) map to slots
through the bubble-up cuckoo index (arXiv 2501.02312), sized so a full store is at load
1 - index_eps; free slots are a stack.

Rules:
  * At most `max_in_flight` I/Os at once: every read and write runs on a ThreadPoolExecutor of
    that many threads, one synchronous pread/pwritev per task.
  * A read of a key whose write is still in flight is chained after that write (callback, so
    no pool thread ever blocks on another task); a slot freed while it has I/O in flight is
    reused only after that I/O ends.
  * Nothing in the file is trusted across processes: the file is unlinked and recreated at
    open, and every slot write carries a header with this store's random nonce drawn at open,
    the key, slot, length and a checksum, all checked on read (`vllm_ext.swap.record`): no
    record or another store's nonce -> StaleSlot; anything else wrong -> CorruptSlot.
  * A store file deleted or replaced underneath -> StoreFileMissing (checked on every call and
    before every I/O, via fstat link count and the path's inode).
  * No fsync: the tier is scratch space for one process's lifetime, not durable storage.
"""
from __future__ import annotations

import math
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Hashable

from vllm_ext.swap.cuckoo import CuckooIndex, IndexFull
from vllm_ext.swap.record import (HEADER_BYTES, CorruptSlot, PayloadTooLarge, SlotError,  # noqa: F401
                                  StaleSlot, StoreClosed, StoreFileMissing, StoreFull,
                                  SwapStoreError, as_buffer, encode_header, verify_record)

class SlotStore:
    """put/get byte payloads by key into `num_slots` slots of `slot_bytes` in one file."""

    def __init__(self, path: str | os.PathLike, slot_bytes: int, num_slots: int,
                 max_in_flight: int = 4, *, align: int = 4096, index_eps: float = 0.01,
                 remove_on_close: bool = True):
        if slot_bytes < 1 or num_slots < 1 or max_in_flight < 1 or align < 1:
            raise ValueError("slot_bytes, num_slots, max_in_flight and align must be >= 1")
        self.path = os.fspath(path)
        self.slot_bytes, self.num_slots, self.max_in_flight = slot_bytes, num_slots, max_in_flight
        self.stride = -(-(HEADER_BYTES + slot_bytes) // align) * align
        self.remove_on_close = remove_on_close
        self.nonce = os.urandom(16)
        self._lock = threading.RLock()      # RLock: a done callback may run in the caller
        self._index = CuckooIndex(math.ceil(num_slots / (1 - index_eps)) + 1, eps=index_eps,
                                  seed=int.from_bytes(self.nonce[:8], "little"))
        self._free = list(range(num_slots - 1, -1, -1))
        self._lengths = [0] * num_slots
        self._refs = [0] * num_slots        # I/Os in flight per slot
        self._parked: set[int] = set()      # released while I/O was in flight
        self._writes: dict[int, Future] = {}
        self._closed = False
        self._fd = self._create_file()
        self._ident = os.fstat(self._fd)[1:3]   # (inode, device)
        self._pool = ThreadPoolExecutor(max_workers=max_in_flight, thread_name_prefix="swap-io")

    @classmethod
    def from_profile(cls, path, slot_bytes: int, num_slots: int, profile, **kw) -> "SlotStore":
        """max_in_flight = the calibrated knee depth (a DiskProfile)."""
        return cls(path, slot_bytes, num_slots, max_in_flight=profile.chosen_depth, **kw)

    def _create_file(self) -> int:
        try:
            os.unlink(self.path)            # never reuse an earlier file's inode or bytes
        except FileNotFoundError:
            pass
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.ftruncate(fd, self.stride * self.num_slots)
        return fd

    # ---- checks ----------------------------------------------------------------------
    def _check_file(self) -> None:
        try:
            gone = os.fstat(self._fd).st_nlink == 0 or os.stat(self.path)[1:3] != self._ident
        except FileNotFoundError:
            gone = True
        if gone:
            raise StoreFileMissing(f"swap store file {self.path} was deleted or replaced")

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed(f"swap store {self.path} is closed")
        self._check_file()

    # ---- public API ------------------------------------------------------------------
    def put(self, key: Hashable, payload: Any) -> Future:
        """Write payload under key (replacing an earlier one); Future of None when on disk.
        The payload buffer is read by the I/O thread: leave it unchanged until then."""
        view = as_buffer(payload)
        if view.nbytes > self.slot_bytes:
            raise PayloadTooLarge(f"{view.nbytes} bytes > slot_bytes {self.slot_bytes}")
        with self._lock:
            self._check_open()
            if not self._free:
                raise StoreFull(f"swap store full: {self.num_slots} slots in use")
            slot = self._free.pop()
            old = self._index.pop(key)
            try:
                self._index.insert(key, slot)
            except IndexFull as exc:
                self._free.append(slot)
                if old is not None:
                    self._index.insert(key, old)
                raise StoreFull(f"swap store index full: {exc}") from exc
            if old is not None:
                self._release(old)
            self._lengths[slot] = view.nbytes
            self._refs[slot] += 1
            fut = self._pool.submit(self._run_write, slot, key, view)
            self._writes[slot] = fut
        return fut

    def get(self, key: Hashable) -> Future:
        """Future of the payload bytes; KeyError now if the key is not stored."""
        with self._lock:
            self._check_open()
            slot = self._index.lookup(key)
            if slot is None:
                raise KeyError(key)
            self._refs[slot] += 1
            length, pending = self._lengths[slot], self._writes.get(slot)
            if pending is None:
                return self._pool.submit(self._run_read, slot, key, length)
        return self._chain_read(pending, slot, key, length)

    def delete(self, key: Hashable) -> bool:
        """Forget key (its slot is reused once its I/O ends); False if it was not stored."""
        with self._lock:
            if self._closed:
                raise StoreClosed(f"swap store {self.path} is closed")
            slot = self._index.pop(key)
            if slot is None:
                return False
            self._release(slot)
            return True

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._index

    def __len__(self) -> int:
        with self._lock:
            return len(self._index)

    def slot_of(self, key: Hashable) -> int | None:
        with self._lock:
            return self._index.lookup(key)

    @property
    def index(self) -> CuckooIndex:
        return self._index

    def close(self) -> None:
        """Wait for in-flight I/O, close the file (and remove it if remove_on_close)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._pool.shutdown(wait=True)
        os.close(self._fd)
        if self.remove_on_close:
            try:
                if os.stat(self.path)[1:3] == self._ident:
                    os.unlink(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> "SlotStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- slot bookkeeping (under the lock) -----------------------------------------------
    def _release(self, slot: int) -> None:
        if self._refs[slot]:
            self._parked.add(slot)
        else:
            self._free.append(slot)

    def _io_done(self, slot: int) -> None:
        with self._lock:
            self._refs[slot] -= 1
            if not self._refs[slot] and slot in self._parked:
                self._parked.discard(slot)
                self._free.append(slot)

    def _chain_read(self, pending: Future, slot: int, key: Hashable, length: int) -> Future:
        """A read submitted once `pending` (the slot's write) has finished."""
        out: Future = Future()

        def after_write(w: Future) -> None:
            exc = w.exception()
            if exc is None:
                try:
                    inner = self._pool.submit(self._run_read, slot, key, length)
                except RuntimeError:            # pool shut down
                    exc = StoreClosed(f"swap store {self.path} closed before the read")
            if exc is not None:
                self._io_done(slot)
                out.set_exception(exc)
                return
            inner.add_done_callback(lambda r: out.set_exception(r.exception())
                                    if r.exception() is not None else out.set_result(r.result()))
        pending.add_done_callback(after_write)
        return out

    # ---- tasks: bookkeeping done before the task's Future resolves --------------------------
    def _run_write(self, slot: int, key: Hashable, payload: memoryview) -> None:
        try:
            self._write_slot(slot, key, payload)
        except BaseException:
            with self._lock:
                if self._index.lookup(key) == slot:
                    self._index.delete(key)     # a failed write never becomes readable
                    self._release(slot)
            raise
        finally:
            with self._lock:
                self._writes.pop(slot, None)    # a slot has one write in flight at most
            self._io_done(slot)

    def _run_read(self, slot: int, key: Hashable, length: int) -> bytes:
        try:
            return self.read_slot(slot, key, length)
        finally:
            self._io_done(slot)

    # ---- slot I/O (pool threads) ----------------------------------------------------------
    def _offset(self, slot: int) -> int:
        return slot * self.stride

    def _write_slot(self, slot: int, key: Hashable, payload: memoryview) -> None:
        self._check_file()
        self._pwritev([encode_header(self.nonce, slot, key, payload), payload],
                     self._offset(slot))

    def read_slot(self, slot: int, key: Hashable, length: int | None = None) -> bytes:
        """Read and verify one slot as `key`'s record (StaleSlot / CorruptSlot otherwise).
        `length` defaults to what this store last wrote there (0 if never)."""
        self._check_file()
        length = self._lengths[slot] if length is None else length
        raw = self._pread(HEADER_BYTES + length, self._offset(slot))
        return verify_record(raw, self.nonce, slot, key, length)

    def _pwritev(self, buffers: list, offset: int) -> None:
        total = sum(memoryview(b).nbytes for b in buffers)
        done = os.pwritev(self._fd, buffers, offset)
        if done < total:                    # rare short write: finish from a flat copy
            rest = b"".join(bytes(b) for b in buffers)[done:]
            while rest:
                n = os.pwrite(self._fd, rest, offset + total - len(rest))
                rest = rest[n:]

    def _pread(self, nbytes: int, offset: int) -> bytes:
        return os.pread(self._fd, nbytes, offset)
