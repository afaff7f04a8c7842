"""Disk calibration for the KV swap tier: throughput vs requests in flight, and the knee depth.

Paper: MQSSD, the multi-queue SSD model (arXiv 2507.06349). Its observation: a modern SSD
serves many queues at once, so throughput grows with the number of requests in flight up to
a device limit; I/O must be designed to keep enough requests in flight. We measure that curve
on the local disk and size the swap tier's concurrency (`SlotStore(max_in_flight=...)`) from it.

Measurement: one scratch file of `total_bytes`, written once sequentially (untimed, so the
timed passes hit allocated extents); then, per queue depth D, a write pass and a read pass,
each touching every block once in a seeded random order, block-aligned, issued by D threads
that each do synchronous os.pwrite / os.preadv (the syscalls release the GIL), i.e. exactly D
requests in flight. Page cache: O_DIRECT when the file system takes it (aligned mmap buffers,
block size a multiple of 4096) and fsync at the end of each write pass; otherwise buffered
with O_DSYNC writes (each write returns once it is on the device) and, before every read pass,
fsync + posix_fadvise(DONTNEED) to drop the file's pages and fadvise(RANDOM) against
readahead. `DiskProfile.method` records which one ran.

Knee rule (`knee_depth`): the smallest depth whose throughput is within `tolerance` (default
10%) of the best depth's, for every curve given; the profile's `chosen_depth` applies it to
reads and writes together. If no depth satisfies all curves, the depth with the largest
worst-curve ratio to its best. Beyond the knee more in-flight requests add queueing delay,
not throughput.
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

DEFAULT_DEPTHS = (1, 2, 4, 8, 16, 32)
_ALIGN = 4096


def knee_depth(depths: Sequence[int], *curves: Sequence[float], tolerance: float = 0.10) -> int:
    """Smallest depth at which every curve is within `tolerance` of that curve's best."""
    if not depths or not curves:
        raise ValueError("need depths and at least one throughput curve")
    if any(len(c) != len(depths) for c in curves):
        raise ValueError("every curve needs one value per depth")
    if not 0.0 <= tolerance < 1.0:
        raise ValueError(f"tolerance must be in [0, 1), got {tolerance}")
    order = sorted(range(len(depths)), key=lambda i: depths[i])
    bests = [max(c) for c in curves]
    ratios = [min(c[i] / b if b > 0 else 1.0 for c, b in zip(curves, bests)) for i in order]
    for i, r in zip(order, ratios):
        if r >= 1.0 - tolerance:
            return int(depths[i])
    return int(depths[order[max(range(len(order)), key=lambda j: ratios[j])]])


@dataclass
class DiskProfile:
    block_bytes: int
    total_bytes: int
    depths: list[int]
    read_mb_s: list[float]
    write_mb_s: list[float]
    chosen_depth: int
    read_knee: int
    write_knee: int
    tolerance: float
    method: str
    directory: str
    repeats: int = 1
    read_samples: list[list[float]] = field(default_factory=list)    # per depth, per round
    write_samples: list[list[float]] = field(default_factory=list)
    loadavg: list[float] = field(default_factory=list)     # 1-min load, start and end
    elapsed_s: float = 0.0
    host: str = field(default_factory=platform.node)
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DiskProfile":
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "DiskProfile":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def table(self) -> str:
        br, bw = max(self.read_mb_s), max(self.write_mb_s)
        lines = [f"block {self.block_bytes // 1024} KiB, {self.total_bytes / 2**20:.0f} MiB "
                 f"per pass, median of {self.repeats}, {self.method}",
                 "depth  read MB/s  (% best)  write MB/s  (% best)"]
        for d, r, w in zip(self.depths, self.read_mb_s, self.write_mb_s):
            mark = "  <- chosen" if d == self.chosen_depth else ""
            lines.append(f"{d:5d}  {r:9.1f}  ({100 * r / br:5.1f}%)  {w:10.1f}  "
                         f"({100 * w / bw:5.1f}%){mark}")
        i = self.depths.index(self.chosen_depth)
        met = min(self.read_mb_s[i] / br, self.write_mb_s[i] / bw) >= 1 - self.tolerance
        lines.append(f"knee (within {100 * self.tolerance:.0f}% of best): read {self.read_knee}, "
                     f"write {self.write_knee}, both {self.chosen_depth}"
                     + ("" if met else " (no depth within on both: best worst-case ratio)"))
        return "\n".join(lines)


