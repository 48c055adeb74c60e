"""Adapters for training frameworks. Each imports its framework only when used.

- :mod:`gblr.integrations.lightning`: ``GBLRCallback`` (needs ``pip install gblr[train]``)
- :mod:`gblr.integrations.hf`: ``GBLRTrainerCallback`` (needs ``pip install gblr[hf]``)
"""
