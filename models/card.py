"""The model card (``README.md``) and the reader's files (``labels.json``, ``preprocess.json``) of a bundle.

Torch-free: everything comes from the model's manifest (and its stored report) and from what the
export measured (``models.bundle``).
"""

from __future__ import annotations

from typing import Any

from .images import RESAMPLE

# What the weakest classes section lists.
WEAK_CLASSES = 3


def preprocess_doc(manifest: dict[str, Any], model_file: str) -> dict[str, Any]:
    """``preprocess.json``: how to turn an image into the graph's input."""
    pre = manifest["preprocess"]
    size = int(pre["image_size"])
    return {
        "image_size": size,
        "resize": f"shorter side to {size} px (aspect kept, each side rounded, at least {size})",
        "interpolation": pre["interpolation"],
        "pil_resample": RESAMPLE[pre["interpolation"]].name,
        "crop": f"center {size} x {size} (offsets floor((w - {size}) / 2), floor((h - {size}) / 2))",
        "color": "RGB; EXIF orientation applied; transparency composited on white",
        "input": {"name": "images", "dtype": "uint8", "layout": "NCHW", "shape": ["batch", 3, size, size]},
        "normalization": {"inside_graph": model_file != "model.safetensors", "mean": pre["mean"], "std": pre["std"],
                          "formula": "(x / 255 - mean) / std"},
        "outputs": {
            "probabilities": "float32 [batch, classes], temperature-scaled, rows sum to 1, in labels.json order",
            "ensemble_probabilities": "float32 [batch, classes], the members' averaged softmax before the temperature",
        },
        "temperature": float(manifest.get("temperature", 1.0)),
    }


def onnx_example(model_file: str = "model.onnx") -> str:
    """Ten lines that run the bundle with onnxruntime, numpy and PIL only (the card's example)."""
    return f"""import json, numpy as np, onnxruntime as ort
from PIL import Image, ImageOps
pre, labels = json.load(open("preprocess.json")), json.load(open("labels.json"))
s, img = pre["image_size"], ImageOps.exif_transpose(Image.open("photo.jpg")).convert("RGB")
k = s / min(img.size)
img = img.resize((max(s, round(img.width * k)), max(s, round(img.height * k))), Image.Resampling[pre["pil_resample"]])
left, top = (img.width - s) // 2, (img.height - s) // 2
x = np.asarray(img.crop((left, top, left + s, top + s)), dtype=np.uint8).transpose(2, 0, 1)[None]
probs = ort.InferenceSession("{model_file}").run(["probabilities"], {{"images": x}})[0][0]
print(sorted(zip(probs.tolist(), labels), reverse=True)[:5])
"""


def _pct(x: Any) -> str:
    return "n/a" if x is None else f"{100 * float(x):.1f}%"


def _num(x: Any, digits: int = 4) -> str:
    return "n/a" if x is None else f"{float(x):.{digits}f}"


