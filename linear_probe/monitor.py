"""Online kNN monitor: how good the backbone's features are, every few epochs, during training.

It lives with the evaluation it reuses (extraction, faiss kNN); the ``ssl-pretrain`` command hands
it to ``ssl_pretrain.train.pretrain(..., monitor=KnnMonitor(cfg))``, so pretraining itself never
imports evaluation code.
"""

from __future__ import annotations

import torch

from linear_probe.embeddings import extract_embeddings
from linear_probe.knn import knn_classify, topk_accuracy
from ssl_pretrain.config import Config
from ssl_pretrain.data import open_source
from ssl_pretrain.augment.transforms import build_eval_transform


class KnnMonitor:
    """kNN top-1 on ``monitor.val`` with ``monitor.train`` as memory (weighted cosine kNN).

    This is a training-time signal, not a result: report final numbers with ``linear-probe``,
    which selects hyper-parameters on validation data and scores the test set once.
    """

    def __init__(self, cfg: Config):
        self.memory = open_source(cfg.monitor.train, labelled=True)
        self.queries = open_source(cfg.monitor.val, labelled=True)
        self.transform = build_eval_transform(cfg.augment.input_size, cfg.augment.mean, cfg.augment.std)
        self.k, self.temperature = cfg.monitor.k, cfg.monitor.temperature
        self.batch_size = max(cfg.train.batch_size, 256)

    def __call__(self, backbone: torch.nn.Module) -> float:
        """kNN top-1 of ``backbone``'s features, computed on the device the backbone is on."""
        device = next(backbone.parameters()).device
        was_training = backbone.training
        memory = extract_embeddings(backbone, self.memory, self.transform, self.batch_size, device,
                                    progress=False)
        queries = extract_embeddings(backbone, self.queries, self.transform, self.batch_size, device,
                                     progress=False)
        backbone.train(was_training)
        num_classes = int(max(memory.labels.max(), queries.labels.max())) + 1
        scores = knn_classify(memory.features, memory.labels, queries.features, num_classes,
                              k=self.k, temperature=self.temperature)
        return topk_accuracy(scores, queries.labels, 1)