# ---- I/O passes ------------------------------------------------------------------------
def _open_scratch(path: Path, direct: bool) -> tuple[int, str]:
    base = os.O_RDWR | os.O_CREAT | os.O_TRUNC
    if direct and hasattr(os, "O_DIRECT"):
        try:
            fd = os.open(path, base | os.O_DIRECT, 0o600)
            probe = mmap.mmap(-1, _ALIGN)
            try:
                os.pwrite(fd, probe, 0)
                return fd, "O_DIRECT"
            except OSError:
                os.close(fd)
            finally:
                probe.close()
        except OSError:
            pass
    fd = os.open(path, base | getattr(os, "O_DSYNC", 0), 0o600)
    return fd, "buffered+O_DSYNC writes; fsync+fadvise(DONTNEED,RANDOM) before reads"


def _drop_cache(fd: int) -> None:
    os.fsync(fd)
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)


def _worker(fd: int, op: str, offsets: list[int], block: int, errors: list) -> None:
    buf = mmap.mmap(-1, block)            # page-aligned, as O_DIRECT needs
    try:
        if op == "write":
            buf.write(os.urandom(block))
            for off in offsets:
                if os.pwrite(fd, buf, off) != block:
                    raise OSError(f"short write at {off}")
        else:
            for off in offsets:
                if os.preadv(fd, [buf], off) != block:
                    raise OSError(f"short read at {off}")
    except BaseException as exc:          # surfaced by the caller
        errors.append(exc)
    finally:
        buf.close()


