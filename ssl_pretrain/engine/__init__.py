"""What the training loop (``ssl_pretrain.train``) runs on: optimiser and schedules (``optim``), the
run folder (``run_folder``), distributed helpers (``distributed``), the device and usable cores
(``devices``), what the hardware runs fast (``hardware``), the CPU allocator setting
(``allocator``). Shared ground: evaluation and the classifier read ``devices`` too."""
