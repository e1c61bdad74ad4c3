"""Peak memory and throughput of the streaming data path (image folder -> fetch_data -> prepare).

An image folder of 512-px JPEGs through ``fetch_data`` (the split manifest) and ``prepare`` (decode +
resize to 224 px into memory maps). For each number of images (default 1,000 and 10,000) and each number
of decoding workers (default 1 and all cores) one fresh child process runs both steps as the stages do
(importing what the two stage scripts import: ``medmerge.stage`` and ``load_params``, which leave torch
unimported) and reports its wall times, CPU time and peak RSS: of the main process (``ru_maxrss``), and
the largest peak (``VmHWM``) among its descendant processes (the decoding workers). The folder is
fabricated fast: a few distinct JPEGs, each written many times (the duplicates check of prepare sees the
repeats; it does not change the cost). Everything is removed afterwards.

    python -m benchmarks data_stream                          # 1,000 and 10,000 images, 1 and all workers
    python -m benchmarks data_stream --images 2000 --workers 1 2 4 --json out.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from . import REPO

CLASSES = ("a", "b", "c", "d")


def distinct_jpegs(count: int, size: int, seed: int = 0) -> list[bytes]:
    """``count`` different photograph-like JPEGs (smooth colour fields plus noise), quality 90."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(count):
        a, b, c = rng.uniform(1, 6, 3)
        field = np.stack([np.sin(a * xx + b * yy), np.cos(b * xx - c * yy), np.sin(c * xx * yy + a)], -1)
        pixels = np.clip(127 + 100 * field + rng.normal(0, 12, field.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def grow_folder(root: Path, total: int, jpegs: list[bytes]) -> None:
    """Make ``root/<class>/<i>.jpg`` hold ``total`` images (adds the missing ones)."""
    for c in CLASSES:
        (root / c).mkdir(parents=True, exist_ok=True)
    for i in range(total):
        path = root / CLASSES[i % len(CLASSES)] / f"{i:06d}.jpg"
        if not path.exists():
            path.write_bytes(jpegs[i % len(jpegs)])


class DescendantPeak(threading.Thread):
    """Samples the peak RSS (VmHWM) of every descendant process (the decoding workers) every 0.1 s."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_kib, self._done = 0, threading.Event()
        self.cpu_s: dict[int, float] = {}  # last seen user + system CPU seconds per descendant

    def run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._done.wait(0.1):
            for process in me.children(recursive=True):
                try:
                    status = Path(f"/proc/{process.pid}/status").read_text()
                    times = process.cpu_times()
                except (OSError, psutil.Error):
                    continue
                self.cpu_s[process.pid] = times.user + times.system
                hwm = next((line.split()[1] for line in status.splitlines() if line.startswith("VmHWM")), "0")
                self.peak_kib = max(self.peak_kib, int(hwm))

    def stop(self) -> float:
        self._done.set()
        self.join()
        return self.peak_kib / 1024


def child(root: Path, work: Path, workers: int, image_size: int) -> dict:
    """One measurement, in this (fresh) process."""
    import medmerge.stage  # noqa: F401  (what the stage scripts import first)
    from medmerge.data import fetch_dataset, open_raw_dataset, prepare_dataset

    sampler = DescendantPeak()
    sampler.start()
    own = resource.getrusage(resource.RUSAGE_SELF)
    cpu_at_start = own.ru_utime + own.ru_stime
    start = time.perf_counter()
    raw_file = work / "raw" / "bench.npz"
    fetch_dataset("imagefolder", {"root": str(root)}, raw_file)
    fetched = time.perf_counter()
    meta = prepare_dataset(open_raw_dataset(raw_file), image_size, work / "processed", workers=workers)
    prepared = time.perf_counter()
    worker_mb = sampler.stop()
    images = sum(sum(c.values()) for c in meta["counts"].values())
    own = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = own.ru_utime + own.ru_stime + sum(sampler.cpu_s.values()) - cpu_at_start
    kib = 1024  # ru_maxrss is in KiB on Linux
    return {
        "images": images,
        "workers": workers,
        "fetch_s": round(fetched - start, 2),
        "prepare_s": round(prepared - fetched, 2),
        "images_per_s": round(images / (prepared - fetched), 1),
        "cpu_ms_per_image": round(1000 * cpu_s / images, 2),  # fetch + prepare, this process and the workers
        "peak_rss_main_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / kib, 1),
        "peak_rss_worker_mb": round(worker_mb, 1) if workers > 1 else None,
        "prepared_mb": round(sum(f.stat().st_size for f in (work / "processed").iterdir()) / 2**20, 1),
    }


def measure(root: Path, workers: int, image_size: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="medmerge-bench-out-", dir=root.parent) as work:
        command = [sys.executable, "-m", "benchmarks.data_stream", "--child", str(root), work, str(workers),
                   str(image_size)]
        env = {**os.environ, "MEDMERGE_LOG_LEVEL": "ERROR", "PYTHONPATH": str(REPO)}
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, check=False)
        if result.returncode:
            raise RuntimeError(result.stderr[-2000:])
        return json.loads(result.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    lines = ["| images | workers | fetch (s) | prepare (s) | images/s | CPU ms/image | peak RSS main (MB) | peak RSS per worker (MB) | prepared (MB) |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        worker = "—" if r["peak_rss_worker_mb"] is None else f"{r['peak_rss_worker_mb']:.0f}"
        lines.append(f"| {r['images']:,} | {r['workers']} | {r['fetch_s']:.2f} | {r['prepare_s']:.1f} | "
                     f"{r['images_per_s']:.0f} | {r['cpu_ms_per_image']:.2f} | {r['peak_rss_main_mb']:.0f} | {worker} | {r['prepared_mb']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:  # the fresh process of one measurement (measure)
        root, work, workers, size = argv[1:5]
        print(json.dumps(child(Path(root), Path(work), int(workers), int(size))))
        return
    cores = len(os.sched_getaffinity(0))
    parser = argparse.ArgumentParser(prog="python -m benchmarks data_stream", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--workers", type=int, nargs="+", default=sorted({1, cores}))
    parser.add_argument("--source-size", type=int, default=512, help="side of the fabricated JPEGs (px)")
    parser.add_argument("--image-size", type=int, default=224, help="data.image_size to prepare at (px)")
    parser.add_argument("--distinct", type=int, default=32, help="different JPEGs among the files")
    parser.add_argument("--json", type=Path, help="also save the rows as JSON")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    jpegs = distinct_jpegs(args.distinct, args.source_size)
    scratch = Path(tempfile.mkdtemp(prefix="medmerge-bench-"))
    rows = []
    try:
        root = scratch / "images"
        for n in sorted(args.images):
            grow_folder(root, n, jpegs)
            for workers in args.workers:
                rows.append(measure(root, workers, args.image_size))
                print(json.dumps(rows[-1]), file=sys.stderr)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"{stamp}, {platform.machine()}, {cores} cores, load average {load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after; "
          f"{args.source_size}-px JPEGs (~{np.mean([len(j) for j in jpegs]) / 1024:.0f} KiB) -> {args.image_size} px\n")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