def model_card(manifest: dict[str, Any], export: dict[str, Any]) -> str:
    """The bundle's ``README.md``.

    Args:
        manifest: the model's manifest (with its ``report`` when it has one).
        export: what ``models.bundle.build_bundle`` measured: ``format``, ``quantization``, ``file``,
            ``fidelity``, ``int8`` (accuracy change), ``versions``.
    """
    report = manifest.get("report") or {}
    metrics = manifest.get("metrics") or {}
    spec = manifest.get("spec") or {}
    classes = list(manifest["classes"])
    members = manifest.get("members") or []
    split = report.get("split_counts") or {}
    lines = [f"# zoofit model: {len(classes)} classes, {len(members)}-member ensemble", ""]
    lines += ["## Data", "", "| class | train images | validation images |", "| --- | --- | --- |"]
    for c in classes:
        tr, va = (split.get(c) or [None, None])[:2]
        lines.append(f"| {c} | {'n/a' if tr is None else tr} | {'n/a' if va is None else va} |")
    lines += ["", "## Recipe", ""]
    backbones = ", ".join(f"{m['backbone']} ({m.get('served', 'raw')})" for m in members)
    lines.append(f"- members: {backbones}")
    lines.append(f"- input: {manifest['preprocess']['image_size']} px, {manifest['preprocess']['interpolation']}")
    for key in ("weights", "epochs", "batch_size", "freeze", "optimizer", "schedule", "augment", "ensemble"):
        if key in spec:
            lines.append(f"- {key}: `{spec[key]}`")
    ev = report.get("evaluation") or {}
    cal = report.get("calibration") or {}
    lines += ["", "## Validation", ""]
    lines.append(f"- top-1 accuracy: {_pct(metrics.get('val_acc'))} on {metrics.get('val_size', 'n/a')} images "
                 f"(members: {', '.join(_pct(a) for a in metrics.get('member_val_acc', []))})")
    for k, v in (ev.get("top_k_acc") or {}).items():
        if k != "1":
            lines.append(f"- top-{k} accuracy: {_pct(v)}")
    if cal:
        lines.append(f"- calibration: temperature {_num(cal.get('temperature'), 3)}; ECE "
                     f"{_num((cal.get('before') or {}).get('ece'))} before, {_num((cal.get('after') or {}).get('ece'))}"
                     f" after; NLL {_num((cal.get('before') or {}).get('nll'))} before, "
                     f"{_num((cal.get('after') or {}).get('nll'))} after")
    side = manifest["preprocess"]["image_size"]
    per_class = sorted(ev.get("per_class") or [], key=lambda c: (c.get("f1") or 0.0))
    if per_class:
        lines += ["", f"Weakest classes (lowest F1 on validation, {WEAK_CLASSES} at most):", "",
                  "| class | precision | recall | F1 | validation images |", "| --- | --- | --- | --- | --- |"]
        for c in per_class[:WEAK_CLASSES]:
            lines.append(f"| {c['label']} | {_num(c['precision'], 3)} | {_num(c['recall'], 3)} | {_num(c['f1'], 3)} "
                         f"| {c['support']} |")
    lines += [
        "", "## Intended use and limits", "",
        f"- Classifies an image into exactly one of the {len(classes)} classes above; it has no 'none of these' "
        "answer, so an image of anything else still gets one of them, often with high probability.",
        "- Trust the validation figures only for images like the training images (source, framing, lighting); "
        "the validation split is small and comes from the same upload.",
        "- Probabilities are temperature-calibrated on the validation split; use them to rank or to threshold, "
        "and re-check the threshold on your own data.",
        "- Not for decisions about people without a human review.",
        "", "## Export", "",
        f"- format: {export['format']}"
        + (f", quantization: {export['quantization']}" if export.get("quantization", "none") != "none" else ""),
        f"- file: `{export['file']}`; input `images` uint8 RGB NCHW `[batch, 3, {side}, {side}]` "
        "(normalisation is inside the graph); outputs `probabilities` and "
        "`ensemble_probabilities` (see preprocess.json)",
    ]
    if export["format"] == "safetensors":
        lines[-1] = ("- files: `model.safetensors` (tensors `members.<i>.<key>`) and `manifest.json`: load with "
                     "zoofit's `models.artifact.load_predictor` on the unzipped folder")
    fid = export.get("fidelity") or {}
    if fid:
        lines.append(f"- checked against the service's predictor on {fid['images']} images: max |probability "
                     f"difference| {fid['max_abs_diff']:.2e}, top-1 agreement {_pct(fid['top1_agreement'])}")
    q = export.get("int8") or {}
    if q:
        lines.append(f"- int8 accuracy change on the validation split ({q['images']} images): top-1 "
                     f"{_pct(q['fp32_top1'])} float32 -> {_pct(q['int8_top1'])} int8 "
                     f"({q['delta_points']:+.2f} points)")
    lines.append(f"- versions: {export.get('versions', {})}")
    lines.append("- `SHA256SUMS` lists the sha256 of every other file (`sha256sum -c SHA256SUMS`).")
    if export["format"] == "onnx":
        lines += ["", "## Run it (onnxruntime, numpy and Pillow; no torch)", "", "```python",
                  onnx_example(export["file"]).rstrip(), "```"]
    elif export["format"] == "torchscript":
        lines += ["", "## Run it (torch)", "", "```python", "import torch",
                  f"model = torch.jit.load('{export['file']}')",
                  "probs, _ = model(images)  # images: torch.uint8 [N, 3, S, S] as in preprocess.json", "```"]
    return "\n".join(lines) + "\n"
