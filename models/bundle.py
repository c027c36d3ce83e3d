"""An export bundle: one zip with the model file, ``labels.json``, ``preprocess.json``, ``README.md``, ``SHA256SUMS``.

``build_bundle`` exports a saved model (``models.export``), checks the exported file against the
service's ``Predictor`` on validation images (as timm's ``onnx_validate.py`` does after
``onnx_export.py``), and for int8 measures the validation accuracy change, refusing the export
when top-1 drops more than ``INT8_MAX_DROP_POINTS``. The zip is written to a temporary name and
renamed, so a crash leaves no half bundle.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .artifact import WEIGHTS_FILE, Predictor, load_predictor
from .card import model_card, preprocess_doc
from .export import QUANTIZATIONS, ExportError, atomic_path, export_format, quantize_onnx, write_onnx, write_torchscript
from .manifest import MANIFEST_FILE
from .runtime import inference_batch
from .spec import check_name

CHECKSUMS_FILE = "SHA256SUMS"
# Exported float graphs must give the service's probabilities within this, and the same top-1.
FIDELITY_ATOL = 1e-4
INT8_MAX_DROP_POINTS = 1.0
CALIBRATION_IMAGES = 64


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def run_exported(path: Path, fmt: str, images_nchw: np.ndarray, threads: int | None = None) -> np.ndarray:
    """``probabilities`` of an exported model file for ``uint8 [N, 3, S, S]`` images.

    In chunks (``models.runtime.inference_batch``), as the service predicts: a whole validation set
    in one pass would hold every image's activations at once.
    """
    runtime = "onnxruntime" if fmt == "onnx" else "torch"
    batch = inference_batch(torch.device("cpu"), int(images_nchw.shape[-1]), runtime)
    if fmt == "onnx":
        from .onnx_runtime import OnnxEnsemble

        session = OnnxEnsemble(path, threads=threads).session

        def run(x: np.ndarray) -> np.ndarray:
            return np.asarray(session.run(["probabilities"], {"images": np.ascontiguousarray(x)})[0])
    else:
        module = torch.jit.load(str(path), map_location="cpu")

        def run(x: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return module(torch.from_numpy(np.ascontiguousarray(x)))[0].numpy()

    return np.concatenate([run(images_nchw[s : s + batch]) for s in range(0, len(images_nchw), batch)])


def compare(want: np.ndarray, got: np.ndarray) -> dict[str, Any]:
    """Max absolute probability difference and top-1 agreement of two ``[N, C]`` arrays."""
    return {
        "images": int(len(want)),
        "max_abs_diff": float(np.abs(want - got).max()) if len(want) else 0.0,
        "top1_agreement": float((want.argmax(1) == got.argmax(1)).mean()) if len(want) else 1.0,
    }


def _check_images(predictor: Predictor, val_images: np.ndarray | None, n: int = 16) -> np.ndarray:
    if val_images is not None and len(val_images):
        return val_images
    size = predictor.preprocess.image_size
    return np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def build_bundle(
    model_dir: Path,
    dest: Path,
    *,
    fmt: str,
    quantization: str = "none",
    val_images: np.ndarray | None = None,
    val_labels: np.ndarray | None = None,
    calibration: np.ndarray | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Export the model folder ``model_dir`` into the zip ``dest``.

    Args:
        model_dir: a folder written by ``save_artifact``.
        dest: the zip to write (temporary name, then renamed).
        fmt: a key of ``EXPORT_FORMATS``.
        quantization: one of ``QUANTIZATIONS`` (ONNX only).
        val_images: ``uint8 [N, S, S, 3]`` validation images the export is checked on (random
            images when None); with ``val_labels`` int8 exports measure their accuracy change.
        val_labels: ``int [N]`` true classes of ``val_images``.
        calibration: ``uint8 [N, S, S, 3]`` training images that calibrate ``int8_static``.
        threads: onnxruntime threads of the checks.

    Returns:
        What the export measured: ``format``, ``quantization``, ``file``, ``files`` (name -> sha256),
        ``fidelity`` (float exports), ``int8`` (accuracy change), ``size_bytes``, ``versions``.

    Raises:
        ExportError: the export is refused (int8 loses more than ``INT8_MAX_DROP_POINTS`` of top-1, a
            float export differs from the service by more than ``FIDELITY_ATOL``) or impossible.
        UnknownNameError: unknown format or quantization.
    """
    info = export_format(fmt)
    check_name("quantization", quantization, QUANTIZATIONS)
    if quantization != "none" and not info.quantizable:
        raise ExportError(f"quantization {quantization!r} applies to ONNX exports only, not {fmt!r}")
    if quantization != "none" and val_labels is None:
        raise ExportError("an int8 export needs the model's validation images to measure its accuracy change")
    model_dir, dest = Path(model_dir), Path(dest)
    predictor = load_predictor(model_dir, device="cpu")
    import onnx
    import onnxruntime

    record: dict[str, Any] = {
        "format": fmt, "quantization": quantization, "file": info.file,
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
    }
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        model_file = work / info.file
        files = [model_file]
        if fmt == "safetensors":
            shutil.copyfile(model_dir / WEIGHTS_FILE, model_file)
            shutil.copyfile(model_dir / MANIFEST_FILE, work / MANIFEST_FILE)
            files.append(work / MANIFEST_FILE)
        else:
            images = _check_images(predictor, val_images)
            want = predictor.predict_proba_views([torch.from_numpy(images)])
            nchw = images.transpose(0, 3, 1, 2)
            (write_onnx if fmt == "onnx" else write_torchscript)(predictor, model_file)
            fidelity = compare(want, run_exported(model_file, fmt, nchw, threads))
            if fidelity["max_abs_diff"] > FIDELITY_ATOL or fidelity["top1_agreement"] < 1.0:
                raise ExportError(
                    f"the {fmt} export differs from the service: max |probability difference| "
                    f"{fidelity['max_abs_diff']:.2e} (limit {FIDELITY_ATOL:g}), top-1 agreement "
                    f"{100 * fidelity['top1_agreement']:.1f}%", details={**record, "fidelity": fidelity},
                )
            record["fidelity"] = fidelity
            if quantization != "none":
                assert val_labels is not None
                calib = calibration if calibration is not None and len(calibration) else images
                quantize_onnx(model_file, model_file, quantization,
                              calibration=calib[:CALIBRATION_IMAGES].transpose(0, 3, 1, 2))
                got = run_exported(model_file, fmt, nchw, threads)
                labels = np.asarray(val_labels)
                fp32, int8 = float((want.argmax(1) == labels).mean()), float((got.argmax(1) == labels).mean())
                change = {"images": int(len(labels)), "fp32_top1": fp32, "int8_top1": int8,
                          "delta_points": 100 * (int8 - fp32), "agreement": compare(want, got)["top1_agreement"]}
                record["int8"] = change
                if change["delta_points"] < -INT8_MAX_DROP_POINTS:
                    raise ExportError(
                        f"refused: {quantization} drops validation top-1 by {-change['delta_points']:.2f} points "
                        f"({100 * fp32:.2f}% -> {100 * int8:.2f}% on {len(labels)} images; the limit is "
                        f"{INT8_MAX_DROP_POINTS:g} point)", details=record,
                    )
        (work / "labels.json").write_text(json.dumps(predictor.classes, indent=2) + "\n", encoding="utf-8")
        (work / "preprocess.json").write_text(
            json.dumps(preprocess_doc(predictor.manifest, info.file), indent=2) + "\n", encoding="utf-8"
        )
        (work / "README.md").write_text(model_card(predictor.manifest, record), encoding="utf-8")
        files += [work / "labels.json", work / "preprocess.json", work / "README.md"]
        sums = {f.name: sha256_file(f) for f in files}
        (work / CHECKSUMS_FILE).write_text("".join(f"{h}  {n}\n" for n, h in sums.items()), encoding="utf-8")
        with atomic_path(dest) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for f in [*files, work / CHECKSUMS_FILE]:
                zf.write(f, f.name)
        record["files"] = sums
        record["size_bytes"] = dest.stat().st_size
        return record
    finally:
        shutil.rmtree(work, ignore_errors=True)
