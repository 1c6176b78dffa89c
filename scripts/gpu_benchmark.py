"""A short SimCLR run on a GPU: images/s, estimated model FLOP utilisation, and kNN top-1.

    python scripts/gpu_benchmark.py --train /data/cifar10/train --test /data/cifar10/test \\
        --config configs/cifar10_resnet18.yaml --epochs 3 --out runs/gpu-bench [--compile]

It runs the real ``pretrain`` (in-memory images, batched kornia augmentation on the device, bf16
autocast, channels-last), then a kNN (k=200, T=0.1) of the exported backbone on the test set,
and writes ``gpu_benchmark.json`` with the figures. The same script runs on a CPU at a tiny
size, which is how the test suite checks it (``--device cpu --set ...``).

FLOP utilisation: FLOPs of one forward+backward of the model on a batch, counted with
``torch.utils.flop_counter``, times steps per second, over ``--peak-tflops`` (default: the
dense bf16 peak of an H100/H200 SXM, 989 TFLOP/s).
"""

from __future__ import annotations

import json
import sys
from datetime import date
from pathlib import Path

import torch

from ssl_pretrain.config import load_config
from ssl_pretrain.data import open_source
from ssl_pretrain.engine.hardware import cpu_name
from ssl_pretrain.methods import build_model
from ssl_pretrain.train import pretrain, resolve_device

import benchmarking


def flops_per_step(cfg, device: torch.device) -> float:
    """FLOPs of one forward + backward of the configured method on a batch of view pairs."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(cfg).to(device)
    size = cfg.augment.input_size
    views = [torch.randn(cfg.train.batch_size, 3, size, size, device=device) for _ in range(2)]
    with FlopCounterMode(display=False) as counter:
        model(views).backward()
    return float(counter.get_total_flops())


def knn_top1(backbone_path: Path, train: str, test: str, device: torch.device) -> float:
    from linear_probe.embeddings import extract_embeddings
    from linear_probe.knn import knn_classify, topk_accuracy
    from ssl_pretrain.checkpoint import load_backbone
    from ssl_pretrain.augment.transforms import build_eval_transform

    backbone, info = load_backbone(backbone_path)
    transform = build_eval_transform(info.input_size, info.mean, info.std)
    memory = extract_embeddings(backbone.to(device), open_source(train, labelled=True), transform, 512, device)
    queries = extract_embeddings(backbone, open_source(test, labelled=True), transform, 512, device)
    num_classes = int(max(memory.labels.max(), queries.labels.max())) + 1
    scores = knn_classify(memory.features, memory.labels, queries.features, num_classes, k=200, temperature=0.1)
    return topk_accuracy(scores, queries.labels, 1)


def epoch_rates(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["images_per_s"] for r in records if "loss_mean" in r]


def main(argv=None) -> int:
    parser = benchmarking.argument_parser(__doc__)
    parser.add_argument("--train", required=True, help="labelled training images (image-folder layout)")
    parser.add_argument("--test", required=True, help="labelled test images")
    parser.add_argument("--config", default="configs/cifar10_resnet18.yaml")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", default="runs/gpu-benchmark")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    benchmarking.add_settings(parser)
    args = parser.parse_args(argv)

    overrides = [f"data.source={args.train}", f"train.epochs={args.epochs}", f"train.device={args.device}",
                 f"train.compile={str(args.compile).lower()}", *args.overrides]
    cfg = load_config(args.config, overrides)
    device = resolve_device(cfg.train.device)
    backbone_path, train_seconds = benchmarking.timed(pretrain, cfg, args.out, overwrite=True, progress=False)
    rates = epoch_rates(Path(args.out))
    images_per_epoch = len(open_source(args.train)) // cfg.train.batch_size * cfg.train.batch_size
    steady = rates[-1]  # the first epoch pays for compilation and warm-up
    flops = flops_per_step(cfg, device)
    achieved = flops * steady / cfg.train.batch_size
    result = {
        "date": str(date.today()), "device": torch.cuda.get_device_name() if device.type == "cuda" else cpu_name(),
        "machine": benchmarking.machine(),
        "torch": str(torch.__version__), "config": args.config, "overrides": overrides, "epochs": args.epochs,
        "train_seconds": round(train_seconds, 1), "images_per_s_by_epoch": [round(r, 1) for r in rates],
        "flops_per_image_pair_step": flops / cfg.train.batch_size, "achieved_tflops": achieved / 1e12,
        "mfu": achieved / (args.peak_tflops * 1e12),
        "knn_top1": knn_top1(backbone_path, args.train, args.test, device),
        "estimated_minutes_for_200_epochs": 200 * images_per_epoch / steady / 60,
    }
    (Path(args.out) / "gpu_benchmark.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
