"""``gblr compress`` / ``gblr.compress_pretrained`` on a timm image model: a tiny random
ViT saved to disk with its dense weights (the "pretrained model"), an ImageFolder of
scikit-learn's handwritten digits written as PNGs (or a ``datasets`` dataset with an
Image column of images made here), a compressed, recovered, reloadable model and a
report out."""

import json

import numpy as np
import pytest
import torch

import gblr
from gblr.cli import main
from gblr.compress.distill import DistillConfig
from gblr.compress.pipeline import (
    compress_pretrained,
    load_image_model,
    read_dataset_images,
    read_images,
)

timm = pytest.importorskip("timm")
pytest.importorskip("torchvision")
Image = pytest.importorskip("PIL.Image")
datasets = pytest.importorskip("sklearn.datasets")

PER_CLASS = 6  # 60 images: 54 train, 6 held out
VIT_ARGS = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2}


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory):
    """``root/<digit>/<index>.png``: the first images of each digit, 8x8 upsampled to
    32x32 grey PNGs (read as RGB by the pipeline)."""
    root = tmp_path_factory.mktemp("digits")
    digits = datasets.load_digits()
    for label in range(10):
        (root / str(label)).mkdir()
        for index in np.flatnonzero(digits.target == label)[:PER_CLASS]:
            pixels = (digits.images[index] * (255 / 16)).astype(np.uint8)
            image = Image.fromarray(pixels).resize((32, 32), Image.BILINEAR)
            image.save(root / str(label) / f"{index:04d}.png")
    return root


def _tiny_vit():
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=10, **VIT_ARGS
    ).eval()


@pytest.fixture(scope="module")
def vit_folder(tmp_path_factory):
    """The ViT with its dense weights, saved by gblr.save_pretrained (no structured
    layers: a dense model on disk)."""
    folder = tmp_path_factory.mktemp("models") / "vit"
    return gblr.save_pretrained(_tiny_vit(), folder, model_args=VIT_ARGS)


def _held_out_outputs(model, files, transform):
    """The model's logits on image files, read and preprocessed here."""
    batch = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
    with torch.no_grad():
        return model(batch)


