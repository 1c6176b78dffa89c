"""``ssl-pretrain``: a thin command line over ``ssl_pretrain.train.pretrain``.

It is where pretraining and evaluation meet: the command hands the loop evaluation's online kNN
monitor (``linear_probe.monitor.KnnMonitor``), so the loop itself never imports evaluation code.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

import yaml

from ssl_pretrain.config import load_config
from ssl_pretrain.diagnostics import DivergenceError
from ssl_pretrain.engine.run_folder import setup_console_logging
from ssl_pretrain.errors import SSLError
from ssl_pretrain.methods import METHODS
from ssl_pretrain.models.backbones import BACKBONES
from ssl_pretrain.train import pretrain

EPILOG = """examples:
  ssl-pretrain --config configs/demo_digits.yaml --out runs/demo
  ssl-pretrain --data /data/images --config configs/cifar10_cpu.yaml --out runs/mine --epochs 50
  ssl-pretrain --data /data/images --config configs/cifar10_cpu.yaml --out runs/15min --time-budget 15
  ssl-pretrain --data cifar10:/data/cifar --config configs/cifar10_resnet18.yaml --out runs/c10 \\
      --set optim.lr=0.3 --set simclr.temperature=0.2
  ssl-pretrain --data /data/images --config configs/cifar10_cpu.yaml --out runs/byol --method byol
  ssl-pretrain ... --resume          # continue a killed run (starts fresh if it has no checkpoint)
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ssl-pretrain",
        description="Self-supervised pretraining on unlabelled images (SimCLR, MoCo, BYOL, SimSiam, Barlow "
        "Twins, VICReg, DINO): writes checkpoints and an exported backbone (backbone.safetensors) into --out.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", help="a folder of images (searched recursively, class subfolders "
                        "ignored), a .txt file of image paths, builtin:digits[:train|:test], or "
                        "cifar10:ROOT / cifar100:ROOT / stl10:ROOT (torchvision layout on disk)")
    parser.add_argument("--config", help="a YAML preset from configs/ (default: built-in defaults, "
                        "the CIFAR-10 ResNet-18 recipe for small images)")
    parser.add_argument("--out", help="run folder: config.yaml, metrics.jsonl, train.log, "
                        "checkpoints/, backbone.safetensors")
    parser.add_argument("--method", help="the pretraining method (method; default simclr; see --list-methods); "
                        "its settings are under the section of its name, e.g. --set byol.momentum=0.996")
    parser.add_argument("--epochs", type=int, help="number of epochs (train.epochs)")
    parser.add_argument("--time-budget", type=float, metavar="MINUTES", help="train for this many "
                        "minutes of wall clock, decoding included: the learning-rate decay ends and the "
                        "run stops there; --epochs becomes a cap (train.time_budget_minutes)")
    parser.add_argument("--batch-size", type=int, help="images per step; the learning rate scales "
                        "with it (train.batch_size; SimCLR gains from large batches: 256 to 4096)")
    parser.add_argument("--seed", type=int, help="seed for weights, data order and augmentation")
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:1, mps (default: auto)")
    parser.add_argument("--init", metavar="WEIGHTS", help="start the backbone from these weights (model.init): "
                        "a torchvision/timm .pth state dict, a .safetensors file, one of our runs, or "
                        "torchvision:MODEL[:WEIGHTS] (downloaded once into torch's hub cache where online)")
    parser.add_argument("--resume", action="store_true", help="continue from the run folder's last "
                        "checkpoint; with none yet, start fresh (safe to always pass in job scripts)")
    parser.add_argument("--overwrite", action="store_true", help="delete a run already in --out and "
                        "start again (without it, an existing run is never overwritten)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key, e.g. --set optim.lr=0.3 (repeatable)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--list-backbones", action="store_true", help="list backbone names and exit")
    parser.add_argument("--list-methods", action="store_true", help="list pretraining methods and exit")
    return parser


def resolve_overrides(args: argparse.Namespace) -> list[str]:
    """The named flags are shorthands for config keys; they win over --set."""
    shorthands = {"data": "data.source", "epochs": "train.epochs", "batch_size": "train.batch_size",
                  "seed": "train.seed", "device": "train.device",
                  "time_budget": "train.time_budget_minutes", "init": "model.init",
                  "method": "method"}
    overrides = list(args.overrides)
    for flag, key in shorthands.items():
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}")
    return overrides


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list_backbones:
        for name, spec in sorted(BACKBONES.items()):
            print(f"{name:12s} {spec.feature_dim:5d}-d  {spec.description}")
        return 0
    if args.list_methods:
        for name, module in METHODS.items():
            print(f"{name:12s} {module.SUMMARY}")
        return 0
    try:
        cfg = load_config(args.config, resolve_overrides(args))
        if args.print_config:
            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
            return 0
        if not args.out:
            parser.error("--out is required (the run folder)")
        setup_console_logging()
        monitor = None
        # only rank 0 monitors (torchrun sets RANK): the others need not open the monitor's data
        if cfg.monitor.train and cfg.monitor.val and os.environ.get("RANK", "0") == "0":
            # evaluation code (faiss, scikit-learn: seconds of start-up) imported only when asked for,
            # and handed to the loop, which never imports it
            from linear_probe.monitor import KnnMonitor

            monitor = KnnMonitor(cfg)
        pretrain(cfg, args.out, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress,
                 monitor=monitor)
    except DivergenceError as error:
        logging.getLogger("ssl_pretrain").error("diverged: %s", error)
        print(f"ssl-pretrain: error: {error}", file=sys.stderr)
        return 3
    except SSLError as error:
        print(f"ssl-pretrain: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ssl-pretrain: interrupted; continue with the same command and --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
