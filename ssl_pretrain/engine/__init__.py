"""What the training loop (``ssl_pretrain.train``) runs on: optimiser and schedules (``optim``), the
run folder (``run_folder``), distributed helpers (``distributed``), hardware and precision choice
(``hardware``), the CPU allocator setting (``allocator``)."""
