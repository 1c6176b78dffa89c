"""``ssl-pretrain``: a thin command line over ``ssl_pretrain.train.pretrain``.

It is where pretraining and evaluation meet: the command hands the loop evaluation's online kNN
monitor (``linear_probe.monitor.KnnMonitor``), so the loop itself never imports evaluation code.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable, Optional, Sequence

import torch
import yaml

from ssl_pretrain import precision
from ssl_pretrain.config import Config, load_config
from ssl_pretrain.diagnostics import DivergenceError
from ssl_pretrain.engine.distributed import launched_distributed
from ssl_pretrain.engine.run_folder import setup_console_logging
from ssl_pretrain.errors import SSLError
from ssl_pretrain.methods import METHODS
from ssl_pretrain.models.backbones import BACKBONES
from ssl_pretrain.presets import parse_override
from ssl_pretrain.recipe import DataRecipe, advise, choose_recipe, saved_recipe
from ssl_pretrain.survey import survey_data, survey_init, survey_machine
from ssl_pretrain.train import pretrain

EPILOG = """examples:
  ssl-pretrain --data /data/images --out runs/mine   # settings chosen from the images and the machine
  ssl-pretrain --data /data/images --print-config    # what it would choose, and why, without training
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
    parser.add_argument("--config", help="a YAML preset from configs/ (default: a recipe chosen from a sample "
                        "of the images, the machine and --init: input size, network, augmentations, batch, "
                        "on a CPU a 15-minute budget; --print-config shows each choice and why; --set wins)")
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
    parser.add_argument("--no-survey", action="store_true", help="without --config: the built-in defaults "
                        "(the CIFAR-10 ResNet-18 GPU recipe) instead of a recipe chosen from the data")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config (and, "
                        "without --config, the survey and the reason for each choice) and exit")
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


def recipe_from_data(args: argparse.Namespace, overrides: list[str]) -> tuple[Optional[DataRecipe], Optional[dict]]:
    """Without ``--config``: ``(recipe, base settings)`` chosen from a survey of the data, the
    machine and ``--init`` (``ssl_pretrain.recipe``); on ``--resume``, the saved run's own choices
    (``(None, settings)``), so that the run continues as it started. ``(None, None)`` with a preset
    or ``--no-survey``."""
    if args.config is not None or args.no_survey:
        return None, None
    if args.resume and args.out:
        saved = saved_recipe(args.out)
        if saved is not None:
            return None, saved  # {} for a run started without a recipe: the defaults, as then
    user = {".".join(parts): value for parts, value in map(parse_override, overrides)}
    # every rank of a torchrun job must choose alike: no rank times anything (fp32 unless cached)
    probe = cpu_preset_probe() if not launched_distributed() else (None, "")
    # the survey's precision answer is told in the recipe's reasons; the run logs its own once it
    # holds its folder (a run refused at the lock prints its one-line error and nothing else)
    hardware_log = logging.getLogger("ssl_pretrain.engine.hardware")
    level = hardware_log.level
    hardware_log.setLevel(logging.WARNING)
    try:
        machine = survey_machine(str(user.get("train.device") or "auto"), *probe)
    finally:
        hardware_log.setLevel(level)
    init = survey_init(str(user["model.init"])) if user.get("model.init") else None
    data = None
    if user.get("data.source"):
        limits = Config.model_fields["data"].default
        data = survey_data(str(user["data.source"]), download=bool(user.get("data.download", False)),
                           max_pixels=int(user.get("data.max_image_pixels") or limits.max_image_pixels))
    recipe = choose_recipe(data, machine, init, user)
    return recipe, recipe.settings()


def cpu_preset_probe() -> tuple[Callable[[], dict[str, float]], str]:
    """``(probe, workload)``: the timing of configs/cifar10_cpu.yaml's network in fp32 and bf16 -
    the question its ``no_fast_bf16`` variant asks, and its cached answer - for a CPU where only a
    timing tells whether bf16 is the fast precision (AVX512-BF16 without AMX)."""
    cfg = load_config(None, ["model.backbone=smallconv", "model.small_stem=false", "train.batch_size=128"])
    return (lambda: precision.probe_precisions(cfg, torch.device("cpu"), True)), precision.probe_workload(cfg, True)


def print_config(cfg, recipe: Optional[DataRecipe]) -> None:
    """The resolved config as YAML, after the survey and its choices as comments (still a valid preset)."""
    if recipe is not None:
        lines = recipe.lines() + [f"warning: {text}" for text in cfg.survey_advice]
        print("\n".join(f"# {line}" for line in lines))
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")


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
    if not args.out and not args.print_config:
        parser.error("--out is required (the run folder)")
    try:
        setup_console_logging()  # the survey may time the machine first: its log lines show
        overrides = resolve_overrides(args)
        recipe, base = recipe_from_data(args, overrides)
        cfg = load_config(args.config, overrides, base)
        if recipe is not None:
            cfg.survey_advice = advise(recipe, cfg, timed=not launched_distributed())
        if args.print_config:
            print_config(cfg, recipe)
            return 0
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
