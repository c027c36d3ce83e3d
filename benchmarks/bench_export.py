"""Predict runtimes: torch eager, onnxruntime fp32 and onnxruntime int8 (static QDQ), in-process and over HTTP.

    .venv/bin/python -m benchmarks.bench_export [--image-size 128] [--seconds 6] [--clients 32] [--threads 2]

Trains the ensemble of ``bench_predict`` (3 x tf_efficientnet_lite0, bundled ImageNet weights, linear
probe, 1 epoch) through ``zoofit serve``. Then, in this process, times ``Predictor.predict_proba_views``
(the call the API's batcher makes) on batches of 32 prepared images with each runtime: torch eager
(today's path), onnxruntime fp32 (the exported graph, ``ZOOFIT_PREDICT_RUNTIME=onnxruntime``) and
onnxruntime int8 (the same graph quantized statically, QDQ, calibrated on the training images). Each
runtime's top-1 agreement with torch and its accuracy on held-out labelled images are measured too.
Finally ``zoofit api`` is started once per serving runtime and 32 concurrent clients send one
256x256 JPEG per request. Every figure is a ratio against torch eager measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.bench_predict import _jpeg, _load, _server, _train, fresh_store
from service.sample_data import animal_split

CLASSES = ("bear", "bird", "cat")


def _rate(predictor: Any, views: list[Any], seconds: float) -> float:
    """Images per second of ``predict_proba_views`` on ``views`` (after one warm-up call)."""
    predictor.predict_proba_views(views)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        predictor.predict_proba_views(views)
        n += len(views[0])
    return n / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--seconds", type=float, default=6)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2, help="torch / onnxruntime intra-op threads")
    args = ap.parse_args()
    started = time.monotonic()

    import numpy as np
    import torch
    from PIL import Image

    from models.artifact import load_predictor
    from models.data import to_array
    from models.export import quantize_onnx
    from models.onnx_runtime import OnnxEnsemble, cached_onnx

    torch.set_num_threads(args.threads)
    data_dir, settings, headers = fresh_store("zoofit-bench-export-")
    _, test = animal_split(per_class=0, test_per_class=20, seed=1)
    test = [t for t in test if t[0] in CLASSES]
    jpegs = [_jpeg(img) for _, _, img in test]
    rows: dict[str, dict[str, float]] = {}
    http: dict[str, float] = {}
    try:
        t0 = time.monotonic()
        with _server("serve", data_dir, headers) as (c, _):
            model_id = _train(c, args.image_size)
        print(f"trained in {time.monotonic() - t0:.0f} s", file=sys.stderr)
        model_dir = settings.models_dir / model_id

        eager = load_predictor(model_dir, device="cpu")
        size = eager.preprocess.image_size
        from io import BytesIO

        arrays = np.stack([to_array(Image.open(BytesIO(b)), size, eager.preprocess.interpolation) for b in jpegs])
        labels = np.array([CLASSES.index(name) for name, _, _ in test])
        batch = [torch.from_numpy(np.resize(arrays, (32, size, size, 3)))]
        fp32 = load_predictor(model_dir, device="cpu", runtime="onnxruntime", threads=args.threads)
        train, _ = animal_split(per_class=4, test_per_class=0, seed=0)
        calib = np.stack([to_array(Image.fromarray(img), size, eager.preprocess.interpolation)
                          for name, _, img in train if name in CLASSES]).transpose(0, 3, 1, 2)
        int8_path = quantize_onnx(cached_onnx(eager, model_dir, ("manifest.json", "model.safetensors")),
                                  Path(tempfile.mkdtemp()) / "int8.onnx", "int8_static", calibration=calib)
        int8 = load_predictor(model_dir, device="cpu").use_onnx(OnnxEnsemble(int8_path, threads=args.threads))
        want = eager.predict_proba_views([torch.from_numpy(arrays)])
        runtimes = {"torch eager": eager, "onnxruntime fp32": fp32, "onnxruntime int8 (static QDQ)": int8}
        for name, p in runtimes.items():
            probs = p.predict_proba_views([torch.from_numpy(arrays)])
            rows[name] = {
                "rate": _rate(p, batch, args.seconds),
                "agree": float((probs.argmax(1) == want.argmax(1)).mean()),
                "acc": float((probs.argmax(1) == labels).mean()),
                "maxdiff": float(np.abs(probs - want).max()),
            }
            print(name, rows[name], file=sys.stderr)
        del eager, fp32, int8

        for runtime in ("torch", "onnxruntime"):
            with _server("api", data_dir, headers, predict_runtime=runtime, predict_threads=str(args.threads)) as (
                c, proc
            ):
                url = f"/v1/models/{model_id}/predict"
                rate, _lat, errors, _ = asyncio.run(
                    _load(str(c.base_url), headers, url, jpegs, args.clients, args.seconds, lambda: 0.0)
                )
                if errors:
                    print(f"{runtime}: {len(errors)} errors, e.g. {errors[0]}", file=sys.stderr)
                http[runtime] = rate
                print(f"HTTP {runtime}: {rate:.1f} img/s", file=sys.stderr)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)

    base = rows["torch eager"]["rate"]
    print(f"\n3 x tf_efficientnet_lite0 at {args.image_size} px, {args.threads} threads, {os.cpu_count()} CPUs; "
          f"in-process: predict_proba_views on batches of 32; accuracy on {len(test)} labelled test images\n")
    print("| runtime | in-process images/s | vs torch eager | top-1 agreement with torch | max abs prob diff "
          "| test accuracy |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        print(f"| {name} | {r['rate']:.1f} | {r['rate'] / base:.2f}x | {100 * r['agree']:.1f}% | {r['maxdiff']:.1e} "
              f"| {100 * r['acc']:.1f}% |")
    print(f"\n| HTTP predict, {args.clients} clients | images/s | vs torch |\n| --- | --- | --- |")
    for runtime, rate in http.items():
        print(f"| ZOOFIT_PREDICT_RUNTIME={runtime} | {rate:.1f} | {rate / http['torch']:.2f}x |")
    print(f"\nbenchmark wall time {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
