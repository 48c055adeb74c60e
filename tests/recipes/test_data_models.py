import numpy as np
import pytest
import torch

import gblr

pytest.importorskip("sklearn")
from gblr.recipes.data import digits, load_cifar
from gblr.recipes.models import CausalTransformer, VisionTransformer, structure_model

from .fixtures import write_cifar


def test_digits_split_is_fixed_and_standardized():
    train, test = digits(seed=0)
    again, _ = digits(seed=0)
    assert len(train) == 1348 and len(test) == 449
    assert torch.equal(train.tensors[1], again.tensors[1])
    images = train.tensors[0]
    assert images.shape[1:] == (1, 8, 8)
    assert abs(images.mean().item()) < 1e-4 and abs(images.std().item() - 1) < 1e-3
    assert set(test.tensors[1].tolist()) == set(range(10))


@pytest.mark.parametrize("classes", [10, 100])
def test_cifar_reads_the_pickle_format(tmp_path, classes):
    written = write_cifar(tmp_path, classes)
    train = load_cifar(tmp_path, train=True, classes=classes, verify=False)
    test = load_cifar(tmp_path, train=False, classes=classes, verify=False)
    train_names = [n for n in written if n not in ("test_batch", "test")]
    assert len(train) == 4 * len(train_names) and len(test) == 4
    test_name = "test_batch" if classes == 10 else "test"
    data, labels = written[test_name]
    assert test.tensors[1].tolist() == labels
    images = test.tensors[0]
    assert images.shape == (4, 3, 32, 32)
    # pixel (image 1, channel 2, row 3, col 4) read back through the normalization
    raw = data[1].reshape(3, 32, 32)[2, 3, 4] / 255.0
    mean, std = {10: (0.4465, 0.2616), 100: (0.4409, 0.2762)}[classes]
    assert images[1, 2, 3, 4].item() == pytest.approx((raw - mean) / std, rel=1e-5)


def test_missing_cifar_says_where_it_looked_and_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py.*download=True"):
        load_cifar(tmp_path)
    with pytest.raises(ValueError, match="classes must be 10 or 100"):
        load_cifar(tmp_path, classes=20)


@pytest.mark.parametrize("structure", ["dense", "gblr", "lowrank", "monarch"])
def test_vit_linear_layers_take_the_structure(structure):
    model = VisionTransformer(depth=2)
    report = structure_model(model, structure, 0.4)
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    assert type(model.patch) is torch.nn.Conv2d and type(model.head) is torch.nn.Linear
    fc1 = model.blocks[0].fc1
    if structure == "dense":
        assert report is None and type(fc1) is torch.nn.Linear
    else:
        assert len(report.layers) == 8  # 2 blocks x (qkv, proj, fc1, fc2)
        expected = gblr.GBLRLinear if structure == "gblr" else gblr.structured.FAMILIES[structure]
        assert isinstance(fc1, expected)
        assert report.ratio <= 0.4 + 1e-9


def test_causal_transformer_sees_only_the_past():
    torch.manual_seed(0)
    model = CausalTransformer(vocab_size=50, context=12, dim=16, depth=2, heads=2)
    ids = torch.randint(0, 50, (2, 12))
    logits = model(ids)
    assert logits.shape == (2, 12, 50)
    changed = ids.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % 50
    after = model(changed)
    assert torch.allclose(after[:, :7], logits[:, :7], atol=1e-6)  # the past is unchanged
    assert not torch.allclose(after[:, 7:], logits[:, 7:])
    assert model.head.weight is model.embed.weight  # tied
    report = structure_model(model, "gblr", 0.3)
    assert [layer.name for layer in report.layers[:4]] == [
        "blocks.0.qkv", "blocks.0.proj", "blocks.0.fc1", "blocks.0.fc2"
    ]  # fmt: skip
    with pytest.raises(ValueError, match="context=12"):
        model(torch.randint(0, 50, (2, 13)))


@pytest.mark.parametrize("structure_init", ["half", "blocks"])
def test_structure_model_takes_the_gblr_start(structure_init):
    model = VisionTransformer(depth=1)
    structure_model(model, "gblr", 0.2, seed=3, structure_init=structure_init)
    again = VisionTransformer(depth=1)
    structure_model(again, "gblr", 0.2, seed=3, structure_init=structure_init)
    layer, twin = model.blocks[0].fc1, again.blocks[0].fc1
    assert torch.equal(layer.widths, twin.widths) and torch.equal(layer.U, twin.U)  # seeded
    assert layer.flops() <= 0.2 * layer.dense_flops()
    reference = gblr.GBLRLinear(64, 128, structure_init=structure_init, init_cost=0.2)
    # the layer's own start, shrunk by the budget projection by at most a grid cell or two
    assert torch.allclose(layer.widths, reference.widths, atol=2 / 64)


def test_structure_model_passes_the_blocks_full_share():
    model = VisionTransformer(depth=1)
    structure_model(model, "gblr", 0.6, structure_init="blocks", full_share=0.75)
    reference = gblr.GBLRLinear(64, 128, structure_init="full")
    reference.init_structure("blocks", 0.6, full_share=0.75)
    layer = model.blocks[0].fc1
    full = (layer.widths == 1.0).all(0)
    assert full.sum() == (reference.widths == 1.0).all(0).sum() > 0
    # more full components than the default share gives
    default = gblr.GBLRLinear(64, 128, structure_init="blocks", init_cost=0.6)
    assert full.sum() > (default.widths == 1.0).all(0).sum()
    with pytest.raises(ValueError, match="full_share is only used with structure_init='blocks'"):
        structure_model(
            VisionTransformer(depth=1), "gblr", 0.6, structure_init="half", full_share=0.5
        )


