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


def write_image_folders(root, classes=3, per_class=4, size=32):
    """An ImageNet-style fixture: ``root/{train,val}/<class>/<k>.png``, each class a
    distinct colour with noise, so a model can tell them apart."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label in range(classes):
            folder = root / split / f"n{label:08d}"
            folder.mkdir(parents=True)
            for k in range(per_class):
                base = np.zeros((size, size, 3), dtype=np.int64)
                base[..., label % 3] = 200
                noise = rng.integers(0, 40, size=(size, size, 3))
                Image.fromarray((base + noise).clip(0, 255).astype(np.uint8)).save(
                    folder / f"{k}.png"
                )
    return root
