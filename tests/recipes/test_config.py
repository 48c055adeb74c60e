import pytest

pytest.importorskip("yaml")
from gblr.recipes.config import (
    CONFIG_DIR,
    config_to_dict,
    load_config,
    resume_changes,
    shipped_configs,
)


def test_every_shipped_config_loads_and_the_cifar_ones_follow_the_paper():
    names = shipped_configs()
    assert {"cifar10-vit-s-gblr", "cifar100-vit-s-gblr", "cifar10-mixer-s-gblr"} <= set(names)
    configs = {name: load_config(name) for name in names}
    for name in ("cifar10-vit-s-gblr", "cifar100-vit-s-gblr"):
        vit = configs[name]
        # the (and the official code's) CIFAR setup
        assert (vit.optim.lr, vit.optim.weight_decay, vit.optim.batch_size) == (5e-4, 0.05, 1024)
        assert vit.optim.epochs == 300 and vit.learner.sigma == [1.0, 100.0]
        assert vit.learner.sigma_start == 5 and vit.data.mixup > 0 and vit.data.cutmix > 0
        assert (vit.model.name, vit.model.dim, vit.model.depth, vit.model.patch_size) == (
            "vit",
            384,
            12,
            4,
        )
    mixer = configs["cifar100-mixer-s-gblr"]
    assert mixer.data.name == "cifar100"  # from the cifar100 file
    assert (mixer.model.name, mixer.model.dim, mixer.model.depth) == ("mixer", 512, 8)  # extends
    assert mixer.optim.epochs == 300 and mixer.optim.lr == 5e-4 and mixer.data.mixup > 0
    # every value is cited: each key line of the CIFAR-10 files carries a source or a reason
    text = (CONFIG_DIR / "cifar10-vit-s-gblr.yaml").read_text()
    assert "github.com/changwoolee/Gaudi-GBLR" in text and "[vit-s]" in text


def test_overrides_are_typed_and_merged():
    config = load_config(
        "digits-vit-gblr",
        ["optim.lr=5e-4", "trainer.devices=[0,1]", "structure.start_cost=null", "seed=3"],
    )
    assert config.optim.lr == 5e-4 and isinstance(config.optim.lr, float)  # YAML reads a str
    assert config.trainer.devices == [0, 1] and config.seed == 3
    assert config.structure.start_cost is None
    assert config.model.dim == 64  # untouched keys keep the file's values
    assert config_to_dict(config)["optim"]["lr"] == 5e-4


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optim.lrr=1"], r"unknown config key 'optim.lrr' \(did you mean 'lr'\?\)"),
        (["optm.lr=1"], r"unknown config key 'optm' \(did you mean 'optim'\?\)"),
        (["optim.lr=abc"], r"optim.lr must be float, got 'abc'"),
        (["optim.batch_size=1.5"], r"optim.batch_size must be int"),
        (["structure.kind=butterfly"], r"structure.kind must be one of .*monarch"),
        (["structure.budget=1.5"], r"structure.budget must be in \(0, 1\]"),
        (["optim.epochs=10"], r"exactly one of optim.epochs and optim.steps"),
        (["trainer.logger=wandb"], r"trainer.logger must be one of csv, tensorboard"),
        (["learner.sigma=[1]"], r"learner.sigma must be \[start, end\]"),
        (["learner.max_shift=0"], r"learner.max_shift must be finite and > 0"),
        (["learner.merge=1.5"], r"learner.merge must be a tolerance in \[0, 1\) or null"),
        (["learner.untangle=-1"], r"learner.untangle must be a tolerance in \[0, 1\) or null"),
        (["learner.refine=2"], r"learner.refine must be a tolerance in \[0, 1\) or null"),
        (["learner.merge_every=0"], r"learner.merge_every must be finite and > 0"),
        (["learner.exact_from=0"], r"learner.exact_from must be a fraction of the run in \(0, 1\]"),
        (["learner.exact_from=1.5"], r"learner.exact_from must be .* got 1.5"),
        (["optim=3"], r"optim must be a mapping"),
        (["optim.lr"], r"must look like section.key=value"),
        # the start-up failures that used to reach Lightning after config.yaml was written
        (["optim.lr=.nan"], r"optim.lr must be a number, got nan"),
        (["optim.lr=.inf"], r"optim.lr must be finite and > 0, got inf"),
        (["optim.warmup=nan"], r"optim.warmup must be float"),
        (["trainer.precision=bogus"], r"trainer.precision must be one of .*bf16-mixed"),
        (["trainer.devices=-3"], r"trainer.devices must be a count >= 1, -1 \(all\)"),
        (["trainer.devices=0"], r"trainer.devices must be .*got 0"),
        (["trainer.devices=[]"], r"trainer.devices must be .*got \[\]"),
        (["trainer.devices=gpu"], r"trainer.devices must be .*got 'gpu'"),
        (["optim.steps=2.5"], r"optim.steps must be int \| None, got 2.5"),
        # the library's own models, named by their keys (were "dim=64 must be a multiple
        # of heads=3" from the model, and a crash inside torch for mlp_ratio=0)
        (["model.heads=3"], r"model.dim=64 must be a multiple of model.heads=3"),
        (["model.patch_size=3"], r"model.image_size=8 must be a multiple of model.patch_size=3"),
        (["model.mlp_ratio=0"], r"model.mlp_ratio must be finite and > 0, got 0.0"),
        (["model.mlp_ratio=0.01"], r"model.mlp_ratio=0.01 gives hidden layers of .* = 0 units"),
        (
            ["model.name=mixer", "model.channel_mlp_ratio=0.001"],
            r"model.channel_mlp_ratio=0.001 gives hidden layers .* = 0 units",
        ),
    ],
)
def test_bad_keys_and_values_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config("digits-vit-gblr", overrides)


