"""An exported ONNX classifier -> int8 (``ssl-export --format onnx --quantize int8``).

Static quantisation with onnxruntime's tools (``onnxruntime.quantization.quantize_static``):
QDQ format, weights as signed int8 per output channel in 7 bits (``reduce_range``), activations
as unsigned int8 with ranges calibrated (min/max) on a few hundred of the user's own images. The
linear head (the graph's ``Gemm``/``MatMul``) stays in float: it is a sliver of the compute, and
a head reading small differences between features loses whole classes to int8 rounding
(BENCHMARKS.md, "Classifier latency").

7-bit weights: on CPUs without VNNI (AVX2 only) the int8 kernels multiply u8 x s8 pairs into
16-bit sums (``vpmaddubsw``), which saturate with full-range weights; the same file then
classifies worse there than on the CPU it was checked on. With 7-bit weights no pair sum can
saturate, so the accuracy checked at export holds on every CPU (onnxruntime's advice for non-VNNI
machines; measured in BENCHMARKS.md).

The result is then checked, not trusted: the fp32 and the int8 file both classify held-out
labelled images, and the int8 file is kept only when its top-1 and balanced accuracy are within
``MAX_ACCURACY_DROP`` of fp32's. A file that misses is quantised again, first with percentile
ranges, then with the first convolution (the stem, which reads the raw pixels) kept in float,
each checked in turn (``quantize_checked``, ``RECIPES``).

Any ONNX runtime reads the file (onnxruntime, OpenVINO); what int8 buys depends on the CPU's
integer instructions (VNNI, AMX): see BENCHMARKS.md, "Classifier latency".
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from ssl_classifier.model import ClassifierError, ClassifierInfo
from ssl_classifier.preprocess import to_input
from ssl_pretrain.data import DataError, UnreadableImage, open_source

log = logging.getLogger(__name__)

MAX_ACCURACY_DROP = 0.01
"""Largest loss of top-1 or balanced accuracy (absolute, 1 point) accepted from int8."""
CALIBRATION_IMAGES = 300
"""Images whose activations set the int8 ranges; a few hundred is what onnxruntime's examples use."""
CHECK_IMAGES = 2000
"""At most this many held-out images score fp32 against int8 (an even spread over the set)."""


@dataclass
class QuantizationCheck:
    """fp32 and int8 figures on the same held-out images."""

    images: int
    top1_fp32: float
    top1_int8: float
    balanced_fp32: float
    balanced_int8: float
    agreement: float  # share of images where both files give the same label
    calibration_images: int
    skipped: int  # unreadable files among the calibration and check images
    recipe: str = ""  # which of RECIPES made the file ("": the first, every convolution int8, min/max ranges)

    def acceptable(self) -> bool:
        return (self.top1_fp32 - self.top1_int8 <= MAX_ACCURACY_DROP
                and self.balanced_fp32 - self.balanced_int8 <= MAX_ACCURACY_DROP)

    def describe(self) -> str:
        return (f"top-1 {100 * self.top1_fp32:.1f}% fp32 vs {100 * self.top1_int8:.1f}% int8, balanced accuracy "
                f"{100 * self.balanced_fp32:.1f}% vs {100 * self.balanced_int8:.1f}% on {self.images} held-out images"
                + (f" ({self.recipe})" if self.recipe else ""))


def _spread(count: int, limit: int) -> np.ndarray:
    """Up to ``limit`` positions spread evenly over ``range(count)`` (every class of a sorted folder)."""
    if count <= limit:
        return np.arange(count)
    return np.unique(np.linspace(0, count - 1, limit).round().astype(int))


def _open(spec: str, role: str, labelled: bool):
    try:
        return open_source(spec, labelled=labelled)
    except DataError as error:
        raise ClassifierError(f"{role} images: {error}") from None


def _inputs(source, positions: np.ndarray, size: int) -> Iterator[tuple[int, np.ndarray]]:
    """``(position, (3, S, S) float32 in [0, 1])`` of each readable image, as the classifier sees it."""
    for position in positions:
        try:
            yield int(position), to_input(source.load(int(position)), size)
        except UnreadableImage:
            continue


def calibration_batches(spec: str, size: int, count: int = CALIBRATION_IMAGES) -> tuple[list[np.ndarray], int]:
    """``([(1, 3, S, S) float32 ...], skipped)``: the calibration inputs of ``count`` images of ``spec``."""
    source = _open(spec, "calibration", labelled=False)
    positions = _spread(len(source), count)
    batches = [pixels[None] for _, pixels in _inputs(source, positions, size)]
    if not batches:
        raise ClassifierError(f"calibration images: none of the {len(positions)} images tried in {spec} could be read")
    return batches, len(positions) - len(batches)


class _Reader:
    """onnxruntime's ``CalibrationDataReader`` protocol over prepared batches."""

    def __init__(self, name: str, batches: list[np.ndarray]):
        self._feeds = iter([{name: batch} for batch in batches])

    def get_next(self):
        return next(self._feeds, None)

    def rewind(self):  # not needed by min/max calibration, part of the protocol
        pass


def quantize_onnx(fp32_path: Path, int8_path: Path, batches: list[np.ndarray], float_stem: bool = False,
                  overrides: dict | None = None) -> None:
    """Write the int8 QDQ version of ``fp32_path`` to ``int8_path``, calibrated on ``batches``
    (``float_stem``: the graph's first convolution stays in float too; ``overrides``: other
    ``quantize_static`` settings, for ``scripts/bench_int8_recipes.py`` to compare recipes)."""
    try:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError:
        raise ClassifierError("int8 export needs onnxruntime (pip install onnxruntime)") from None

    import onnx

    with tempfile.TemporaryDirectory() as folder:
        prepared = Path(folder) / "prepared.onnx"
        # shape inference and graph clean-up first, as onnxruntime recommends before quantising
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        graph = onnx.load(str(prepared)).graph
        in_float = [node.name for node in graph.node if node.op_type in ("Gemm", "MatMul")]
        if float_stem:
            in_float += [node.name for node in graph.node if node.op_type == "Conv"][:1]
        settings = dict(quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=in_float)
        settings.update(overrides or {})
        quantize_static(str(prepared), str(int8_path), _Reader(graph.input[0].name, batches), **settings)


