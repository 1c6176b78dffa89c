"""The one error type of the evaluation stage."""

from ssl_pretrain.errors import SSLError


class EvaluationError(SSLError, ValueError):
    """An evaluation that cannot run as asked (inconsistent data, bad settings); one-line message.

    The command line prints it as ``linear-probe: error: <message>`` and exits with status 2,
    like the ``DataError`` and ``CheckpointError`` raised by ``ssl_pretrain``.
    """
