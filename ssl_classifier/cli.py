"""``ssl-finetune``, ``ssl-predict``, ``ssl-export``: thin command lines over
``train.train_classifier``, ``predict.predict_files`` and ``export.export_classifier``.

Bad input ends in one line on stderr (``PROG: error: ...``) and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from ssl_pretrain.errors import SSLError

# Each command imports its own stage inside its function: ssl-predict then starts without the
# training stack (linear_probe, faiss) and ssl-finetune without the ONNX exporter.


def _run(prog: str, body: Callable[[], int]) -> int:
    """``body()``, with expected failures as one line and status 2."""
    try:
        return body()
    except SSLError as error:
        print(f"{prog}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def _logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(message)s")


# ---------------------------------------------------------------------------------------------
# ssl-finetune


def finetune_parser() -> argparse.ArgumentParser:
    from ssl_classifier.train import BALANCING, HEAD_INITS, MODE_CHOICES, VALIDATIONS, FinetuneSettings

    defaults = FinetuneSettings()
    parser = argparse.ArgumentParser(
        prog="ssl-finetune", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Train a classifier from a pretrained backbone and a few labels; save it as "
        "classifier.safetensors + classifier.json in --out (run it with ssl-predict, export it with ssl-export).")
    parser.add_argument("--checkpoint", required=True, help="run folder, backbone.safetensors or checkpoints/last.pt")
    parser.add_argument("--train", required=True, help="labelled images: class subfolders, a 'path,label' CSV/text "
                        "file, builtin:digits:train, cifar10:ROOT")
    parser.add_argument("--val", help="labelled validation images to choose mode and epochs on (counted in the labels "
                        "used; default: cross-validation inside --train)")
    parser.add_argument("--test", help="labelled test images, scored once with the chosen epoch (optional)")
    parser.add_argument("--out", required=True, help="model folder to write")
    parser.add_argument("--mode", choices=MODE_CHOICES, default=defaults.mode, help="linear: frozen backbone + trained "
                        "head (fast, robust with very few labels); finetune: the whole network with a new head (better "
                        "with hundreds of labels per class; linear-probe's fine-tuning); auto: the better of "
                        "the two on held-out labels (--validation)")
    parser.add_argument("--validation", choices=VALIDATIONS, default=defaults.validation, help="what mode and epochs "
                        "are chosen on: cv = stratified folds of the labelled images, then a refit on all of them; "
                        "pool = --val-fraction held out (those labels train nothing); none = nothing held out, every "
                        "epoch of --epochs (settings chosen elsewhere, e.g. by a linear-probe report)")
    parser.add_argument("--cv-folds", type=int, default=defaults.cv_folds, help="folds of --validation cv")
    parser.add_argument("--finetune-cv-folds", type=int, default=defaults.finetune_cv_folds,
                        help="folds fine-tuning trains to choose its epochs (each is a training run)")
    parser.add_argument("--head-init", choices=HEAD_INITS, default=defaults.head_init, help="finetune: random = "
                        "a new head, every layer at --lr (linear-probe's fine-tuning); probe = train the head on frozen "
                        "features first, then the backbone at --lr x 0.1 (LP-FT)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--labels-per-class", type=int, help="use only N labelled images per class (simulate a budget)")
    budget.add_argument("--label-fraction", type=float, help="use only this share of each class's labels")
    parser.add_argument("--val-fraction", type=float, default=defaults.val_fraction,
                        help="with --validation pool: share of each class held out to choose on")
    parser.add_argument("--balance", choices=BALANCING, default=defaults.balance, help="class-weighted loss: auto "
                        "turns it on when the largest class has 1.5x the images of the smallest")
    parser.add_argument("--epochs", type=int, help="epoch budget (default: 100 linear, 30 finetune); with held-out "
                        "labels the best epoch is chosen within it")
    parser.add_argument("--lr", type=float, help="SGD learning rate of the head (default: 0.1 linear, 0.05 finetune, 0.01 "
                        "finetune after --head-init probe)")
    parser.add_argument("--backbone-lr-scale", type=float, default=defaults.backbone_lr_scale,
                        help="finetune: the backbone's learning rate is lr times this (default: 1 with a random "
                        "head, 0.1 with --head-init probe)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--input-size", type=int, help="input side in pixels (default: the backbone's; 224 with --arch)")
    parser.add_argument("--arch", help="read --checkpoint as a torchvision/timm state dict (.pth with weights_only=True, "
                        "or .safetensors) of this backbone (resnet18, resnet50...): start from ImageNet weights")
    flips = parser.add_mutually_exclusive_group()
    flips.add_argument("--no-flip", dest="flip", action="store_false", default=None,
                       help="no horizontal flips when fine-tuning (digits, text; default: as pretraining did)")
    flips.add_argument("--flip", dest="flip", action="store_true", help="flip even where pretraining did not")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--device", default=defaults.device, help="auto (CUDA, then MPS, then CPU), cpu, cuda...")
    parser.add_argument("--num-workers", type=int, default=defaults.num_workers, help="data-loading processes")
    parser.add_argument("--overwrite", action="store_true", help="replace a classifier already in --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or log")
    return parser


def _format_metrics(metrics: dict | None) -> str:
    if not metrics:
        return "–"
    parts = [f"top-1 {100 * metrics['top1']:.1f}%", f"balanced accuracy {100 * metrics['balanced_accuracy']:.1f}%",
             f"macro-F1 {100 * metrics['macro_f1']:.1f}%"]
    if metrics.get("roc_auc") is not None:
        parts.append(f"ROC AUC {metrics['roc_auc']:.3f}")
    return ", ".join(parts)


def finetune_main(argv: list[str] | None = None) -> int:
    from ssl_classifier.train import FinetuneSettings, train_classifier

    args = finetune_parser().parse_args(argv)
    _logging(args.quiet)

    def body() -> int:
        settings = FinetuneSettings(
            mode=args.mode, labels_per_class=args.labels_per_class, label_fraction=args.label_fraction,
            validation=args.validation, cv_folds=args.cv_folds, finetune_cv_folds=args.finetune_cv_folds,
            head_init=args.head_init, val_fraction=args.val_fraction, balance=args.balance, epochs=args.epochs, lr=args.lr,
            backbone_lr_scale=args.backbone_lr_scale, batch_size=args.batch_size, input_size=args.input_size,
            arch=args.arch,
            hflip=args.flip, seed=args.seed, device=args.device, num_workers=args.num_workers,
            progress=not args.quiet, overwrite=args.overwrite)
        result = train_classifier(args.checkpoint, args.train, args.out, val=args.val, test=args.test,
                                  settings=settings)
        info, training = result.info, result.info.training
        epochs = (f"best epoch {training['best_epoch']} of {training['epochs_run']}" if "best_epoch" in training
                  else f"{training['epochs']} epochs")
        print(f"\n{info.mode} classifier, {info.num_classes} classes, {training['labels_used']} labels used "
              f"({training['n_train']} trained on), {epochs}, {result.seconds:.0f} s")
        protocol = training["validation"]
        if info.validation:
            print(f"  validation ({training['n_val']} images): {_format_metrics(info.validation)}")
        elif training.get("validation_balanced_accuracy") is not None:
            print(f"  cross-validated inside the labels ({protocol.get('rule')}): balanced accuracy "
                  f"{100 * training['validation_balanced_accuracy']:.1f}%")
        if info.test:
            print(f"  test: {_format_metrics(info.test)}")
        print(f"  saved: {result.model_dir}/classifier.safetensors, classifier.json")
        return 0

    return _run("ssl-finetune", body)


# ---------------------------------------------------------------------------------------------
# ssl-predict


def predict_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ssl-predict", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Run a classifier saved by ssl-finetune on images; one row per image (unreadable images get "
        "a row with their error). Exit status 1 only when no image could be read.")
    parser.add_argument("inputs", nargs="+", help="image files, folders (recursive), .txt lists of paths, or .csv "
                        "lists of path[,label] (with labels, accuracy is reported)")
    parser.add_argument("--model", required=True, help="model folder written by ssl-finetune")
    parser.add_argument("--out", default="predictions.csv", help="output file")
    parser.add_argument("--format", choices=("csv", "jsonl"), help="default: from --out's suffix (.jsonl), else csv")
    parser.add_argument("--top-k", type=int, default=5, help="labels and probabilities per image")
    parser.add_argument("--runtime", choices=("auto", "openvino", "onnxruntime", "torch"), default="auto",
                        help="auto: the fastest installed for the model folder (openvino, else onnxruntime, on the "
                        "ONNX file from ssl-export; torch where there is none); the run says which it took")
    parser.add_argument("--precision", choices=("auto", "int8", "fp32"), default="auto",
                        help="auto: the int8 file where ssl-export --quantize int8 wrote one, else fp32")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, help="decoding threads (default: the machine's cores, at most 8)")
    parser.add_argument("--threads", type=int, help="inference threads (default: the runtime's own)")
    parser.add_argument("--device", default="cpu", help="torch runtime: cpu, cuda, cuda:1, mps, auto")
    parser.add_argument("--quiet", action="store_true")
    return parser


def predict_main(argv: list[str] | None = None) -> int:
    from ssl_classifier.predict import Classifier, predict_files

    args = predict_parser().parse_args(argv)
    _logging(args.quiet)

    def body() -> int:
        fmt = args.format or ("jsonl" if args.out.endswith(".jsonl") else "csv")
        classifier = Classifier.load(args.model, runtime=args.runtime, device=args.device, threads=args.threads,
                                     precision=args.precision)
        summary = predict_files(classifier, args.inputs, args.out, fmt, args.top_k, args.batch_size, args.workers,
                                progress=not args.quiet)
        rate = summary.images / summary.seconds if summary.seconds > 0 else 0.0
        print(f"{summary.images} images ({summary.errors} unreadable, listed with their error) -> {summary.out} "
              f"in {summary.seconds:.1f} s ({rate:.0f} images/s, {classifier.runtime} {classifier.precision})")
        if summary.labelled:
            print(f"accuracy on the {summary.labelled} labelled images: {100 * summary.correct / summary.labelled:.1f}%")
        if summary.images and summary.readable == 0:
            print("ssl-predict: error: none of the images could be read", file=sys.stderr)
            return 1
        if not summary.images:
            print("ssl-predict: error: no images found in the inputs", file=sys.stderr)
            return 1
        return 0

    return _run("ssl-predict", body)


# ---------------------------------------------------------------------------------------------
# ssl-export


def export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ssl-export", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Export a classifier saved by ssl-finetune to ONNX (dynamic batch, opset 18) or TorchScript; "
        "the export's logits are checked against PyTorch's before it is written.")
    parser.add_argument("--model", required=True, help="model folder written by ssl-finetune")
    parser.add_argument("--format", choices=("onnx", "torchscript"), default="onnx")
    parser.add_argument("--out", help="output file (default: classifier.onnx / classifier.torchscript.pt in --model; "
                        "with --quantize, the int8 file, default classifier.int8.onnx)")
    parser.add_argument("--quantize", choices=("int8",),
                        help="also write a static int8 ONNX file, kept only if its accuracy on held-out labelled "
                        "images is within 1 point of fp32's (ssl-predict then runs it by default)")
    parser.add_argument("--calibration", metavar="DATA",
                        help="images whose activations set the int8 ranges (a few hundred are read; default: "
                        "the images the classifier was trained on)")
    parser.add_argument("--check-data", metavar="DATA",
                        help="labelled held-out images to compare int8 with fp32 (default: the --test set given "
                        "to ssl-finetune)")
    parser.add_argument("--quiet", action="store_true")
    return parser


def export_main(argv: list[str] | None = None) -> int:
    from ssl_classifier.export import export_classifier

    args = export_parser().parse_args(argv)
    _logging(args.quiet)

    def body() -> int:
        result = export_classifier(args.model, args.format, args.out, quantize=args.quantize,
                                   calibration=args.calibration, check_data=args.check_data)
        check = ("not checked (onnxruntime not installed)" if result.max_abs_diff is None
                 else f"max |logit difference| vs PyTorch {result.max_abs_diff:.1e}")
        print(f"{result.format} -> {result.path} ({check})")
        if result.int8_path is not None:
            print(f"int8 -> {result.int8_path} ({result.int8_check.describe()})")
        return 0

    return _run("ssl-export", body)