def test_vit_bad_sizes():
    with pytest.raises(ValueError, match="patch_size"):
        VisionTransformer(image_size=8, patch_size=3)
    with pytest.raises(ValueError, match="heads"):
        VisionTransformer(dim=30, heads=4)


def test_overlap_image_and_costs_match_a_brute_force_count():
    from gblr.recipes.report import layer_costs, overlap_image

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        gblr.GBLRLinear(13, 9, structure_init="random", rank_per_component=2), torch.nn.Linear(9, 4)
    )
    state = model.state_dict()
    image = overlap_image(state, "0.")
    layer = model[0]
    col_lengths, row_lengths = layer.interval_lengths()
    col_starts, row_starts = layer.interval_starts()
    expected = torch.zeros(9, 13)
    for k in range(layer.num_components):
        for i in range(int(row_lengths[k])):
            for j in range(int(col_lengths[k])):
                expected[(int(row_starts[k]) + i) % 9, (int(col_starts[k]) + j) % 13] += 1
    assert torch.equal(image, expected)
    costs = {row["name"]: row for row in layer_costs(state)}
    assert costs["0"]["kind"] == "GBLR" and costs["0"]["macs"] == layer.flops()
    assert costs["1"]["kind"] == "dense" and costs["1"]["macs"] == 36


def test_image_folder_reads_class_folders(tmp_path):
    pytest.importorskip("torchvision")
    from PIL import Image

    from gblr.recipes.data import image_folder

    for index, name in enumerate(["cat", "dog"]):
        (tmp_path / name).mkdir()
        for k in range(3):
            pixels = np.full((20, 30, 3), 40 * index + k, dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / name / f"{k}.png")
    dataset = image_folder(tmp_path, image_size=16, train=False)
    assert dataset.classes == ["cat", "dog"] and len(dataset) == 6
    image, label = dataset[4]
    assert image.shape == (3, 16, 16) and label == 1
    # uniform image of value 41 -> normalized with ImageNet's red mean/std
    assert image[0, 8, 8].item() == pytest.approx((41 / 255 - 0.485) / 0.229, abs=1e-4)
    assert image_folder(tmp_path, image_size=16)[0][0].shape == (3, 16, 16)
    # a notebook's hidden folder is no class (it failed as a class without images)
    (tmp_path / ".ipynb_checkpoints").mkdir()
    assert image_folder(tmp_path, image_size=16, train=False).classes == ["cat", "dog"]
    from gblr.recipes.build import data_shape
    from gblr.recipes.config import load_config

    config = load_config(
        "digits-vit-gblr",
        ["data.name=folder", f"data.root={tmp_path}", f"data.val_root={tmp_path}"],
    )
    assert data_shape(config) == (3, 2)
    # a class folder without images names the image folder
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=f"image folder {tmp_path}: .*empty"):
        image_folder(tmp_path, image_size=16)


def test_an_unreadable_image_is_named_with_its_folder_in_one_line(tmp_path, capsys):
    """A corrupt PNG failed mid-run inside PIL ("cannot identify image file
    <_io.BufferedReader ...>") with a traceback, through a data loader's worker too."""
    pytest.importorskip("torchvision")
    from PIL import Image

    from gblr.cli import _own_message
    from gblr.recipes.data import image_folder

    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (20, 20)).save(tmp_path / name / "0.png")
    (tmp_path / "dog" / "1.png").write_bytes(b"not an image")
    dataset = image_folder(tmp_path, image_size=16, train=False)
    assert dataset[0][0].shape == (3, 16, 16)
    bad = tmp_path / "dog" / "1.png"
    with pytest.raises(ValueError, match=f"image folder {tmp_path}: cannot read the image {bad}"):
        dataset[2]
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=1)
    with pytest.raises(ValueError, match="Original Traceback") as raised:
        next(iter(loader))
    message = _own_message(raised.value)
    assert message.startswith(f"image folder {tmp_path}: cannot read the image {bad} (")
    assert "\n" not in message and message.endswith("remove or replace that file")
    assert _own_message(ValueError("plain")) == "plain"


def test_missing_image_folder_explains_the_layout(tmp_path):
    from gblr.recipes.data import image_folder

    with pytest.raises(FileNotFoundError, match="one sub-folder per class"):
        image_folder(tmp_path / "nowhere")


def test_cifar_download_goes_through_torchvision_only_when_files_are_missing(tmp_path, monkeypatch):
    datasets = pytest.importorskip("torchvision.datasets")
    calls = []

    def fake_cifar10(root, train, download):  # stands in for the network
        calls.append((root, train, download))
        write_cifar(tmp_path, 10)

    monkeypatch.setattr(datasets, "CIFAR10", fake_cifar10)
    assert len(load_cifar(tmp_path, train=False, download=True, verify=False)) == 4
    assert calls == [(str(tmp_path), False, True)]
    load_cifar(tmp_path, train=False, download=True, verify=False)  # present now: no second fetch
    assert len(calls) == 1


def test_a_vit_without_hidden_units_is_refused_by_name():
    """`mlp_ratio=0` crashed inside torch ("cannot reshape tensor of 0 elements")."""
    with pytest.raises(ValueError, match=r"mlp_ratio=0.01 must give a hidden size >= 1 at dim=16"):
        VisionTransformer(dim=16, heads=2, mlp_ratio=0.01)
