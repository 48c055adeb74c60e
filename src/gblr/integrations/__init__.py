"""Adapters for training frameworks. Each imports its framework only when used.

- [`gblr.integrations.lightning`][]: ``GBLRCallback`` (needs ``pip install gblr[train]``)
- [`gblr.integrations.hf`][]: ``GBLRTrainerCallback`` (needs ``pip install gblr[hf]``)
"""
