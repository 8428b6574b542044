"""The model sweep: the inference energy of the timm ImageNet zoo, measured with wattscope's public API.

catalog.py (models and their published accuracy/GMACs), store.py (the versioned SQLite results), providers.py
(how a model is built: timm, or a tiny provider for tests), measure.py (the protocol for one model and
configuration), worker.py (one isolated process per model), runner.py (the sweep: resume, shards, GPUs, progress).
"""
