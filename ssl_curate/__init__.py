"""Spending few labels well: choose which images to label (``ssl-select``) and find near-duplicate
images and train/test leaks (``ssl-dedup``), from a pretrained backbone's embeddings."""
