"""One fine-tune and one predict benchmark on a GPU, in well under 5 minutes; prints throughput.

Checks the GPU paths of issue #4 end to end: bf16 autocast (fp16 + GradScaler where bf16 is
missing), channels_last, the decoded images on the device once, the frozen-prefix cache on the
device, and the ensemble's shared prefix at prediction. Run on a machine with CUDA:

    python -m benchmarks.gpu_check            # exits 2 when there is no CUDA device
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bench_train import BACKBONE, spec_for, write_folder
from models.artifact import load_predictor, save_artifact
from models.data import load_folder
from models.training import train
from models.transforms import normalize_batch
from models.zoo import preprocess_for
from service.sample_data import ANIMAL_CLASSES


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing measured")
        return 2
    name = torch.cuda.get_device_name(0)
    print(f"# {name}, torch {torch.__version__}, bf16 {torch.cuda.is_bf16_supported()}")
    pre = preprocess_for(BACKBONE, args.size)
    with tempfile.TemporaryDirectory() as tmp:
        root = write_folder(Path(tmp) / "animals", args.per_class)
        data = load_folder(root, list(ANIMAL_CLASSES), args.size, pre.interpolation, cache_dir=None)
        n_train = int(len(data.images) * 0.8)
        for label, fields in (
            ("full fine-tune", {"freeze": {"mode": "none"}}),
            ("partial FT, cached prefix (4 views)", {"freeze": {"mode": "first_n", "stages": 7}}),
            ("partial FT, no cache", {"freeze": {"mode": "first_n", "stages": 7}, "cache": {"mode": "off"}}),
        ):
            spec = spec_for(args.size, args.epochs, **fields)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            result = train(data, spec, device="cuda")
            torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            print(
                f"{label:<38} {n_train * args.epochs / seconds:8.0f} train images/s "
                f"({seconds:.1f} s, {result.amp}, val acc {result.val_acc:.3f}, "
                f"cache {result.applied['members'][0]['cache']['path']})"
            )
        spec = spec_for(args.size, 1, freeze={"mode": "first_n", "stages": 7}, ensemble={"members": 3})
        result = train(data, spec, device="cuda")
        predictor = load_predictor(save_artifact(result, spec, Path(tmp) / "model"), device="cuda")
        x = normalize_batch(data.images[:64], predictor.preprocess, "cuda")
        with torch.inference_mode():
            predictor.model(x)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            reps = 20
            for _ in range(reps):
                predictor.model(x)
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        print(f"{'predict, 3-member ensemble, batch 64':<38} {64 * reps / seconds:8.0f} images/s "
              f"(shared prefix groups {predictor.model.shared_groups()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
