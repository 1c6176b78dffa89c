"""Evaluation of pretrained features: embeddings -> kNN / logistic regression / linear probe /
fine-tuning on few labels -> a report with baselines beside every number.

One module per step, in the order the data flows: ``embeddings`` (images -> cached features),
``splits`` (validation split, class-balanced label subsets), ``knn``, ``logreg``, ``linear`` and
``finetune`` (one method each; ``images`` and ``training`` hold what the last two share; each
returns a ``scoring.ProbeResult``), ``evaluate`` (the orchestration), ``report`` and ``plots``.
``cli`` is a thin command line over ``evaluate.evaluate``.
"""

__version__ = "0.1.0"
