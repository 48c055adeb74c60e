"""Small data fixtures written in the real on-disk formats."""

import pickle

import numpy as np


def write_cifar(root, classes, per_batch=4):
    """A fixture in the official python-pickle layout, with known pixels and labels."""
    rng = np.random.default_rng(0)
    if classes == 10:
        folder, names, key = (
            root / "cifar-10-batches-py",
            [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"],
            "labels",
        )
    else:
        folder, names, key = root / "cifar-100-python", ["train", "test"], "fine_labels"
    folder.mkdir(parents=True)
    written = {}
    for name in names:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, classes, size=per_batch).tolist()
        with open(folder / name, "wb") as handle:
            pickle.dump({"data": data, key: labels, "batch_label": name}, handle)
        written[name] = (data, labels)
    return written
