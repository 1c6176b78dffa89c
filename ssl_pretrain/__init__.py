"""SimCLR pretraining on unlabelled image folders: images -> two views -> backbone -> head -> NT-Xent."""

__version__ = "0.1.0"