RECIPES = (
    ("", {}),
    ("percentile ranges", {"overrides": {"calibrate_method": "Percentile"}}),
    ("stem convolution in float", {"float_stem": True}),
)
"""``quantize_checked``'s tries, in order of the file's speed: every convolution int8 with min/max
ranges; the same with ranges at the 99.999th percentile (outliers no longer stretch the scale);
the stem convolution in float (BENCHMARKS.md, "AVX2 only, and int8 with 7-bit weights")."""


def quantize_checked(fp32_path: Path, int8_path: Path, batches: list[np.ndarray],
                     images: CheckImages) -> tuple[QuantizationCheck, int]:
    """Quantise ``fp32_path`` into ``int8_path`` and check it on ``images``; a file that loses
    more than ``MAX_ACCURACY_DROP`` is made again with the next of ``RECIPES`` and checked again.
    ``(check of the file left in int8_path, unreadable check images)``; the caller decides what a
    check that still fails means (``ssl-export`` refuses the file)."""
    from onnxruntime.quantization import CalibrationMethod

    for attempt, (recipe, options) in enumerate(RECIPES):
        options = dict(options)
        if "overrides" in options:
            options["overrides"] = {key: getattr(CalibrationMethod, value) if key == "calibrate_method" else value
                                    for key, value in options["overrides"].items()}
        quantize_onnx(fp32_path, int8_path, batches, **options)
        check, skipped = check_int8(fp32_path, int8_path, images)
        check.recipe = recipe
        if check.acceptable():
            break
        if attempt + 1 < len(RECIPES):
            log.info("int8 (%s): %s; again with %s", recipe or "min/max ranges", check.describe(), RECIPES[attempt + 1][0])
    return check, skipped


def _logits(path: Path, inputs: np.ndarray, batch_size: int = 64) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: inputs[start:start + batch_size]})[0]
                           for start in range(0, len(inputs), batch_size)])


@dataclass
class CheckImages:
    """The held-out labelled images, decoded once for every recipe's check."""

    inputs: np.ndarray  # (N, 3, S, S) float32, as the classifier sees them
    truth: np.ndarray  # the classifier's class index of each
    skipped: int  # unreadable files among those tried


def check_images(spec: str, info: ClassifierInfo, limit: int = CHECK_IMAGES) -> CheckImages:
    """Up to ``limit`` labelled images of ``spec``, spread over it, decoded for the check.

    Raises:
        ClassifierError: a source without labels, labels the classifier does not know, or no readable image.
    """
    source = _open(spec, "check", labelled=True)
    labels = getattr(source, "labels", None)
    if labels is None:
        raise ClassifierError(f"check images: {spec} has no labels (a folder with a subfolder per class, or a path,label list)")
    names = list(source.classes)
    unknown = sorted(set(names) - set(info.classes))
    if unknown:
        raise ClassifierError(f"check images: classes {', '.join(unknown[:8])} are not the classifier's")
    to_model = np.array([info.classes.index(name) for name in names])
    positions = _spread(len(source), limit)
    pairs = list(_inputs(source, positions, info.input_size))
    if not pairs:
        raise ClassifierError(f"check images: none of the {len(positions)} images tried in {spec} could be read")
    return CheckImages(inputs=np.stack([pixels for _, pixels in pairs]),
                       truth=to_model[np.asarray(labels)[[position for position, _ in pairs]]],
                       skipped=len(positions) - len(pairs))


def check_int8(fp32_path: Path, int8_path: Path, images: CheckImages) -> tuple[QuantizationCheck, int]:
    """Score both files on ``images``; ``(check, unreadable check images)``."""
    from sklearn.metrics import balanced_accuracy_score

    truth = images.truth
    fp32, int8 = _logits(fp32_path, images.inputs).argmax(1), _logits(int8_path, images.inputs).argmax(1)
    check = QuantizationCheck(
        images=len(truth), top1_fp32=float(np.mean(fp32 == truth)), top1_int8=float(np.mean(int8 == truth)),
        balanced_fp32=float(balanced_accuracy_score(truth, fp32)), balanced_int8=float(balanced_accuracy_score(truth, int8)),
        agreement=float(np.mean(fp32 == int8)), calibration_images=0, skipped=0)
    return check, images.skipped


def _recorded_data(info: ClassifierInfo, role: str) -> str | None:
    """The data spec ``classifier.json`` recorded for ``role`` (``train``, ``test``) at training."""
    return ((info.training or {}).get("data") or {}).get(role)


def default_check_source(info: ClassifierInfo) -> str:
    """The held-out labelled set the classifier was scored on at training (``--test``), if any.

    Raises:
        ClassifierError: none was recorded; the user must name one (``--check-data``).
    """
    test = _recorded_data(info, "test")
    if not test:
        raise ClassifierError("int8 export checks accuracy on held-out labelled images and none was recorded at "
                              "training (ssl-finetune --test): give them with --check-data DIR")
    return str(test)


def default_calibration_source(info: ClassifierInfo) -> str:
    """The images the classifier was trained on (what the user's camera or scanner produces)."""
    train = _recorded_data(info, "train")
    if not train:
        raise ClassifierError("no training images recorded in classifier.json to calibrate on: give --calibration DIR")
    return str(train)
