"""Peak memory of the API for one predict request of many large, highly compressible images.

    .venv/bin/python benchmarks/predict_memory.py [--images 64] [--side 6300] [--image-size 64]

Trains a small ensemble through ``zoofit serve`` (as ``bench_predict`` does), then starts ``zoofit api``
alone on the same data folder and reads its memory from ``/proc/<pid>/status`` (Linux): ``VmRSS``
when idle, and ``VmHWM`` (the peak resident set, reset by writing 5 to ``/proc/<pid>/clear_refs``)
around one request of ``--images`` flat-colour PNGs of ``--side`` x ``--side`` pixels (~130 KB each
on the wire, 4 bytes a pixel once Pillow decodes them). Two servers are measured:

- ``budget raised``: the per-request pixel budget (``ZOOFIT_PREDICT_MAX_REQUEST_PIXELS``) set above
  the request, so every image is decoded: this measures what decoding costs;
- ``defaults``: the shipped settings, where such a request is refused from the image headers.

"Idle" is the RSS after one small warm-up request (model loaded, inference thread started); the cold
RSS before it is printed too. Stops by itself; nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_predict import _server, _train, fresh_store  # noqa: E402
from service.sample_data import animal_split, png_bytes  # noqa: E402

MIB = 1024 * 1024


def _status_kib(pid: int, field: str) -> int:
    """A ``kB`` field (``VmRSS``, ``VmHWM``) of ``/proc/<pid>/status``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def _flat_png(side: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (side, side), (120, 30, 200)).save(buf, format="PNG")
    return buf.getvalue()


@dataclass(frozen=True)
class Row:
    """One server: the big request's status and time, and the API's memory in MiB."""

    status: int
    seconds: float
    cold: float  # RSS before any predict request
    idle: float  # RSS after a small warm-up request
    peak: float  # the highest RSS during the big request
    detail: str  # the error message, if refused


def _measure(c: httpx.Client, pid: int, model_id: str, warm: bytes, big: bytes, n: int) -> Row:
    """Cold and warm idle RSS, then the peak RSS around one request of ``n`` copies of ``big`` (MiB)."""
    url = f"/v1/models/{model_id}/predict"
    cold = _status_kib(pid, "VmRSS")
    c.post(url, files=[("files", ("warm.png", warm, "image/png"))]).raise_for_status()
    time.sleep(0.5)
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM restarts from the current RSS
    idle = _status_kib(pid, "VmRSS")
    t0 = time.perf_counter()
    r = c.post(url, files=[("files", (f"{i}.png", big, "image/png")) for i in range(n)])
    seconds = time.perf_counter() - t0
    peak = _status_kib(pid, "VmHWM")
    detail = "" if r.status_code == 200 else r.json().get("detail", "")[:160]
    return Row(r.status_code, seconds, cold * 1024 / MIB, idle * 1024 / MIB, peak * 1024 / MIB, detail)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64, help="images in the one request (the default cap is 64)")
    ap.add_argument("--side", type=int, default=6300, help="side of each square PNG in pixels")
    ap.add_argument("--image-size", type=int, default=64, help="model input side in pixels")
    args = ap.parse_args()

    data_dir, settings, headers = fresh_store("zoofit-mem-")
    big = _flat_png(args.side)
    _, test = animal_split(per_class=0, test_per_class=1, seed=1)
    warm = png_bytes(test[0][2])
    rows: dict[str, Row] = {}
    try:
        with _server("serve", data_dir, headers) as (c, _):
            model_id = _train(c, args.image_size)
        budget = str(args.images * args.side * args.side + 1)
        configs = {"budget raised": {"predict_max_request_pixels": budget}, "defaults": {}}
        for name, env in configs.items():
            print(name, file=sys.stderr)
            with _server("api", data_dir, headers, **env) as (c, proc):
                rows[name] = _measure(c, proc.pid, model_id, warm, big, args.images)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)

    mpx = args.side * args.side / 1e6
    print(f"\npredict memory: one request of {args.images} flat PNGs of {args.side}x{args.side} ({mpx:.1f} Mpx, "
          f"{len(big) / 1024:.0f} KB each, {args.images * len(big) / MIB:.1f} MiB in all), "
          f"model input {args.image_size} px, {os.cpu_count()} CPUs\n")
    print("| server | status | seconds | cold RSS MiB | idle RSS MiB | peak RSS MiB | peak - idle MiB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        print(f"| {name} | {r.status} | {r.seconds:.1f} | {r.cold:.0f} | {r.idle:.0f} | {r.peak:.0f} "
              f"| {r.peak - r.idle:.0f} |")
    for name, r in rows.items():
        if r.detail:
            print(f"\n{name}: {r.detail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
