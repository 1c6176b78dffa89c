"""The one base of every error a user can cause: a command line catches ``SSLError``, prints its
one-line message (``PROG: error: <message>``) and exits with status 2 (3 for a divergence).

Each stage subclasses it where its errors arise, keeping the built-in type callers may already
catch: ``ConfigError`` (``ssl_pretrain.settings``), ``DataError`` (``ssl_pretrain.data``),
``CheckpointError`` (``ssl_pretrain.checkpoint``), ``RunFolderError``
(``ssl_pretrain.engine.run_folder``), ``DivergenceError`` (``ssl_pretrain.diagnostics``),
``EvaluationError`` (``linear_probe.errors``), ``SelectionError`` and ``DuplicateError``
(``ssl_curate``), ``ClassifierError`` (``ssl_classifier.model``).
"""


class SSLError(Exception):
    """An input, setting or state this project cannot use as asked; the message is one line."""