def _timed_pass(fd: int, op: str, offsets: list[int], block: int, depth: int) -> float:
    """Seconds to do every offset with `depth` threads, each one request at a time."""
    errors: list = []
    threads = [threading.Thread(target=_worker, args=(fd, op, offsets[t::depth], block, errors))
               for t in range(depth)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if op == "write":
        os.fsync(fd)
    elapsed = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return elapsed


def _measure_depth(fd: int, nblocks: int, block: int, depth: int,
                   rng: random.Random) -> tuple[float, float]:
    """(read MB/s, write MB/s) of one random pass each over all blocks at `depth`."""
    offsets = [i * block for i in range(nblocks)]
    rng.shuffle(offsets)
    w = _timed_pass(fd, "write", offsets, block, depth)
    _drop_cache(fd)
    rng.shuffle(offsets)
    r = _timed_pass(fd, "read", offsets, block, depth)
    return nblocks * block / r / 1e6, nblocks * block / w / 1e6


def calibrate(directory: str | os.PathLike | None = None, block_bytes: int = 256 * 1024,
              total_bytes: int = 64 * 2**20, depths: Sequence[int] = DEFAULT_DEPTHS,
              tolerance: float = 0.10, direct: bool = True, seed: int = 0,
              repeats: int = 1, log=None) -> DiskProfile:
    """Measure read/write MB/s per queue depth on a scratch file in `directory` (removed after).
    With repeats > 1, rounds over all depths are repeated and each depth's median kept."""
    if block_bytes <= 0:
        raise ValueError(f"block_bytes must be > 0, got {block_bytes}")
    if block_bytes % _ALIGN:
        direct = False                    # O_DIRECT needs aligned sizes
    depths = sorted({int(d) for d in depths})
    if not depths or depths[0] < 1:
        raise ValueError(f"depths must be >= 1, got {depths}")
    nblocks = max(1, total_bytes // block_bytes)
    directory = Path(directory or tempfile.gettempdir())
    path = directory / f".vllm-ext-diskcal-{os.getpid()}-{random.randrange(1 << 30)}.bin"
    rng = random.Random(seed)
    t_start, load0 = time.perf_counter(), os.getloadavg()[0]
    fd, method = _open_scratch(path, direct)
    try:
        _timed_pass(fd, "write", [i * block_bytes for i in range(nblocks)], block_bytes, 1)
        samples = {d: ([], []) for d in depths}
        for _ in range(max(1, repeats)):
            for depth in depths:
                r, w = _measure_depth(fd, nblocks, block_bytes, depth, rng)
                samples[depth][0].append(r)
                samples[depth][1].append(w)
                if log:
                    log(f"depth {depth:3d}: read {r:9.1f} MB/s  write {w:9.1f} MB/s")
        reads = [statistics.median(samples[d][0]) for d in depths]
        writes = [statistics.median(samples[d][1]) for d in depths]
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    return DiskProfile(
        block_bytes=block_bytes, total_bytes=nblocks * block_bytes, depths=depths,
        read_mb_s=[round(x, 2) for x in reads], write_mb_s=[round(x, 2) for x in writes],
        chosen_depth=knee_depth(depths, reads, writes, tolerance=tolerance),
        read_knee=knee_depth(depths, reads, tolerance=tolerance),
        write_knee=knee_depth(depths, writes, tolerance=tolerance),
        tolerance=tolerance, method=method, repeats=max(1, repeats), directory=str(directory),
        read_samples=[[round(x, 2) for x in samples[d][0]] for d in depths],
        write_samples=[[round(x, 2) for x in samples[d][1]] for d in depths],
        loadavg=[round(load0, 2), round(os.getloadavg()[0], 2)],
        elapsed_s=round(time.perf_counter() - t_start, 2))


def plot_profile(profile: DiskProfile, path: str | os.PathLike) -> None:
    """Throughput vs depth (log2 axis), the within-tolerance lines and the chosen depth, PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, ys, samples, color in (
            ("read", profile.read_mb_s, profile.read_samples, "tab:blue"),
            ("write", profile.write_mb_s, profile.write_samples, "tab:orange")):
        ax.plot(profile.depths, ys, "o-", color=color, label=f"{name} (median)")
        if samples and len(samples[0]) > 1:
            ax.fill_between(profile.depths, [min(x) for x in samples], [max(x) for x in samples],
                            color=color, alpha=0.15, lw=0)
        ax.axhline((1 - profile.tolerance) * max(ys), color=color, ls=":", lw=1)
    ax.axvline(profile.chosen_depth, color="gray", ls="--",
               label=f"chosen depth {profile.chosen_depth}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(profile.depths, [str(d) for d in profile.depths])
    ax.set_xlabel("requests in flight (queue depth)")
    ax.set_ylabel("MB/s")
    ax.set_title(f"{profile.block_bytes // 1024} KiB random I/O, {profile.method.split(';')[0]}",
                 fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vllm_ext.swap.disk",
                                 description="MQSSD-style swap-disk calibration")
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where the scratch file goes")
    ap.add_argument("--block-kib", type=int, default=256, help="I/O size in KiB")
    ap.add_argument("--mib", type=int, default=64, help="scratch file size = bytes per pass")
    ap.add_argument("--depths", default=",".join(map(str, DEFAULT_DEPTHS)))
    ap.add_argument("--tolerance", type=float, default=0.10)
    ap.add_argument("--buffered", action="store_true", help="do not try O_DIRECT")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=1, help="rounds over the depths; median")
    ap.add_argument("--out", help="write the profile JSON here")
    ap.add_argument("--png", help="write the curve here")
    args = ap.parse_args(argv)
    profile = calibrate(args.dir, block_bytes=args.block_kib * 1024, total_bytes=args.mib * 2**20,
                        depths=[int(x) for x in args.depths.split(",") if x.strip()],
                        tolerance=args.tolerance, direct=not args.buffered, seed=args.seed,
                        repeats=args.repeats,
                        log=lambda m: print(m, file=sys.stderr, flush=True))
    print(profile.table())
    if args.out:
        profile.save(args.out)
    if args.png:
        plot_profile(profile, args.png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
