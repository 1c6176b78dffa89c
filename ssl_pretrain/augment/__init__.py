"""Two augmented views of every image: per-image PIL transforms in loader workers (``transforms``,
lightly's) or whole batches on the training device (``batch_transforms``, kornia's)."""
