"""Fixtures of the compress tests: ``hf_datasets`` serves the text datasets of
test_pipeline.py and the image datasets of test_pipeline_images.py."""

import pytest


@pytest.fixture()
def hf_datasets(tmp_path, monkeypatch):
    """The datasets package, offline (a Hub name fails at once instead of retrying),
    with its cache of loaded data files in tmp_path."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    return datasets
