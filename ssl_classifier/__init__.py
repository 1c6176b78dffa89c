"""The classifier a user takes home: a pretrained backbone + a head trained on a few labels.

The data flows through one module per step: ``model`` (the network and its saved form:
``classifier.safetensors`` + ``classifier.json``), ``train`` (few labels -> a trained, saved
classifier; ``ssl-finetune``), ``preprocess`` (any image -> the network's input, evaluation's geometry),
``predict`` (``Classifier.load(dir).predict(images)``, ``ssl-predict``: streamed CSV/JSONL),
``export`` (ONNX and TorchScript, ``ssl-export``), ``cli`` (the three thin command lines).
"""

from ssl_classifier.model import ClassifierError
from ssl_classifier.predict import Classifier, Prediction

__all__ = ["Classifier", "ClassifierError", "Prediction"]
