"""Backbones by name (``backbones``) and the weights a run may start from (``warm_start``)."""
