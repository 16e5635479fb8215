"""The continual-learning math the methods share, written once on plain tensors and tested on them.

    subspace.py      energy thresholds, projections, GPM / DualGPM, randomised SVD (InfLoRA, KeepLoRA)
    statistics.py    token second moments of adapted layers, per-class feature Gaussians, NCM scoring
    task_vectors.py  task arithmetic on low-rank task vectors
    memory.py        episodic memories of rehearsal (rows of the training pool, never images)
    alignment.py     classifier alignment on features sampled from stored class Gaussians (SLCA)
"""
