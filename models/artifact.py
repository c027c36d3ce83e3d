"""Saved models: ``model.safetensors`` + ``manifest.json`` in one folder, never a pickle.

``save_artifact`` writes into a temporary sibling folder and renames it into place, so a
crash never leaves a half-written model. ``load_predictor`` rebuilds every member from the
manifest (``create_backbone(..., weights='none')``) and loads the tensors with safetensors.
The manifest (``models.manifest``) also holds the evaluation ``report`` and the fitted
``temperature``, which the ``Predictor`` applies to the ensemble's averaged probabilities.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import safetensors.torch
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as tvf

from .ensemble import Ensemble
from .evaluation import scale_probs_torch
from .heads import HeadConfig, create_classifier
from .images import to_array
from .manifest import FORMAT, FORMAT_VERSION, MANIFEST_FILE, ArtifactError, manifest_for, read_manifest
from .results import TrainResult
from .runtime import PREDICT_RUNTIMES, inference_batch, resolve_device
from .spec import TrainSpec, check_name
from .transforms import normalize_batch, to_nchw_uint8
from .zoo import Preprocess

if TYPE_CHECKING:
    from .onnx_runtime import OnnxEnsemble

WEIGHTS_FILE = "model.safetensors"
# Test-time augmentation: the views whose ensemble probabilities are averaged.
#   none: the image as in training (shorter side resized to S, center crop S x S);
#   hflip: that plus its mirror image;
#   five_crop: shorter side resized to S / FIVE_CROP_PCT, then the four corner crops and the
#     center crop at S x S: each covers ~77% of the area, inside the zoom range that training's
#     RandomResizedCrop shows the model (scale >= crop_scale_min, 0.6 by default).
TTA_MODES = ("none", "hflip", "five_crop")
FIVE_CROP_PCT = 0.875


def save_artifact(
    result: TrainResult, spec: TrainSpec, dest: Path, *, overwrite: bool = True, owner: str = ""
) -> Path:
    """Save a trained ensemble as ``dest/model.safetensors`` + ``dest/manifest.json``.

    Tensors are keyed ``members.<i>.<state-dict key>``. Everything is written into a temporary
    sibling folder first and renamed to ``dest`` at the end; on any error the temporary folder
    is removed and ``dest`` is left as it was.

    Args:
        result: what ``train`` returned.
        spec: the recipe it was trained with (stored in the manifest).
        dest: the model folder to create.
        overwrite: replace an existing ``dest`` (a task that runs twice writes the same model);
            otherwise raise ``FileExistsError``.
        owner: goes into the temporary folders' names (``.<dest name>.<owner>.<random>.tmp``), so
            that what a killed writer left can be told apart (``workers.leftovers``).

    Returns:
        ``dest``.
    """
    dest = Path(dest)
    if dest.exists() and not overwrite:
        raise FileExistsError(f"model folder {dest} already exists")
    dest.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{dest.name}.{owner}." if owner else f".{dest.name}."
    tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=dest.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the model folder is read by the API process too
        tensors = {
            f"members.{i}.{k}": v.detach().cpu().contiguous()
            for i, m in enumerate(result.members)
            for k, v in m.state_dict.items()
        }
        safetensors.torch.save_file(
            tensors, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)}
        )
        with open(tmp / MANIFEST_FILE, "w", encoding="utf-8") as f:
            json.dump(manifest_for(result, spec), f, indent=2, allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        if dest.exists():
            # Move the old model aside first: the rename below needs the name free.
            old = Path(tempfile.mkdtemp(prefix=prefix, suffix=".old", dir=dest.parent))
            os.replace(dest, old / dest.name)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


class Predictor:
    """A loaded model: classes, preprocessing and an eval-mode ensemble.

    Attributes:
        classes: class names, in output order.
        preprocess: how input images are prepared (``to_array`` + ``normalize_batch``).
        manifest: the saved manifest.
        device: where the ensemble runs.
        model: the ``Ensemble``.
        temperature: applied to the averaged probabilities, ``softmax(log p / T)`` (1: unchanged).
        backend: when set (``use_onnx``), the forward passes run there instead of ``model``.
    """

    def __init__(
        self,
        model: Ensemble,
        classes: list[str],
        preprocess: Preprocess,
        manifest: dict[str, Any],
        device: torch.device,
        temperature: float = 1.0,
    ) -> None:
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a positive number, got {temperature}")
        self.model = model
        self.classes = classes
        self.preprocess = preprocess
        self.manifest = manifest
        self.device = device
        self.temperature = temperature
        self.backend: OnnxEnsemble | None = None

    @property
    def runtime(self) -> str:
        """``torch`` or ``onnxruntime``: what runs the forward passes."""
        return self.backend.name if self.backend is not None else "torch"

    def use_onnx(self, backend: OnnxEnsemble) -> Predictor:
        """Run the forward passes through ``backend`` (the same ensemble exported); returns ``self``."""
        self.backend = backend
        return self

    def prepare(self, images: list[Image.Image]) -> np.ndarray:
        """Images as the training cache stored them: ``uint8 [N, S, S, 3]``."""
        pre = self.preprocess
        return np.stack([to_array(img, pre.image_size, pre.interpolation) for img in images])

    def input_side(self, tta: str = "none") -> int:
        """The side each image is resized (shorter side) and center-cropped to before the views of ``tta``
        are cut from it: ``image_size``, or ``image_size / FIVE_CROP_PCT`` for ``five_crop``."""
        check_name("tta", tta, TTA_MODES)
        size = self.preprocess.image_size
        return round(size / FIVE_CROP_PCT) if tta == "five_crop" else size

    def views(self, images: list[Image.Image], tta: str = "none") -> list[torch.Tensor]:
        """The test-time-augmentation views of ``images``, each ``uint8 [N, S, S, 3]`` (see ``TTA_MODES``)."""
        side = self.input_side(tta)
        return self.views_of_arrays(np.stack([to_array(img, side, self.preprocess.interpolation) for img in images]),
                                    tta)

    def views_of_arrays(self, arrays: np.ndarray, tta: str = "none") -> list[torch.Tensor]:
        """The test-time-augmentation views of images already resized and cropped for ``tta``.

        The API decodes each upload straight to such an array (``models.images.decode_array`` at
        ``input_side(tta)``), so no full-size image outlives its own decoding.

        Args:
            arrays: ``uint8 [N, s, s, 3]`` with ``s = input_side(tta)``.
            tta: test-time augmentation, one of ``TTA_MODES``.

        Returns:
            One ``uint8 [N, S, S, 3]`` tensor per view, ``S`` being ``preprocess.image_size``.

        Raises:
            ValueError: arrays of another shape or dtype.
        """
        side = self.input_side(tta)
        if arrays.dtype != np.uint8 or arrays.ndim != 4 or arrays.shape[1:] != (side, side, 3):
            raise ValueError(f"tta={tta!r} needs uint8 [N, {side}, {side}, 3] arrays, got {arrays.dtype} "
                             f"{list(arrays.shape)}")
        x = torch.from_numpy(np.ascontiguousarray(arrays))
        if tta == "five_crop":
            size = self.preprocess.image_size
            crops = tvf.five_crop(to_nchw_uint8(x), [size, size])
            return [c.permute(0, 2, 3, 1) for c in crops]
        return [x, x.flip(2)] if tta == "hflip" else [x]

    def predict_proba(self, images: list[Image.Image], tta: str = "none") -> np.ndarray:
        """Class probabilities of the ensemble, temperature-scaled.

        Args:
            images: PIL images of any mode and size (e.g. from ``open_image``).
            tta: test-time augmentation, one of ``TTA_MODES``: the ensemble's averaged
                probabilities of every view are averaged, then the temperature is applied.

        Returns:
            ``float32 [N, C]``, rows summing to 1, columns in ``classes`` order.

        Raises:
            UnknownNameError: ``tta`` is not in ``TTA_MODES``.
        """
        check_name("tta", tta, TTA_MODES)
        if not images:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        return self.predict_proba_views(self.views(images, tta))

    def predict_proba_views(self, views: list[torch.Tensor]) -> np.ndarray:
        """Class probabilities of prepared views, temperature-scaled: the forward half of ``predict_proba``.

        The views of several requests with the same TTA mode can be concatenated along the first
        dimension and run at once; the API's micro-batcher does that.

        Args:
            views: what ``views`` returns: one ``uint8 [N, S, S, 3]`` tensor per TTA view, all of the
                same shape, ``S`` being ``preprocess.image_size``. The ensemble's probabilities of the
                views are averaged, then the temperature is applied.

        Returns:
            ``float32 [N, C]``, rows summing to 1, columns in ``classes`` order.

        Raises:
            ValueError: no views, or views of another shape or dtype than described.
        """
        if not views:
            raise ValueError("predict_proba_views needs at least one view")
        size = self.preprocess.image_size
        shape = tuple(views[0].shape)
        for v in views:
            if tuple(v.shape) != shape or v.dtype != torch.uint8 or shape[1:] != (size, size, 3):
                raise ValueError(
                    f"views must all be uint8 [N, {size}, {size}, 3] for this model, "
                    f"got {[(str(w.dtype), list(w.shape)) for w in views]}"
                )
        n = shape[0]
        if n == 0:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        out = []
        with torch.inference_mode():
            batch = inference_batch(self.device, self.preprocess.image_size, self.runtime)
            for start in range(0, n, batch):
                if self.backend is not None:
                    # Every view of the chunk in one run of the graph, then averaged here as below.
                    chunk = torch.cat([v[start : start + batch] for v in views]).permute(0, 3, 1, 2)
                    raw = torch.from_numpy(self.backend.ensemble_probs(chunk.numpy()))
                    out.append(scale_probs_torch(raw.view(len(views), -1, raw.shape[-1]).mean(dim=0),
                                                 self.temperature))
                    continue
                probs = torch.stack([
                    self.model(normalize_batch(v[start : start + batch], self.preprocess, self.device)).float()
                    for v in views
                ]).mean(dim=0)
                out.append(scale_probs_torch(probs, self.temperature).cpu())
        return torch.cat(out).numpy()

    def rank(self, probs: np.ndarray, top_k: int = 5) -> list[list[tuple[str, float]]]:
        """The ``top_k`` most probable classes of each row of ``probs``, most probable first.

        Args:
            probs: ``[N, C]`` probabilities, columns in ``classes`` order (``predict_proba``).
            top_k: how many classes per row (capped at the number of classes).

        Returns:
            Per row, ``[(class, probability), ...]`` sorted by decreasing probability.
        """
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        k = min(top_k, len(self.classes))
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return [[(self.classes[j], float(row[j])) for j in idx] for row, idx in zip(probs, order, strict=True)]

    def predict(
        self, images: list[Image.Image], top_k: int = 5, tta: str = "none"
    ) -> list[list[tuple[str, float]]]:
        """The ``top_k`` most probable classes of each image, most probable first.

        Args:
            images: PIL images.
            top_k: how many classes per image (capped at the number of classes).
            tta: test-time augmentation (``TTA_MODES``).

        Returns:
            Per image, ``[(class, probability), ...]`` sorted by decreasing probability.
        """
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        return self.rank(self.predict_proba(images, tta), top_k)


def load_predictor(
    path: Path, device: str | None = None, *, runtime: str = "torch", threads: int | None = None
) -> Predictor:
    """Load a model folder written by ``save_artifact``.

    Args:
        path: the model folder.
        device: ``cpu``, ``cuda``...; ``None`` or ``auto`` picks a GPU when there is one.
        runtime: ``torch``, or ``onnxruntime`` (on the CPU): the ensemble exported to ONNX on first
            load, cached in the model folder (``models.onnx_runtime.cached_onnx``). On a GPU the
            torch runtime is used whatever this says.
        threads: intra-op threads of the onnxruntime session (``None``: all cores).

    Returns:
        A ``Predictor`` in eval mode.

    Raises:
        ArtifactError: missing or unreadable files, unknown format, tensors that do not fit.
    """
    path = Path(path)
    manifest = read_manifest(path)
    preprocess = Preprocess.from_dict(manifest["preprocess"])
    try:
        members = [
            create_classifier(
                m["backbone"],
                weights="none",
                num_classes=int(m["num_classes"]),
                # Models saved before head options existed only have drop_rate.
                head=HeadConfig.from_dict({"drop_rate": float(m["drop_rate"]), **(m.get("head") or {})}),
                image_size=preprocess.image_size,
            )
            for m in manifest["members"]
        ]
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{path / MANIFEST_FILE}: cannot rebuild the members: {e}") from e
    model = Ensemble(
        members,
        input_norm=(preprocess.mean, preprocess.std),
        member_norms=[(m["mean"], m["std"]) for m in manifest["members"]],
    )
    try:
        tensors = safetensors.torch.load_file(str(path / WEIGHTS_FILE), device="cpu")
        model.load_state_dict(tensors, strict=True)
    except (OSError, RuntimeError, safetensors.SafetensorError) as e:
        raise ArtifactError(f"cannot load weights of {path}: {e}") from e
    temperature = manifest.get("temperature", 1.0)  # models saved before calibration: none
    if not (isinstance(temperature, int | float) and math.isfinite(temperature) and temperature > 0):
        raise ArtifactError(f"{path / MANIFEST_FILE}: temperature must be a positive number, got {temperature!r}")
    check_name("predict runtime", runtime, PREDICT_RUNTIMES)
    dev = resolve_device(device)
    model.to(dev).eval()
    predictor = Predictor(model, list(manifest["classes"]), preprocess, manifest, dev, float(temperature))
    if runtime == "onnxruntime" and dev.type == "cpu":
        from .onnx_runtime import OnnxEnsemble, cached_onnx

        predictor.use_onnx(OnnxEnsemble(cached_onnx(predictor, path, (MANIFEST_FILE, WEIGHTS_FILE)), threads=threads))
    return predictor
