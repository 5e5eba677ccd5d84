"""Data pipeline: corpora (``sources``) -> parallel tokenization (``prepare``) -> token shards
(``shards``) -> rank-strided, resumable batches (``loader``).

Imports here stay light (numpy only) so ``gptlab.data.shards`` is cheap to load.
"""
