"""A saved classifier on new images: ``Classifier.load(dir).predict(images)`` and ``ssl-predict``.

The runtimes (torch, or the ONNX file from ``ssl-export`` in OpenVINO or onnxruntime, fp32 or
int8; ``auto`` takes the fastest installed) are in ``ssl_classifier.runtimes``. All take the same
preprocessed input (``ssl_classifier.preprocess``), so they agree to float (or int8) rounding.

One camera frame at a time: ``predict`` on a single ``(H, W, 3)`` uint8 array or on JPEG bytes
reuses one input buffer and the runtime's session, and decodes a JPEG at reduced size where the
input size allows (DCT scaling).

Files are streamed: paths are decoded by worker threads a few batches ahead of the network (Pillow's
decoders and the runtimes release the GIL), and each batch's rows are written before the next is
read, so memory stays bounded by ``batch_size x (workers + prefetch)`` images whatever the number
of files. An unreadable file becomes a row with its error, never a crash or a silent skip.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from ssl_classifier.model import ONNX_INT8_FILE, ClassifierError, ClassifierInfo, read_info, resolve_model_dir
from ssl_classifier.preprocess import as_pil, resize_and_crop, to_input
from ssl_classifier.runtimes import choose_runtime, onnx_runner, openvino_runner, torch_runner
from ssl_pretrain.data import UnreadableImage
from ssl_pretrain.engine.devices import usable_cores

log = logging.getLogger(__name__)

@dataclass
class Prediction:
    """One image's answer: the top label and probability, the next ``top_k - 1``, or an error."""

    path: str
    label: str | None = None
    probability: float | None = None
    top: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of ``(B, C)`` logits, in float64 (probabilities that sum to 1)."""
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


class Classifier:
    """A trained classifier, ready to run on images.

    Example:
        >>> classifier = Classifier.load("models/xray")
        >>> classifier.predict(["scan1.png", pil_image])[0].label
    """

    def __init__(self, info: ClassifierInfo, run: Callable[[np.ndarray], np.ndarray], runtime: str,
                 precision: str = "fp32"):
        self.info, self._run, self.runtime, self.precision = info, run, runtime, precision
        self._frame = np.empty((1, 3, info.input_size, info.input_size), dtype=np.float32)  # one frame's input

    @classmethod
    def load(cls, model_dir: str | Path, runtime: str = "auto", device: str = "cpu",
             threads: int | None = None, precision: str = "auto") -> "Classifier":
        """Load a model folder written by ``ssl-finetune`` (and ``ssl-export``).

        Args:
            runtime: ``auto`` (the fastest installed for the folder's files: ``choose_runtime``),
                ``openvino``, ``onnxruntime`` or ``torch``.
            precision: ``auto`` (int8 where an int8 file was exported), ``int8`` or ``fp32``.

        Raises:
            ClassifierError: missing, truncated or foreign files, a runtime that is not installed (one line).
        """
        model_dir = resolve_model_dir(model_dir)
        info = read_info(model_dir)
        runtime, onnx = choose_runtime(model_dir, runtime, precision)
        if runtime == "torch":
            run = torch_runner(model_dir, device, threads)
        else:
            run = (openvino_runner if runtime == "openvino" else onnx_runner)(onnx, threads)
        used = "int8" if onnx is not None and onnx.name == ONNX_INT8_FILE else "fp32"
        log.info("runtime: %s, %s%s", runtime, used, f" ({onnx.name})" if onnx is not None else "")
        return cls(info, run, runtime, used)

    @property
    def classes(self) -> list[str]:
        return list(self.info.classes)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """``(B, 3, S, S)`` float32 inputs in [0, 1] -> ``(B, C)`` logits."""
        return self._run(np.ascontiguousarray(batch, dtype=np.float32))

    def preprocess(self, image: Any) -> np.ndarray:
        """A path, PIL image, array or tensor -> ``(3, S, S)`` float32 (raises ``UnreadableImage``)."""
        return to_input(as_pil(image, min_side=self.info.input_size), self.info.input_size)

    def predict_proba(self, images: Iterable[Any], batch_size: int = 64) -> np.ndarray:
        """``(N, C)`` class probabilities; raises ``UnreadableImage`` for an image it cannot read."""
        inputs = [self.preprocess(image) for image in images]
        if not inputs:
            return np.zeros((0, len(self.classes)))
        return np.concatenate([softmax(self.logits(np.stack(inputs[start:start + batch_size])))
                               for start in range(0, len(inputs), batch_size)])

    def predict(self, images: Any, top_k: int = 5, batch_size: int = 64) -> list[Prediction]:
        """Predictions for PIL images, paths, encoded image bytes, arrays or tensors (one, or a
        list/batch of them).

        An image that cannot be read gets a ``Prediction`` with its ``error`` set.
        """
        if isinstance(images, (bytes, bytearray, memoryview)) or (
                isinstance(images, np.ndarray) and images.ndim == 3 and images.shape[-1] == 3):
            return [self.predict_frame(images, top_k)]
        if hasattr(images, "ndim"):  # an array or tensor: one image, or a batch along the first axis
            images = list(images) if images.ndim == 4 else [images]
        elif isinstance(images, (str, Path, Image.Image)):
            images = [images]
        items = [(_name(image, index), image) for index, image in enumerate(images)]
        return list(self._predict_items(items, top_k, batch_size, workers=0))

    def predict_frame(self, frame: Any, top_k: int = 5) -> Prediction:
        """One camera frame (an ``(H, W, 3)`` uint8 RGB array, JPEG bytes, or anything ``predict``
        takes) -> its ``Prediction``, through the one input buffer this classifier keeps: no pool,
        no thread, no batch assembly per call. JPEG bytes decode at reduced size where the input
        size allows."""
        size = self.info.input_size
        try:
            pixels = resize_and_crop(as_pil(frame, min_side=size), size)
        except UnreadableImage as error:
            return Prediction(_name(frame, 0), error=str(error) or "unreadable")
        np.multiply(pixels.transpose(2, 0, 1), np.float32(1.0 / 255.0), out=self._frame[0], casting="unsafe")
        probabilities = softmax(self._run(self._frame))
        return next(_rows([_name(frame, 0)], probabilities, [None], self.classes, min(top_k, len(self.classes))))

    def _predict_items(self, items: Iterable[tuple[str, Any]], top_k: int, batch_size: int,
                       workers: int) -> Iterator[Prediction]:
        for names, pixels, errors in _prepared_batches(items, self.info.input_size, batch_size, workers):
            probabilities = softmax(self.logits(_to_float(pixels))) if len(pixels) else None
            yield from _rows(names, probabilities, errors, self.classes, top_k)


def _name(image: Any, index: int) -> str:
    return str(image) if isinstance(image, (str, Path)) else f"image-{index}"



def _to_float(pixels: np.ndarray) -> np.ndarray:
    """``(B, S, S, 3)`` uint8 -> contiguous ``(B, 3, S, S)`` float32 in [0, 1], in one pass."""
    out = np.empty((pixels.shape[0], 3, *pixels.shape[1:3]), dtype=np.float32)
    np.multiply(pixels.transpose(0, 3, 1, 2), np.float32(1.0 / 255.0), out=out, casting="unsafe")
    return out


def _prepare_chunk(chunk: list[tuple[str, Any]], size: int):
    """``(names, (n_readable, S, S, 3) uint8, error or None per image)`` of one batch.

    uint8: a quarter of the memory a float batch would hold while it waits for the network
    (converting in the decoding threads gained nothing in a trial).
    """
    names, pixels, errors = [], np.empty((len(chunk), size, size, 3), dtype=np.uint8), []
    count = 0
    for name, image in chunk:
        names.append(name)
        try:
            pixels[count] = resize_and_crop(as_pil(image, min_side=size), size)
            count += 1
            errors.append(None)
        except UnreadableImage as error:
            errors.append(str(error) or "unreadable")
    return names, pixels[:count], errors


def _chunks(items: Iterable[tuple[str, Any]], size: int) -> Iterator[list[tuple[str, Any]]]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _prepared_batches(items: Iterable[tuple[str, Any]], size: int, batch_size: int, workers: int,
                      prefetch: int = 2):
    """``_prepare_chunk`` of every batch, in order.

    With ``workers``, batches are decoded by that many threads, up to ``workers + prefetch``
    batches ahead of the network. Threads, not processes: Pillow's decoders and resizing release
    the GIL, and so does the network, so decoding overlaps the forward; worker processes cost
    the imports (torch: seconds) in every worker where they cannot fork (macOS, Windows, or after
    OpenVINO has started its thread pool) and a copy of every batch (BENCHMARKS.md, "Classifier
    latency").
    """
    if workers <= 0:
        yield from (_prepare_chunk(chunk, size) for chunk in _chunks(items, batch_size))
        return
    pool, pending = ThreadPoolExecutor(workers, thread_name_prefix="ssl-predict-decode"), deque()
    try:
        for chunk in _chunks(items, batch_size):
            pending.append(pool.submit(_prepare_chunk, chunk, size))
            if len(pending) > workers + prefetch:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:  # also when stopped early (an error downstream, Ctrl-C): batches not started are dropped
        pool.shutdown(cancel_futures=True)


def _rows(names, probabilities, errors, classes, top_k) -> Iterator[Prediction]:
    row = 0
    for name, error in zip(names, errors):
        if error is not None:
            yield Prediction(name, error=error)
            continue
        order = np.argsort(-probabilities[row], kind="stable")[:top_k]
        top = [(classes[index], float(probabilities[row, index])) for index in order]
        yield Prediction(name, top[0][0], top[0][1], top, None)
        row += 1


# ---------------------------------------------------------------------------------------------
# Files in, a CSV or JSONL file out

LIST_SUFFIXES = (".txt", ".csv", ".lst")


def expand_inputs(inputs: Iterable[str]) -> Iterator[tuple[str, str | None]]:
    """``(path, true label or None)`` for every image named by ``inputs``: image files, folders
    (searched recursively), ``.txt`` lists (a path per line) and ``.csv`` lists (``path[,label]``,
    paths relative to the list). A path that does not exist is passed on: it becomes an error row.
    """
    from ssl_pretrain.data import IMAGE_EXTENSIONS, read_labelled_list, read_path_list, scan_images

    for spec in inputs:
        path = Path(spec)
        if path.is_dir():
            yield from ((image, None) for image in scan_images(path, IMAGE_EXTENSIONS))
        elif path.is_file() and path.suffix.lower() == ".csv" and _has_labels(path):
            yield from zip(*read_labelled_list(path))
        elif path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
            yield from ((image, None) for image in read_path_list(path))
        else:
            yield spec, None


def _has_labels(csv_path: Path) -> bool:
    """Whether the first data line of a CSV list has a second (label) column."""
    with open(csv_path, newline="", errors="replace") as file:
        for row in csv.reader(file):
            if row and "".join(row).strip() and not row[0].lstrip().startswith("#"):
                if [cell.strip().lower() for cell in row[:2]] in (["path", "label"], ["file", "label"]):
                    continue
                return len(row) >= 2
    return False


@dataclass
class PredictionSummary:
    images: int = 0
    errors: int = 0
    labelled: int = 0
    correct: int = 0
    seconds: float = 0.0
    out: Path | None = None

    @property
    def readable(self) -> int:
        return self.images - self.errors


class _Writer:
    """Rows to CSV (``path,label,probability,label_2,probability_2,...,error[,true_label]``) or
    JSONL, into a temporary file renamed over ``out`` at the end: never half-written."""

    def __init__(self, out: Path, fmt: str, top_k: int, with_truth: bool):
        import tempfile

        self.out, self.fmt, self.top_k, self.with_truth = out, fmt, top_k, with_truth
        out.parent.mkdir(parents=True, exist_ok=True)
        handle, self.temp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        self.file = os.fdopen(handle, "w", newline="", encoding="utf-8", errors="backslashreplace")
        if fmt == "csv":
            self.csv = csv.writer(self.file)
            extra = [f"{kind}_{rank}" for rank in range(2, top_k + 1) for kind in ("label", "probability")]
            self.csv.writerow(["path", "label", "probability", *extra, "error"] + (["true_label"] if with_truth else []))

    def write(self, prediction: Prediction, truth: str | None) -> None:
        if self.fmt == "jsonl":
            record = {"path": prediction.path, "label": prediction.label, "probability": prediction.probability,
                      "top_k": [{"label": label, "probability": p} for label, p in prediction.top],
                      "error": prediction.error}
            if self.with_truth:
                record["true_label"] = truth
            self.file.write(json.dumps(record) + "\n")
            return
        cells = [prediction.path, prediction.label or "", _fmt(prediction.probability)]
        for rank in range(1, self.top_k):
            label, p = prediction.top[rank] if rank < len(prediction.top) else ("", None)
            cells += [label, _fmt(p)]
        self.csv.writerow(cells + [prediction.error or ""] + ([truth or ""] if self.with_truth else []))

    def commit(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.temp, self.out)

    def abort(self) -> None:
        self.file.close()
        Path(self.temp).unlink(missing_ok=True)


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.6f}"


def check_labels(truths: Iterable[str | None], classes: list[str]) -> None:
    """True labels of a labelled list must be classes of the model (else scores mean nothing)."""
    unknown = sorted({truth for truth in truths if truth is not None} - set(classes))
    if unknown:
        raise ClassifierError(f"labels not among the model's classes: {', '.join(unknown[:8])} "
                              f"(the model knows {', '.join(classes[:12])})")


def predict_files(classifier: Classifier, inputs: list[str], out: str | Path, fmt: str = "csv", top_k: int = 5,
                  batch_size: int = 64, workers: int | None = None, progress: bool = True) -> PredictionSummary:
    """Predict every image named by ``inputs`` and write one row each into ``out``.

    Raises:
        ClassifierError: a labelled list whose labels the model does not know (before writing).
    """
    import time

    from tqdm.auto import tqdm

    if fmt not in ("csv", "jsonl"):
        raise ClassifierError(f"unknown format '{fmt}': choose csv or jsonl")
    if top_k < 1:
        raise ClassifierError(f"top-k must be at least 1, got {top_k}")
    top_k = min(top_k, len(classifier.classes))
    listed = list(expand_inputs(inputs))  # paths only: a million names are ~100 MB, images stream
    check_labels((truth for _, truth in listed), classifier.classes)
    with_truth = any(truth is not None for _, truth in listed)
    workers = max(1, min(8, usable_cores())) if workers is None else workers
    writer, summary, started = _Writer(Path(out), fmt, top_k, with_truth), PredictionSummary(out=Path(out)), time.perf_counter()
    try:
        rows = classifier._predict_items(((path, path) for path, _ in listed), top_k, batch_size, workers)
        for prediction, (_, truth) in zip(tqdm(rows, total=len(listed), desc="predicting", unit="img",
                                               disable=not progress, leave=False), listed):
            writer.write(prediction, truth)
            summary.images += 1
            summary.errors += prediction.error is not None
            if truth is not None and prediction.error is None:
                summary.labelled += 1
                summary.correct += prediction.label == truth
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    summary.seconds = time.perf_counter() - started
    return summary
