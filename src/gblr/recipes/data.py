"""Datasets for the recipes: embedded digits (no download) and CIFAR from its python pickles."""

from __future__ import annotations

import functools
import hashlib
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

__all__ = [
    "AUGMENTATIONS",
    "ImageTensors",
    "batch_mixer",
    "digits",
    "image_classes",
    "image_folder",
    "load_cifar",
]

AUGMENTATIONS = ("none", "standard", "autoaugment")


def digits(
    seed: int = 0, test_fraction: float = 0.25, image_size: int = 8
) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's bundled handwritten digits (1,797 images of 8x8, 10 classes).

    Ships with scikit-learn (extra ``[train]``): nothing is downloaded. Pixels are scaled
    to [0, 1] and standardized with the training split's mean and std; the split is fixed
    by ``seed``. ``image_size`` > 8 upsamples the images (bilinear) for models that want
    larger inputs.

    Returns:
        ``(train, test)`` datasets of ``(image (1, S, S) float32, label int64)``.

    Examples:
        >>> from gblr.recipes.data import digits
        >>> train, test = digits(seed=0)
        >>> len(train), len(test)
        (1348, 449)
        >>> image, label = train[0]
        >>> image.shape, label.dtype
        (torch.Size([1, 8, 8]), torch.int64)
        >>> digits(image_size=16)[0][0][0].shape
        torch.Size([1, 16, 16])
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the digits data needs scikit-learn: pip install 'gblr[train]'"
        ) from error
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    test_size = round(test_fraction * len(labels))
    test_index, train_index = order[:test_size], order[test_size:]
    mean, std = images[train_index].mean(), images[train_index].std()
    images = (images - mean) / std
    if image_size != 8:
        if not isinstance(image_size, int) or image_size < 8:
            raise ValueError(f"image_size must be an integer >= 8, got {image_size!r}")
        images = torch.nn.functional.interpolate(
            images, size=(image_size, image_size), mode="bilinear", align_corners=False
        )
    return (
        TensorDataset(images[train_index], labels[train_index]),
        TensorDataset(images[test_index], labels[test_index]),
    )


