# Zero-shot fidelity of each pruned checkpoint to the dense source model on held-out text.