def test_whole_numbers_written_as_floats_are_counts():
    """`optim.steps: 10.0` (or 1.0e+4, a YAML float) was refused as not an int."""
    config = load_config("digits-vit-gblr", ["optim.steps=10.0", "optim.batch_size=1.0e+2"])
    assert config.optim.steps == 10 and isinstance(config.optim.steps, int)
    assert config.optim.batch_size == 100 and isinstance(config.optim.batch_size, int)
    assert load_config("digits-vit-gblr", ["model.name=mixer", "model.heads=3"]).model.heads == 3


@pytest.mark.parametrize("devices", ["auto", "2", "0,1", "-1", "[0, 1]", "-1"])
def test_lightnings_device_forms_are_accepted(devices):
    config = load_config("digits-vit-gblr", [f"trainer.devices={devices}"])
    assert str(config.trainer.devices).replace(" ", "") == devices.replace(" ", "")


def test_resume_changes_name_what_would_not_take_effect():
    saved = config_to_dict(load_config("digits-vit-gblr"))
    moved = load_config("digits-vit-gblr", ["trainer.devices=2", "out=elsewhere"])
    assert resume_changes(saved, config_to_dict(moved)) == []
    changed = load_config("digits-vit-gblr", ["optim.lr=0.5", "structure.budget=0.2"])
    assert resume_changes(saved, config_to_dict(changed)) == [
        "optim.lr: 0.002 in the checkpoint, 0.5 now",
        "structure.budget: 0.3 in the checkpoint, 0.2 now",
    ]


def test_an_image_folder_config_names_its_validation_folder():
    with pytest.raises(ValueError, match=r"data\.val_root must name the validation image"):
        load_config("digits-vit-gblr", ["data.name=folder", "data.root=a"])


