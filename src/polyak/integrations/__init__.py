"""Integrations with training frameworks: each submodule imports its framework, this package none.

- :mod:`polyak.integrations.transformers`: ``EMACallback`` for the Hugging Face ``Trainer``.
"""
