"""Integrations with training frameworks, each an optional extra.

Nothing here is imported by ``import samkit`` and this package imports no framework itself: import the
integration you use, e.g. ``from samkit.integrations.transformers import SAMTrainer`` (``samkit[transformers]``).
``from samkit.integrations.lightning import SAMLightningModule`` (``samkit[lightning]``) is the PyTorch
Lightning one. ``window.py`` holds what they share, framework-free: the passes of one SAM step over a window of
batches (gradient accumulation).
"""