def test_bad_files_say_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"did you mean cifar10-vit-s-gblr"):
        load_config("cifar10-vit-s")
    typo = tmp_path / "typo.yaml"
    typo.write_text("extends: digits-vit-gblr\nmodel:\n  deepth: 2\n")
    with pytest.raises(ValueError, match=r"unknown config key 'model.deepth'.*'depth'"):
        load_config(typo)
    loop = tmp_path / "a.yaml"
    loop.write_text("extends: b\n")
    (tmp_path / "b.yaml").write_text("extends: a\n")
    with pytest.raises(ValueError, match="'extends' loops"):
        load_config(loop)
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(broken)
    # a file that extends a shipped config changes only what it names
    small = tmp_path / "small.yaml"
    small.write_text("extends: cifar10-vit-s-gblr\nmodel:\n  depth: 2\n")
    config = load_config(small)
    assert config.model.depth == 2 and config.model.dim == 384 and config.data.name == "cifar10"
    # ...but its name and run folder are its own: inherited, its run went into the shipped
    # config's folder (and was refused there as another run, or resumed it)
    assert (config.name, config.out) == ("small", "runs/small")
    named = tmp_path / "named.yaml"
    named.write_text("extends: small\nname: mine\n")
    assert (load_config(named).name, load_config(named).out) == ("mine", "runs/mine")
    assert load_config(named, ["out=elsewhere"]).out == "elsewhere"
    # a file named without .yaml is found, as `extends:` finds it
    assert load_config(tmp_path / "named").name == "mine"
    # an empty `extends:` ran on the library's defaults; a missing parent did not say
    # which file asked for it
    empty = tmp_path / "empty.yaml"
    empty.write_text("extends:\nmodel:\n  depth: 2\n")
    with pytest.raises(ValueError, match=r"empty.yaml: 'extends' must name a config, got None"):
        load_config(empty)
    orphan = tmp_path / "orphan.yaml"
    orphan.write_text("extends: nowhere\n")
    with pytest.raises(FileNotFoundError, match=r"orphan.yaml extends 'nowhere': config"):
        load_config(orphan)


def test_the_learner_section_sets_the_final_phase():
    from gblr.recipes.config import learner_config

    assert learner_config(load_config("digits-vit-gblr")).exact_from == 0.95  # the default
    assert (
        learner_config(load_config("digits-vit-gblr", ["learner.exact_from=0.9"])).exact_from == 0.9
    )
    assert (
        learner_config(load_config("digits-vit-gblr", ["learner.exact_from=null"])).exact_from
        is None
    )


def test_the_learner_section_says_whether_removed_components_come_back():
    from gblr.recipes.config import learner_config

    assert learner_config(load_config("digits-vit-gblr")).revive is False  # the default
    revived = learner_config(load_config("digits-vit-gblr", ["learner.revive=true"]))
    assert revived.revive is True
    with pytest.raises(ValueError, match=r"learner.revive must be bool, got 2"):
        load_config("digits-vit-gblr", ["learner.revive=2"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.mean=[0.5]"], r"data\.mean is given without data\.std"),
        (["data.mean=[0.5]", "data.std=[0.2]"], r"apply to image folders.*digits"),
        (["data.augment=standard"], r"applies to CIFAR.*digits takes none"),
        (
            ["data.name=folder", "data.root=a", "data.val_root=b", "data.augment=standard"],
            r"folder takes none",
        ),
    ],
)
def test_data_keys_the_dataset_would_ignore_are_refused(overrides, message):
    """They were accepted and did nothing (digits normalizes by its own statistics,
    only CIFAR builds an augmentation)."""
    with pytest.raises(ValueError, match=message):
        load_config("digits-vit-gblr", overrides)


def test_image_only_data_keys_are_refused_for_a_language_model():
    text = ["data.root=x"]
    with pytest.raises(ValueError, match=r"data\.mixup=0\.2 applies to image classifiers"):
        load_config("wikitext103-gpt2-gblr", [*text, "data.mixup=0.2"])
    with pytest.raises(ValueError, match=r"data\.label_smoothing"):
        load_config("wikitext103-gpt2-gblr", [*text, "data.label_smoothing=0.1"])
    # where they apply they are kept
    folder = ["data.name=folder", "data.root=a", "data.val_root=b"]
    config = load_config("digits-vit-gblr", [*folder, "data.mean=[0.5]", "data.std=[0.2]"])
    assert (config.data.mean, config.data.std) == ([0.5], [0.2])