# Per-channel statistics of the CIFAR training sets (widely published values).
_CIFAR_STATS = {
    10: ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    100: ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


class ImageTensors(torch.utils.data.Dataset):
    """Images kept as uint8 ``(N, C, H, W)``, each passed through ``transform`` (a
    torchvision v2 transform ending in a float tensor) when read.

    Examples:
        >>> import torch
        >>> from gblr.recipes.data import ImageTensors
        >>> images = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
        >>> data = ImageTensors(images, torch.tensor([1, 0]), lambda image: image.float() / 255)
        >>> image, label = data[0]
        >>> len(data), image.shape, image.dtype, int(label)
        (2, torch.Size([3, 4, 4]), torch.float32, 1)
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.images[index]), self.labels[index]


def _cifar_transform(augment: str, mean, std):
    try:
        from torchvision.transforms import v2
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"augment={augment!r} needs torchvision: pip install 'gblr[vision]'"
        ) from error
    steps = [v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()]
    if augment == "autoaugment":
        steps.append(v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10))
    return v2.Compose([*steps, v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


# MD5 of the files of the official python releases (as published with them and used by
# torchvision's CIFAR10/CIFAR100 datasets)
CIFAR_MD5 = {
    "cifar-10-batches-py/data_batch_1": "c99cafc152244af753f735de768cd75f",
    "cifar-10-batches-py/data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "cifar-10-batches-py/data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "cifar-10-batches-py/data_batch_4": "634d18415352ddfa80567beed471001a",
    "cifar-10-batches-py/data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "cifar-10-batches-py/test_batch": "40351d587109b95175f43aff81a1287e",
    "cifar-100-python/train": "16019d7e3df5f24257cddd939b257f8d",
    "cifar-100-python/test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
}


def _numpy_part(name: str):
    """A numpy internal module by its name in numpy 2 (``numpy._core``) or 1 (``numpy.core``)."""
    import importlib

    for prefix in ("numpy._core", "numpy.core"):
        try:
            return importlib.import_module(f"{prefix}.{name}")
        except ImportError:
            continue
    raise ImportError(f"numpy has no module {name}")  # pragma: no cover - numpy's layout


@functools.cache
def _array_globals() -> dict[tuple[str, str], object]:
    """The only globals an array pickle may name: numpy's array rebuilders (under numpy
    2's and 1's module names) and the codec that protocol 2 writes bytes with."""
    import codecs

    multiarray, numeric = _numpy_part("multiarray"), _numpy_part("numeric")
    allowed: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,
    }
    for prefix in ("numpy._core", "numpy.core"):
        allowed[(f"{prefix}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{prefix}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{prefix}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class _ArrayUnpickler(pickle.Unpickler):
    """Reads a pickle of containers, numbers, strings and numpy arrays, and nothing else:
    any other global a pickle names (a function a crafted file would have called) is
    refused before it is looked up, so reading a file never runs its code."""

    def find_class(self, module: str, name: str):
        found = _array_globals().get((module, name))
        if found is None:
            raise pickle.UnpicklingError(
                f"the file names {module}.{name}, which is not an array, number, string or "
                "container; it is not read (files are never allowed to run code)"
            )
        return found


def read_array_pickle(path: str | Path) -> object:
    """Read a pickle that holds only containers, numbers, strings and numpy arrays (such
    as CIFAR's python release); a pickle naming any other callable is refused without
    running it.

    Raises:
        ValueError: the file is not such a pickle (named, with the reason).

    Examples:
        >>> import os, pickle, tempfile
        >>> import numpy as np
        >>> from gblr.recipes.data import read_array_pickle
        >>> path = os.path.join(tempfile.mkdtemp(), "batch")
        >>> with open(path, "wb") as handle:
        ...     pickle.dump({"data": np.arange(3, dtype=np.uint8), "labels": [1, 2]}, handle)
        >>> read_array_pickle(path)["data"].tolist()
        [0, 1, 2]
        >>> with open(path, "wb") as handle:
        ...     pickle.dump(print, handle)  # a callable: refused, never called
        >>> try:
        ...     read_array_pickle(path)
        ... except ValueError as error:
        ...     print(str(error).split("; ")[-1])
        it is not read (files are never allowed to run code)
    """
    try:
        with open(path, "rb") as handle:
            return _ArrayUnpickler(handle, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError,
            TypeError, ValueError, KeyError, MemoryError, OverflowError) as error:  # fmt: skip
        raise ValueError(f"{path} is not a readable array pickle: {error}") from None


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_cifar(
    root: str | Path,
    train: bool = True,
    classes: int = 10,
    augment: str = "none",
    download: bool = False,
    verify: bool = True,
) -> torch.utils.data.Dataset:
    """CIFAR-10/100 read from the official python-pickle release, already on disk.

    Looks for ``root/cifar-10-batches-py/{data_batch_1..5, test_batch}`` (CIFAR-10) or
    ``root/cifar-100-python/{train, test}`` (CIFAR-100). To get them:
    ``torchvision.datasets.CIFAR10(root, download=True)`` (or CIFAR100) on a machine with
    internet access, or pass ``download=True`` to have torchvision fetch them when they
    are missing. ``augment`` (training): ``standard`` = random 32x32 crop of the
    image padded by 4 and horizontal flip; ``autoaugment`` adds AutoAugment's CIFAR-10
    policy (both need torchvision).

    The files are read safely: with ``verify`` (the default) each must have the MD5 of
    the official release (`CIFAR_MD5`) before it is opened as a pickle, and every
    file is read by [`read_array_pickle`][gblr.recipes.data.read_array_pickle], which builds arrays,
    lists and strings only. ``verify=False`` reads files in CIFAR's format that are not the official
    ones (a subset, stand-in data).

    Returns:
        A dataset of ``(image (3, 32, 32) float32 normalized, label int64)``.

    Raises:
        FileNotFoundError: a file is missing (the message says how to get them).
        ValueError: a file is not the official one (``verify``), or not an array pickle.

    Examples:
        A tiny CIFAR-10 test batch (two black images) written in the official format:

        >>> import pickle, tempfile
        >>> from pathlib import Path
        >>> import numpy as np
        >>> from gblr.recipes.data import load_cifar
        >>> root = Path(tempfile.mkdtemp())
        >>> (root / "cifar-10-batches-py").mkdir()
        >>> batch = {"data": np.zeros((2, 3 * 32 * 32), np.uint8), "labels": [3, 5]}
        >>> with open(root / "cifar-10-batches-py" / "test_batch", "wb") as handle:
        ...     pickle.dump(batch, handle)
        >>> test = load_cifar(root, train=False, verify=False)  # not the official file
        >>> image, label = test[1]
        >>> len(test), image.shape, int(label)
        (2, torch.Size([3, 32, 32]), 5)
        >>> try:
        ...     load_cifar(root, train=True, verify=False)  # the training batches are not there
        ... except FileNotFoundError as error:
        ...     print(type(error).__name__)
        FileNotFoundError
    """
    if classes not in _CIFAR_STATS:
        raise ValueError(f"classes must be 10 or 100, got {classes!r}")
    if augment not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {augment!r}")
    root = Path(root).expanduser()
    if classes == 10:
        folder = root / "cifar-10-batches-py"
        names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        label_key = "labels"
    else:
        folder = root / "cifar-100-python"
        names = ["train" if train else "test"]
        label_key = "fine_labels"
    missing = [name for name in names if not (folder / name).is_file()]
    if missing and download:
        try:
            from torchvision import datasets
        except ImportError as error:  # pragma: no cover - depends on the environment
            raise ImportError(
                "download=True needs torchvision: pip install 'gblr[vision]'"
            ) from error
        getattr(datasets, f"CIFAR{classes}")(str(root), train=train, download=True)
        missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-{classes} files {missing} not found in {folder}. Download the python "
            f"version once with torchvision.datasets.CIFAR{classes}({str(root)!r}, download=True) "
            "or from https://www.cs.toronto.edu/~kriz/cifar.html and unpack it there."
        )
    data, labels = [], []
    for name in names:
        path = folder / name
        if verify:
            expected, found = CIFAR_MD5[f"{folder.name}/{name}"], _md5(path)
            if found != expected:
                raise ValueError(
                    f"{path} is not the official CIFAR-{classes} file (MD5 {found}, the "
                    f"release's is {expected}): it is truncated, changed or another file. "
                    "Download it again; for your own files in CIFAR's format pass "
                    "verify=False (in a config, or on the command line: data.verify=false)"
                )
        batch = read_array_pickle(path)
        if not isinstance(batch, dict) or "data" not in batch or label_key not in batch:
            raise ValueError(f"{path} does not hold a CIFAR batch ('data' and {label_key!r})")
        data.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(batch[label_key])
    pixels = torch.from_numpy(np.concatenate(data))
    labels = torch.tensor(labels, dtype=torch.int64)
    if augment != "none":
        return ImageTensors(pixels, labels, _cifar_transform(augment, *_CIFAR_STATS[classes]))
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in _CIFAR_STATS[classes])
    return TensorDataset((pixels.float() / 255.0 - mean) / std, labels)


# ImageNet's per-channel statistics (widely published values).
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def image_classes(root: str | Path) -> list[str]:
    """The class names of an image folder ``root/<class>/<image>``: its sub-folders in
    sorted order, hidden ones (``.ipynb_checkpoints``, ``.git``, ...) left out.

    Raises:
        FileNotFoundError: ``root`` is not a folder, or holds no class folder.

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from gblr.recipes.data import image_classes
        >>> root = Path(tempfile.mkdtemp())
        >>> for name in ("dog", "cat", ".ipynb_checkpoints"):
        ...     (root / name).mkdir()
        >>> image_classes(root)
        ['cat', 'dog']
    """
    root = Path(root).expanduser()
    classes = (
        sorted(c.name for c in root.iterdir() if c.is_dir() and not c.name.startswith("."))
        if root.is_dir()
        else []
    )
    if not classes:
        raise FileNotFoundError(
            f"no image folder at {root}: expected one sub-folder per class holding its "
            "images (root/<class>/<image>.jpg), e.g. ImageNet's train/ or val/ folder"
        )
    return classes


def image_folder(
    root: str | Path,
    image_size: int = 224,
    train: bool = True,
    mean: Sequence[float] = _IMAGENET_MEAN,
    std: Sequence[float] = _IMAGENET_STD,
):
    """An ImageNet-style folder, ``root/<class name>/<image files>``, through torchvision.

    Training: random resized crop and horizontal flip; evaluation: resize to
    ``image_size * 8 / 7`` and centre crop, as is usual for ImageNet; then normalized
    with ``mean``/``std`` (default ImageNet's). Needs the extra ``[vision]``.

    Returns:
        ``torchvision.datasets.ImageFolder`` of ``(image (3, S, S) float32, label int64)``;
        ``.classes`` lists the class names in label order.

    Examples:
        A folder of two classes with one image each, written here:

        >>> import tempfile
        >>> from pathlib import Path
        >>> from PIL import Image
        >>> from gblr.recipes.data import image_folder
        >>> root = Path(tempfile.mkdtemp())
        >>> for name in ("cat", "dog"):
        ...     (root / name).mkdir()
        ...     Image.new("RGB", (40, 40)).save(root / name / "0.png")
        >>> data = image_folder(root, image_size=32, train=False)
        >>> image, label = data[1]
        >>> data.classes, image.shape, label
        (['cat', 'dog'], torch.Size([3, 32, 32]), 1)
    """
    root = Path(root).expanduser()
    classes = image_classes(root)
    try:
        from torchvision import datasets, transforms
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("image folders need torchvision: pip install 'gblr[vision]'") from error
    normalize = transforms.Normalize(list(mean), list(std))
    if train:
        steps = [transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip()]
    else:
        steps = [transforms.Resize(image_size * 8 // 7), transforms.CenterCrop(image_size)]

    class _VisibleClasses(datasets.ImageFolder):
        # torchvision takes every sub-folder as a class, a notebook's hidden
        # .ipynb_checkpoints too (which then failed as a class without images)
        def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
            return classes, {name: index for index, name in enumerate(classes)}

    def read_image(path: str):
        # a truncated or mislabelled file fails deep in PIL, mid-run, naming a file handle
        try:
            return datasets.folder.default_loader(path)
        except (OSError, ValueError, SyntaxError) as error:
            raise ValueError(
                f"image folder {root}: cannot read the image {path} ({error}); remove or "
                "replace that file"
            ) from None

    try:
        return _VisibleClasses(
            str(root),
            transforms.Compose([*steps, transforms.ToTensor(), normalize]),
            loader=read_image,
        )
    except FileNotFoundError as error:  # a class folder without images: name the folder
        raise FileNotFoundError(f"image folder {root}: {error}") from None


def batch_mixer(mixup: float = 0.0, cutmix: float = 0.0, num_classes: int = 10):
    """MixUp and/or CutMix on a batch (torchvision's), or None when both are off.

    ``mixup``/``cutmix`` are the α of each one's Beta distribution; with both, each batch
    gets one of the two at random (as timm's ``Mixup`` with ``switch_prob=0.5``).

    Returns:
        A callable ``(images (N, C, H, W), labels (N,)) -> (images, soft labels
        (N, num_classes))``, or None.

    Examples:
        >>> import torch
        >>> from gblr.recipes.data import batch_mixer
        >>> mix = batch_mixer(mixup=0.2, num_classes=10)
        >>> images, labels = mix(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]))
        >>> images.shape, labels.shape, bool(torch.allclose(labels.sum(dim=1), torch.ones(4)))
        (torch.Size([4, 3, 8, 8]), torch.Size([4, 10]), True)
        >>> batch_mixer() is None
        True
    """
    for name, value in (("mixup", mixup), ("cutmix", cutmix)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0 (0 = off), got {value!r}")
    if mixup == 0 and cutmix == 0:
        return None
    try:
        from torchvision.transforms import v2
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("mixup/cutmix need torchvision: pip install 'gblr[vision]'") from error
    mixers = []
    if mixup > 0:
        mixers.append(v2.MixUp(alpha=mixup, num_classes=num_classes))
    if cutmix > 0:
        mixers.append(v2.CutMix(alpha=cutmix, num_classes=num_classes))
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)
