"""Acceleration cores: one module per technique, written against plain `torch.nn.Module`s.

Nothing here knows a model family (that is `adapters/`) or a front end (nodes, CLI, server).
"""
