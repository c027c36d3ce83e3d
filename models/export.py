"""A loaded model as one self-contained graph: ONNX and TorchScript writers, ONNX int8 quantization.

``ExportGraph`` wraps a ``Predictor``'s whole ensemble: ``uint8 [N, 3, S, S]`` RGB in (the batch
axis is dynamic), normalisation inside, the members' softmax probabilities averaged, then the fitted
temperature applied. It has two outputs: ``probabilities`` (temperature-scaled, what the service
answers for one view) and ``ensemble_probabilities`` (before the temperature), which the service's
onnxruntime path averages over TTA views before it applies the temperature itself, as ``Predictor``
does.

Every writer writes a temporary sibling and renames it into place, so a crash leaves no half file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from .errors import ZooError
from .evaluation import PROB_FLOOR
from .spec import check_name
from .zoo import Preprocess

if TYPE_CHECKING:
    from .artifact import Predictor

INPUT_NAME = "images"
OUTPUT_NAMES = ("probabilities", "ensemble_probabilities")
OPSET = 17
# Bumped whenever the graph changes: part of the service's cached-runtime key.
GRAPH_VERSION = 1


@dataclass(frozen=True)
class ExportFormat:
    """One export format.

    Attributes:
        name: what the API and the CLI call it.
        file: the model file's name inside the bundle.
        quantizable: whether int8 quantization applies.
        description: one line for humans.
    """

    name: str
    file: str
    quantizable: bool
    description: str


EXPORT_FORMATS: dict[str, ExportFormat] = {
    f.name: f
    for f in (
        ExportFormat("onnx", "model.onnx", True, "ONNX (opset 17), the whole ensemble in one graph, uint8 NCHW input"),
        ExportFormat("torchscript", "model.pt", False, "TorchScript (traced), the same graph as the ONNX export"),
        ExportFormat("safetensors", "model.safetensors", False, "the members' weights and the manifest, as trained"),
    )
}
# ``none``: float32. ``int8_dynamic``: weights int8, activations quantized per batch at run time.
# ``int8_static``: QDQ weights and activations, activation ranges calibrated on training images.
QUANTIZATIONS = ("none", "int8_dynamic", "int8_static")


class ExportError(ZooError):
    """An export that cannot be made or that is refused (an int8 model that loses accuracy).

    ``details`` holds what the export measured before it was refused.
    """

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.details = dict(details or {})


def export_format(name: str) -> ExportFormat:
    """Registry entry of ``name``.

    Raises:
        UnknownNameError: ``name`` is not in ``EXPORT_FORMATS`` (the message lists them).
    """
    return EXPORT_FORMATS[check_name("export format", name, list(EXPORT_FORMATS))]


class ExportGraph(nn.Module):
    """uint8 RGB NCHW images to ``(probabilities, ensemble_probabilities)``, both ``float32 [N, C]``.

    Args:
        ensemble: the eval-mode ``Ensemble`` (its input is normalised with ``preprocess``).
        preprocess: the model's mean and std (applied inside the graph, as ``normalize_batch`` does).
        temperature: applied to the averaged probabilities, ``softmax(log p / T)``.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, ensemble: nn.Module, preprocess: Preprocess, temperature: float) -> None:
        super().__init__()
        self.ensemble = ensemble
        self.temperature = float(temperature)
        self.register_buffer("mean", torch.tensor(preprocess.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(preprocess.std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The same ops as ToDtype(scale=True) + Normalize, so float results match the service's.
        x = (images.float() / 255.0 - self.mean) / self.std
        raw = self.ensemble(x)
        if self.temperature == 1.0:
            return raw, raw
        return (raw.clamp_min(PROB_FLOOR).log() / self.temperature).softmax(dim=-1), raw


def export_graph(predictor: Predictor) -> ExportGraph:
    """The predictor's ensemble, normalisation and temperature as one eval-mode CPU module."""
    model = predictor.model.to("cpu").eval()
    model.shared_groups()  # decide prefix sharing before tracing (the weights are loaded)
    return ExportGraph(model, predictor.preprocess, predictor.temperature).eval()


def example_input(image_size: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """A random ``uint8 [batch, 3, S, S]`` input for tracing."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, image_size, image_size), dtype=torch.uint8, generator=g)


@contextlib.contextmanager
def atomic_path(dest: Path) -> Iterator[Path]:
    """A temporary sibling of ``dest`` to write; renamed to ``dest`` on success, removed on error."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        tmp.chmod(0o644)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def write_onnx(predictor: Predictor, dest: Path, *, opset: int = OPSET) -> Path:
    """Write the predictor as ``dest`` (ONNX): input ``images`` ``uint8 [N, 3, S, S]``, dynamic ``N``.

    Returns:
        ``dest``.
    """
    graph = export_graph(predictor)
    x = example_input(predictor.preprocess.image_size)
    axes = {INPUT_NAME: {0: "batch"}, **{name: {0: "batch"} for name in OUTPUT_NAMES}}
    with atomic_path(dest) as tmp, torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        # The TorchScript-based exporter is deprecated but is the one that exports timm models here.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            graph, (x,), str(tmp), dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES), dynamic_axes=axes, do_constant_folding=True,
        )
    return Path(dest)


def write_torchscript(predictor: Predictor, dest: Path) -> Path:
    """Write the predictor as ``dest`` (traced TorchScript, same inputs and outputs as the ONNX graph).

    Returns:
        ``dest``.
    """
    graph = export_graph(predictor)
    x = example_input(predictor.preprocess.image_size)
    with atomic_path(dest) as tmp, torch.no_grad():
        traced = torch.jit.trace(graph, (x,), check_trace=False)
        torch.jit.save(traced, str(tmp))
    return Path(dest)


def quantize_onnx(src: Path, dest: Path, mode: str, calibration: np.ndarray | None = None) -> Path:
    """An int8 copy of the float ONNX graph ``src``, written as ``dest``.

    Args:
        src: a graph written by ``write_onnx``.
        dest: where the quantized graph goes.
        mode: ``int8_dynamic`` (weights int8, activations quantized per batch) or ``int8_static``
            (QDQ, per-channel weights, activation ranges calibrated on ``calibration``).
        calibration: ``uint8 [N, 3, S, S]`` training images (``int8_static`` only).

    Returns:
        ``dest``.

    Raises:
        ExportError: ``int8_static`` without calibration images.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    check_name("quantization", mode, [q for q in QUANTIZATIONS if q != "none"])
    with atomic_path(dest) as tmp:
        prepared = tmp.with_name(tmp.name + ".pre.onnx")
        try:
            quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
            if mode == "int8_dynamic":
                quantize_dynamic(str(prepared), str(tmp), weight_type=QuantType.QInt8)
            else:
                if calibration is None or len(calibration) == 0:
                    raise ExportError("int8_static quantization needs calibration images")

                class _Reader(CalibrationDataReader):
                    def __init__(self, images: np.ndarray, batch: int = 8) -> None:
                        self.batches = iter([images[i : i + batch] for i in range(0, len(images), batch)])

                    def get_next(self) -> dict[str, np.ndarray] | None:
                        b = next(self.batches, None)
                        return None if b is None else {INPUT_NAME: np.ascontiguousarray(b)}

                quantize_static(
                    str(prepared), str(tmp), _Reader(calibration), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax,
                    # The ensemble's averaging, softmax and temperature stay float.
                    op_types_to_quantize=["Conv", "MatMul", "Gemm"],
                    extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
                )
        finally:
            prepared.unlink(missing_ok=True)
    return Path(dest)