def test_read_images_holds_out_every_tenth_image_of_class_and_flat_folders(digit_folder, tmp_path):
    split = read_images(digit_folder)
    files = sorted(digit_folder.glob("*/*.png"))
    assert split.classes == [str(label) for label in range(10)]
    assert split.test == files[9::10]
    assert split.train == [f for i, f in enumerate(files) if i % 10 != 9]
    for index in range(3):  # a flat folder; other files are not images
        Image.new("RGB", (8, 8)).save(tmp_path / f"{index}.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    flat = read_images(tmp_path)
    assert (flat.classes, len(flat.train), flat.test) == ([], 2, [tmp_path / "2.jpg"])


def test_read_images_refuses_empty_folders_files_and_missing_paths(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds 0 image"):
        read_images(tmp_path / "empty")
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(ValueError, match="must be a folder"):
        read_images(tmp_path / "a.png")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_images(tmp_path / "missing")


def test_compress_recovers_a_vit_and_saves_a_folder_that_reloads_equal(
    vit_folder, digit_folder, tmp_path
):
    out = tmp_path / "out"
    result = compress_pretrained(
        str(vit_folder),
        gblr.GBLRConfig(budget=0.5),
        images=digit_folder,
        distillation=DistillConfig(steps=20, lr=1e-3),
        out=out,
        batch_size=16,
        progress=False,
    )
    # measured: held-out logit cosine 0.754 after conversion, 0.994 after 20 steps at
    # lr 1e-3 (0.990 at 3e-3, 0.983 at 1e-2); top-1 agreement 0.0 -> 1.0
    assert result.kept == "distilled"
    assert result.quality_after["cosine"] > result.quality_before["cosine"] + 0.1
    # The budget counts MACs per image: the patch embedding runs on 16 positions, the
    # blocks' layers on 17 tokens (the class token too), so per row would differ; the
    # distillation's learner holds what the conversion chose, per image.
    image = torch.zeros(1, 3, 32, 32)
    converted = result.conversion
    assert {layer.rows for layer in converted.layers} == {16, 17}
    names = [layer.name for layer in converted.layers]
    assert gblr.count_flops(result.model, image, include=names).macs <= converted.macs_after
    # GBLR converts the patch embedding, a convolution: converted without calibration
    assert not result.conversion.calibrated
    assert "patch_embed.proj" in result.uncalibrated

    report = json.loads((out / "report.json").read_text())
    assert report["model"] == {"kind": "image", "library": "timm"}
    assert report["data"] == {
        "kind": "image folder",
        "path": str(digit_folder),
        "train": 54,
        "test": 6,
        "classes": 10,
        "outputs": "logits",
    }
    assert 0.45 <= report["conversion"]["macs_after"] / report["conversion"]["macs_before"] <= 0.5
    for when in ("quality_before", "quality_after"):
        quality = report[when]
        assert set(quality) == {"cosine", "neighbour_agreement", "top1_agreement"}
        assert -1.0 <= quality["cosine"] <= 1.0 + 1e-6
        assert 0.0 <= quality["neighbour_agreement"] <= 1.0
        assert 0.0 <= quality["top1_agreement"] <= 1.0
    assert not report["conversion"]["calibrated"]
    assert "patch_embed.proj" in report["uncalibrated"]
    markdown = (out / "report.md").read_text()
    assert "image model (timm)" in markdown and "6 held-out images" in markdown
    assert "Not calibrated (fitted to the weights): " in markdown

    reloaded = gblr.from_pretrained(out)
    assert any(type(m).__module__.startswith("gblr") for m in reloaded.modules())
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(reloaded(images), result.model(images), atol=1e-5)
    with pytest.raises(ValueError, match="already compressed"):
        compress_pretrained(str(out))


def test_compress_command_reports_quality_against_an_independent_computation(
    vit_folder, digit_folder, tmp_path, capsys
):
    """--steps 0: the report's quality is the converted model's; recomputed here from
    the saved model's and the original's logits on the held-out images."""
    out = tmp_path / "out"
    args = [str(vit_folder), "--out", str(out), "--images", str(digit_folder)]
    assert main(["compress", *args, "--structure", "lowrank", "--steps", "0", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "held-out images" in printed and "no --images" not in printed
    # without images the command says what it does instead (there is no built-in data)
    alone = [str(vit_folder), "--out", str(tmp_path / "alone"), "--structure", "lowrank"]
    assert main(["compress", *alone, "--quiet"]) == 0
    assert "no --images or --dataset: fitting the weights alone" in capsys.readouterr().out
    assert json.loads((tmp_path / "alone" / "report.json").read_text())["data"] == {}
    report = json.loads((out / "report.json").read_text())
    assert report["distillation"] is None and report["quality_after"] == {}

    transform = load_image_model(str(vit_folder)).transform
    held_out = read_images(digit_folder).test
    student = _held_out_outputs(gblr.from_pretrained(out), held_out, transform)
    teacher = _held_out_outputs(_tiny_vit(), held_out, transform)
    cosine = torch.nn.functional.cosine_similarity(student, teacher, dim=-1).mean()
    top1 = (student.argmax(-1) == teacher.argmax(-1)).float().mean()
    assert report["quality_before"]["cosine"] == pytest.approx(float(cosine), abs=1e-5)
    assert report["quality_before"]["top1_agreement"] == pytest.approx(float(top1))


def test_a_vit_whose_converted_layers_are_all_linear_is_calibrated(vit_folder, digit_folder):
    """A baseline family skips the patch embedding (a convolution), so every layer it
    converts is Linear and the conversion is calibrated: on the first training images,
    exactly as gblr.convert calibrates the same ViT here."""
    config = gblr.LowRankConfig(budget=0.5)
    result = compress_pretrained(
        str(vit_folder), config, images=digit_folder, batch_size=16, progress=False
    )
    assert result.conversion.calibrated and result.uncalibrated == ""
    assert "Calibrated: fitted to the layers' outputs" in result.markdown()
    assert any(name == "patch_embed.proj" for name, _ in result.conversion.skipped)

    transform = load_image_model(str(vit_folder)).transform
    train = read_images(digit_folder).train  # 54 images: 4 batches of 16, all 8 asked for
    batches = [
        torch.stack([transform(Image.open(f).convert("RGB")) for f in train[i : i + 16]])
        for i in range(0, len(train), 16)
    ]
    expected, uncalibrated = _tiny_vit(), _tiny_vit()
    gblr.convert(expected, config, calibration=batches, progress=False)
    gblr.convert(uncalibrated, config, progress=False)
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        got = result.model(images)
        assert torch.allclose(got, expected(images), atol=1e-5)
        assert not torch.allclose(got, uncalibrated(images), atol=1e-3)


def test_compress_loads_timm_own_folder_format(tmp_path):
    folder = tmp_path / "timm-format"
    timm.models.save_for_hf(_tiny_vit(), folder, model_args=VIT_ARGS)
    loaded = load_image_model(str(folder))
    assert loaded.kind == "image"
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.model(images), _tiny_vit()(images))
    out = tmp_path / "out"
    compress_pretrained(str(folder), gblr.LowRankConfig(budget=0.5), out=out, progress=False)
    assert gblr.from_pretrained(out)(images).shape == (2, 10)


def test_compress_a_timm_name_with_random_weights_saves_a_folder_that_reloads_equal(tmp_path):
    # timm:<name> is created by name (pretrained weights need the network; random ones do
    # not): the same path as a Hub model, short of the download. test_vit is timm's own
    # tiny ViT for tests.
    if "test_vit" not in timm.list_models("test_vit"):
        pytest.skip("this timm has no test_vit model")
    out = tmp_path / "out"
    result = compress_pretrained(
        "timm:test_vit",
        gblr.LowRankConfig(budget=0.5),
        random_weights=True,
        out=out,
        progress=False,
    )
    assert result.model_kind == "image" and result.library == "timm"
    assert result.conversion.layers, "nothing was converted"
    size = result.model.pretrained_cfg["input_size"]
    images = torch.randn(2, *size)
    reloaded = gblr.from_pretrained(out).eval()
    with torch.no_grad():
        expected = result.model.eval()(images)
        assert torch.allclose(reloaded(images), expected, atol=1e-5)
    # the folder is a compressed model: the pipeline refuses to compress it again
    with pytest.raises(ValueError, match="already compressed"):
        load_image_model(str(out))


def test_compress_refuses_mixed_or_mismatched_data_and_stray_random_weights(
    vit_folder, digit_folder, tmp_path, capsys
):
    text = tmp_path / "lines.txt"
    text.write_text("a line of several words\n" * 4, encoding="utf-8")
    with pytest.raises(ValueError, match="not both"):
        compress_pretrained(str(vit_folder), text=text, images=digit_folder)
    with pytest.raises(
        ValueError, match=r"image model: give images= .* or dataset= \(with an Image"
    ):
        compress_pretrained(str(vit_folder), text=text)
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="text model: give text="):
        compress_pretrained(str(bert), images=digit_folder)
    with pytest.raises(ValueError, match="random_weights=True is for 'timm:<name>'"):
        compress_pretrained(str(vit_folder), random_weights=True)
    with pytest.raises(ValueError, match="cannot create timm model 'no_such_model'"):
        load_image_model("timm:no_such_model", random_weights=True)

    args = ["compress", str(vit_folder), "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--text", str(text), "--images", str(digit_folder)])
    assert exit_info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([*args, "--images", str(tmp_path / "empty")]) == 1
    assert "holds 0 image" in capsys.readouterr().err
    assert main([*args, "--images", str(text)]) == 1
    assert "must be a folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before any work


def _pictures(count):
    """``count`` random 32x32 RGB PIL images, made here (decoded PNGs are equal to them)."""
    generator = np.random.default_rng(0)
    return [
        Image.fromarray(generator.integers(0, 256, (32, 32, 3), dtype=np.uint8))
        for _ in range(count)
    ]


def _image_dataset(hf_datasets, columns):
    """A ``datasets.Dataset`` of ``columns`` (name: values): lists holding PIL images
    (or None) as ``datasets.Image`` columns, of str as strings, else of int64."""

    def feature(values):
        if any(isinstance(value, Image.Image) for value in values):
            return hf_datasets.Image()
        return hf_datasets.Value("string" if isinstance(values[0], str) else "int64")

    features = hf_datasets.Features({name: feature(v) for name, v in columns.items()})
    return hf_datasets.Dataset.from_dict(columns, features=features)


def test_compress_on_an_image_dataset_equals_compress_on_a_folder_of_its_images(
    hf_datasets, vit_folder, tmp_path, capsys
):
    """The rows of a dataset's Image column are the files of a folder: the same held-out
    tenth, the same calibration (a baseline family calibrates the ViT), the same
    quality; and distillation cycles through the dataset's batches."""
    pictures = _pictures(20)
    folder = tmp_path / "folder"
    folder.mkdir()
    for index, picture in enumerate(pictures):
        picture.save(folder / f"{index:02d}.png")
    # the first block's MLP only: a calibrated fit of every layer would take seconds
    config = gblr.LowRankConfig(budget=0.5, include="blocks.0.mlp.*")
    files = compress_pretrained(
        str(vit_folder), config, images=folder, batch_size=8, progress=False
    )
    assert files.conversion.calibrated
    captions = [f"picture {index}" for index in range(20)]  # a string column, not read
    table = _image_dataset(hf_datasets, {"caption": captions, "photo": pictures})
    hf_datasets.DatasetDict({"train": table}).save_to_disk(tmp_path / "saved")

    out = tmp_path / "out"
    args = [str(vit_folder), "--structure", "lowrank", "--include", "blocks.0.mlp.*"]
    args += ["--out", str(out), "--batch-size", "8"]
    dataset = ["--dataset", str(tmp_path / "saved")]  # the only Image column is the default
    assert main(["compress", *args, *dataset, "--steps", "4", "--quiet"]) == 0  # 3 batches
    printed = capsys.readouterr().out
    assert f"2 held-out images of {tmp_path / 'saved'} (split train, column photo)" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["data"] == {
        "kind": "dataset",
        "path": str(tmp_path / "saved"),
        "split": "train",
        "column": "photo",
        "train": 18,
        "test": 2,
        "outputs": "logits",
    }
    assert report["conversion"]["calibrated"]
    assert report["quality_before"] == pytest.approx(files.quality_before, abs=1e-6)
    assert report["distillation"]["steps"] == 4 and report["quality_after"]


def test_read_dataset_images_reads_an_image_column_a_batch_at_a_time(hf_datasets, tmp_path):
    pictures = _pictures(12)
    rows = [*pictures[:5], None, *pictures[5:]]  # a row without an image is left out
    labels = list(range(len(rows)))
    table = _image_dataset(hf_datasets, {"label": labels, "img": rows, "mask": rows})
    table.save_to_disk(tmp_path / "two")
    split = read_dataset_images(tmp_path / "two")  # of two Image columns, "img" is read
    assert (split.split, split.column) == (None, "img")
    kept = [index for index in labels if index != 5]
    assert (split.train, split.test) == ([i for i in kept if i != 10], [10])
    opened = [np.asarray(image) for image in split.open(split.test + split.train[:2])]
    for got, expected in zip(opened, [pictures[9], pictures[0], pictures[1]], strict=True):
        assert np.array_equal(got, np.asarray(expected))

    # stored undecoded (bytes and path): decoded when a batch is read
    raw = table.cast_column("img", hf_datasets.Image(decode=False))
    raw.save_to_disk(tmp_path / "raw")
    split = read_dataset_images(tmp_path / "raw", column="img")
    assert np.array_equal(np.asarray(next(split.open([0]))), np.asarray(pictures[0]))


def test_read_dataset_images_names_the_image_columns_it_has(hf_datasets, tmp_path):
    pictures = _pictures(3)
    texts = hf_datasets.Dataset.from_dict({"text": ["a b c"] * 3, "label": [0, 1, 2]})
    texts.save_to_disk(tmp_path / "texts")
    with pytest.raises(ValueError, match=r"has no Image column.*\['text', 'label'\]"):
        read_dataset_images(tmp_path / "texts")
    two = _image_dataset(hf_datasets, {"label": [0, 1, 2], "left": pictures, "right": pictures})
    hf_datasets.DatasetDict({"train": two}).save_to_disk(tmp_path / "two")
    with pytest.raises(
        ValueError,
        match=r"dataset '.*two' \(split 'train'\) has 2 Image columns \['left', 'right'\] and "
        r"none is 'image' or 'img': name the one to read with dataset_column=",
    ):
        read_dataset_images(tmp_path / "two")
    with pytest.raises(
        ValueError,
        match=r"dataset_column='label' is not an Image column of dataset '.*two' \(split "
        r"'train'\); its Image columns: \['left', 'right'\]",
    ):
        read_dataset_images(tmp_path / "two", column="label")
    with pytest.raises(ValueError, match=r"dataset_column='image' is no column"):
        read_dataset_images(tmp_path / "two", column="image")
    assert read_dataset_images(tmp_path / "two", column="right").column == "right"
    _image_dataset(hf_datasets, {"image": pictures[:1]}).save_to_disk(tmp_path / "one")
    with pytest.raises(ValueError, match=r"column 'image' of .* has 1 row\(s\) with an image"):
        read_dataset_images(tmp_path / "one")


def test_compress_refuses_image_dataset_errors_before_writing_out(
    hf_datasets, vit_folder, tmp_path, capsys
):
    """Refused before the model is loaded and before --out is written."""
    pictures = _pictures(3)
    two = _image_dataset(hf_datasets, {"label": [0, 1, 2], "left": pictures, "right": pictures})
    two.save_to_disk(tmp_path / "two")
    lines = tmp_path / "lines.txt"
    lines.write_text("a line of several words\n" * 4, encoding="utf-8")
    out = tmp_path / "out"
    args = ["compress", str(vit_folder), "--out", str(out)]
    for extra, message in (
        (["--dataset", str(lines)], "has no Image column, which an image model reads"),
        (["--dataset", str(tmp_path / "two")], "2 Image columns ['left', 'right']"),
        (
            ["--dataset", str(tmp_path / "two"), "--dataset-column", "label"],
            "dataset_column='label' is not an Image column",
        ),
        (["--dataset", str(tmp_path / "two"), "--dataset-split", "test"], "has no splits"),
    ):
        assert main([*args, *extra, "--steps", "2"]) == 1
        assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match="not both: got images="):
        compress_pretrained(str(vit_folder), images=tmp_path, dataset=tmp_path / "two")
    assert not out.exists()
