"""Serving a model through onnxruntime: the graph of ``models.export``, built on first load and cached.

``cached_onnx`` writes the predictor's graph into ``<model folder>/runtime/ensemble-<key>.onnx``,
the key being a hash of the weights, the manifest, the graph version and the torch version, so a
model saved anew (or a new exporter) never runs a stale file. ``OnnxEnsemble`` runs it: the
``Predictor`` hands it every TTA view of a batch at once and averages the views itself.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .export import GRAPH_VERSION, INPUT_NAME, OPSET, write_onnx

if TYPE_CHECKING:
    from .artifact import Predictor

log = logging.getLogger("zoofit.models")

RUNTIME_DIR = "runtime"


class OnnxEnsemble:
    """An onnxruntime session of an exported graph: ``uint8 [N, 3, S, S]`` to averaged probabilities.

    Args:
        path: an ONNX file written by ``models.export.write_onnx`` (or its quantized copy).
        threads: intra-op threads of the session; ``None``: onnxruntime's default (all cores).
    """

    name = "onnxruntime"

    def __init__(self, path: Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.inter_op_num_threads = 1
        if threads:
            opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])

    def ensemble_probs(self, images: np.ndarray) -> np.ndarray:
        """The ensemble's averaged probabilities before the temperature, ``float32 [N, C]``."""
        out = self.session.run(["ensemble_probabilities"], {INPUT_NAME: np.ascontiguousarray(images)})[0]
        return np.asarray(out, dtype=np.float32)


def model_key(model_dir: Path, files: Sequence[str]) -> str:
    """What the cached graph of ``model_dir`` depends on: its ``files``, the graph version, torch's version."""
    import torch

    h = hashlib.sha256(f"graph={GRAPH_VERSION};opset={OPSET};torch={torch.__version__};".encode())
    for name in files:
        with open(Path(model_dir) / name, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    return h.hexdigest()[:16]


def cached_onnx(predictor: Predictor, model_dir: Path, key_files: Sequence[str]) -> Path:
    """The predictor's ONNX graph in ``model_dir/runtime``, exported now if no current one is there.

    ``key_files`` (the weights and the manifest) are hashed into the file's name.

    Older files of the folder (another key) are removed once the new one is in place.
    """
    folder = Path(model_dir) / RUNTIME_DIR
    dest = folder / f"ensemble-{model_key(model_dir, key_files)}.onnx"
    if not dest.is_file():
        log.info("exporting %s to ONNX for the onnxruntime predict runtime", model_dir)
        write_onnx(predictor, dest)  # temp + rename: concurrent loads each write a whole file
        for old in folder.glob("ensemble-*.onnx"):
            if old != dest:
                old.unlink(missing_ok=True)
    return dest
