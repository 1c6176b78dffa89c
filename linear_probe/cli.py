"""``linear-probe``: a thin command line over ``linear_probe.evaluate.evaluate``.

Every flag maps onto a field of ``EvaluationSettings``; bad input ends in one line on stderr,
``linear-probe: error: ...``, and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

from linear_probe.crossval import PROTOCOLS
from linear_probe.evaluate import evaluate
from linear_probe.inputs import METHODS, EvaluationSettings
from linear_probe.knn import DEFAULT_NPROBE, EXACT_BELOW, INDEXES, IVF_FROM_QUERIES, KNN_PROTOCOLS
from linear_probe.splits import LABEL_SELECTIONS, parse_label_budgets
from ssl_pretrain.errors import SSLError

PROG = "linear-probe"
DEFAULTS = EvaluationSettings()


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default only when it has one worth showing (not None, not off)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Evaluate a pretrained backbone on labelled images with kNN, logistic regression, "
        "a linear probe and few-label fine-tuning, each beside its baselines (random weights, raw "
        "pixels, training from scratch). Writes results.json, results.md and plots into --out.",
        formatter_class=_HelpFormatter,
    )
    data = parser.add_argument_group("inputs and outputs")
    data.add_argument("--checkpoint", required=True, help="run folder, backbone.safetensors or checkpoints/last.pt; "
                      "architecture, input size and normalisation are read from it; or torchvision:MODEL[:WEIGHTS] "
                      "(downloaded once into torch's hub cache where online)")
    data.add_argument("--arch", help="read --checkpoint as a torchvision/timm state dict (.pth, loaded with "
                      "weights_only=True, or .safetensors) of this backbone (resnet18, resnet50...): ImageNet features "
                      "as a row beside your own pretraining")
    data.add_argument("--input-size", type=int, default=224, help="with --arch: the image size the network is fed")
    data.add_argument("--train", required=True, help="labelled training images: a folder with one subfolder per "
                      "class, builtin:digits:train, or cifar10:ROOT")
    data.add_argument("--test", help="labelled test images, same classes as --train (else use --test-fraction)")
    data.add_argument("--test-fraction", type=float, help="without --test: hold out this stratified share of --train "
                      "as the test set, e.g. 0.2")
    data.add_argument("--val", help="labelled validation images to choose k, C and epochs on (default: chosen by "
                      "cross-validation inside each label budget); the report counts them in the budget")
    data.add_argument("--val-fraction", type=float, default=DEFAULTS.val_fraction,
                      help="with --validation pool: hold out this stratified share of --train for validation")
    data.add_argument("--out", required=True, help="output folder (results, plots, cached embeddings)")
    protocol = parser.add_argument_group("protocol")
    protocol.add_argument("--methods", default=",".join(DEFAULTS.methods),
                          help=f"comma-separated, from {', '.join(METHODS)}")
    protocol.add_argument("--label-fractions", default="0.01,0.1,1.0",
                          help="labels per run: fractions of each class (0.01 = 1%%) or Npc for N per class "
                          "(5pc); every method runs at every budget, giving a label-efficiency curve")
    protocol.add_argument("--label-selection", choices=LABEL_SELECTIONS, default=DEFAULTS.label_selection,
                          help="how each budget's labelled images are chosen: random = class-balanced sample (reads the "
                          "labels: the papers' protocol); uniform = a uniform pick of the pool (what a user "
                          "without labels can do: compare a selection with this); "
                          "typiclust, kcenter, kmeans = picked from the pretrained embeddings without labels "
                          "(fraction x pool or N x classes images, as a user choosing what to label would), "
                          "seeded by the seed; baselines use the same images")
    protocol.add_argument("--validation", choices=PROTOCOLS, default=DEFAULTS.validation,
                          help="cv: kNN's k and T, logistic C and epochs chosen by stratified k-fold cross-validation "
                          "over each budget's labelled images, then refit on all of them (what a user with that "
                          "budget can do); pool: chosen on --val-fraction of the whole labelled pool, outside the "
                          "budget (the older protocol: optimistic at few labels, marked so in results.md)")
    protocol.add_argument("--cv-folds", type=int, default=DEFAULTS.cv_folds,
                          help="folds of the cross-validation; feature methods score folds until 2,000 held-out "
                          "predictions, fine-tuning scores --finetune-cv-folds")
    protocol.add_argument("--finetune-cv-folds", type=int, default=DEFAULTS.finetune_cv_folds,
                          help="folds fine-tuning (and the scratch baseline) scores to choose its epochs: each is a "
                          "training run (1: a 20%% hold-out inside the budget)")
    protocol.add_argument("--seeds", type=int, default=DEFAULTS.seeds,
                          help="label subsets and initialisations per budget; the table shows mean ± std")
    protocol.add_argument("--no-baselines", action="store_true",
                          help="skip the random-init, pixel and scratch baselines (numbers then mean little)")
    _add_method_options(parser)
    _add_run_options(parser)
    return parser


def _add_method_options(parser: argparse.ArgumentParser) -> None:
    knn = parser.add_argument_group("kNN (weighted votes, cosine similarity)")
    knn.add_argument("--knn-protocol", choices=sorted(KNN_PROTOCOLS),
                     help="fix k and T instead of choosing them on held-out labels: instdisc: k=200, T=0.1 "
                     "(InstDisc, lightly benchmarks); dino: k=20, T=0.07")
    knn.add_argument("--knn-k", type=int, help="neighbours that vote, fixed (default: chosen from 5-200 on held-out "
                     "labels, as C is)")
    knn.add_argument("--knn-t", type=float, help="temperature of the exp(similarity / T) votes, fixed (default: chosen "
                     "from 0.03-0.2)")
    knn.add_argument("--knn-backend", choices=("auto", "torch", "faiss"), default=DEFAULTS.knn_backend,
                     help="auto: faiss on the CPU, torch on a GPU; torch: matrix product + top-k; faiss: IndexFlatIP")
    knn.add_argument("--knn-index", choices=INDEXES, default=DEFAULTS.knn_index,
                     help="exact; ivf (faiss IndexIVFFlat, 4*sqrt(N) lists) or hnsw (IndexHNSWFlat): approximate, "
                     "their recall@k against exact search is measured and written to results.json; auto: exact "
                     f"below {EXACT_BELOW:,} training features or {IVF_FROM_QUERIES:,} queries, ivf from there")
    knn.add_argument("--knn-nprobe", type=int, help=f"IVF lists scanned per query (default {DEFAULT_NPROBE}): more "
                     "means higher recall and slower search")
    linear = parser.add_argument_group("linear probe and fine-tuning (epochs chosen on held-out labels)")
    linear.add_argument("--linear-epochs", type=int, default=DEFAULTS.linear_epochs,
                        help="budget of the linear probe; the best validation epoch is kept")
    linear.add_argument("--linear-lr", type=float, default=DEFAULTS.linear_lr, help="SGD learning rate of the linear probe")
    linear.add_argument("--linear-augment", action="store_true", help="train the linear probe on augmented images "
                        "through the frozen backbone (slower) instead of on the cached embeddings")
    flips = linear.add_mutually_exclusive_group()
    flips.add_argument("--no-flip", dest="flip", action="store_false", default=None,
                       help="no random horizontal flips when training on images (fine-tuning, scratch, "
                       "--linear-augment): for digits and text, where a mirror image is another glyph "
                       "(default: as pretraining did)")
    flips.add_argument("--flip", dest="flip", action="store_true", help="flip even where pretraining did not")
    linear.add_argument("--finetune-epochs", type=int, default=DEFAULTS.finetune_epochs,
                        help="budget of fine-tuning and of the scratch baseline; early stopping on validation")
    linear.add_argument("--finetune-max-fraction", type=float, default=DEFAULTS.finetune_max_fraction,
                        help="fine-tune (and train the scratch baseline) only at label budgets up to this share "
                        "of the labelled pool (default 0.1: the few-label budgets; 1.0: at every budget, "
                        "a full supervised training per seed)")
    linear.add_argument("--finetune-lr", type=float, default=DEFAULTS.finetune_lr,
                        help="SGD learning rate of fine-tuning and of the scratch baseline (default: each "
                        "chooses from 0.05 and 0.01 on validation inside the label budget)")


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    run = parser.add_argument_group("running")
    run.add_argument("--device", default=DEFAULTS.device, help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1...")
    run.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size,
                     help="images per batch when extracting embeddings; features per step of the linear probe")
    run.add_argument("--train-batch-size", type=int, default=DEFAULTS.train_batch_size,
                     help="images per step when training on images (fine-tuning, scratch, --linear-augment): "
                     "small enough that few labels still give several steps per epoch")
    run.add_argument("--num-workers", type=int, default=DEFAULTS.num_workers, help="data-loading processes")
    run.add_argument("--split-seed", type=int, default=DEFAULTS.split_seed,
                     help="seed of the validation / test split and of the random-init baseline's weights")
    run.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    run.add_argument("--no-leak-check", action="store_true",
                     help="do not count the test images that are exact or near copies of training images")
    run.add_argument("--no-cache", action="store_true", help="always extract embeddings, never reuse --out/embeddings")
    run.add_argument("--quiet", action="store_true", help="no progress bars and no progress log")


def settings_from_args(args: argparse.Namespace) -> EvaluationSettings:
    """Turn parsed flags into settings (raises ``EvaluationError`` for bad values)."""
    protocol = KNN_PROTOCOLS.get(args.knn_protocol)
    return EvaluationSettings(
        methods=tuple(method.strip() for method in args.methods.split(",") if method.strip()),
        label_budgets=parse_label_budgets(args.label_fractions),
        seeds=args.seeds,
        label_selection=args.label_selection,
        validation=args.validation,
        cv_folds=args.cv_folds,
        finetune_cv_folds=args.finetune_cv_folds,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        split_seed=args.split_seed,
        knn_k=args.knn_k if args.knn_k is not None else (protocol.k if protocol else None),
        knn_temperature=args.knn_t if args.knn_t is not None else (protocol.temperature if protocol else None),
        knn_backend=args.knn_backend,
        knn_index=args.knn_index,
        knn_nprobe=args.knn_nprobe,
        linear_epochs=args.linear_epochs,
        linear_lr=args.linear_lr,
        linear_augment=args.linear_augment,
        hflip=args.flip,
        finetune_epochs=args.finetune_epochs,
        finetune_lr=args.finetune_lr,
        finetune_max_fraction=args.finetune_max_fraction,
        batch_size=args.batch_size,
        train_batch_size=args.train_batch_size,
        device=args.device,
        num_workers=args.num_workers,
        baselines=not args.no_baselines,
        plots=not args.no_plots,
        leak_check=not args.no_leak_check,
        cache=not args.no_cache,
        progress=not args.quiet,
    )


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0, or 2 for unusable input)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(message)s")
    try:
        settings = settings_from_args(args)
        result = evaluate(args.checkpoint, args.train, args.out, test=args.test, val=args.val, settings=settings,
                          arch=args.arch, input_size=args.input_size)
    except SSLError as error:
        message = " ".join(str(error).split("\n"))
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    print(f"\nTest top-1 (%) by method and label budget; results in {result.out_dir}/results.md\n")
    print(result.table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
