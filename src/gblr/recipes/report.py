"""Run reports: the learned structure of every layer, read from a saved state dict.

Everything here works from ``model_state.pt`` (a plain ``state_dict`` saved with
``torch.save``; loaded with ``weights_only=True``) and Lightning's ``metrics.csv``, so a
report needs neither the training code nor the model's class.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import torch
from torch import Tensor

from ..cost import gblr_cost
from ..files import save_atomically
from ..ops.gaudi import interval_lengths, interval_starts
from ..tables import text_table

# (load_state is defined with the checkpoints, beside the state file it reads)
from .checkpoints import load_state
from .run_folder import mark_smoke_report, smoke_kind

__all__ = [
    "format_costs",
    "layer_costs",
    "load_state",
    "overlap_image",
    "run_layer_costs",
    "unknown_layers",
    "write_report",
    "write_run_report",
]


def _gblr_prefixes(state: dict[str, Tensor]) -> list[str]:
    return sorted(
        key[: -len("widths")] for key in state if key.endswith("widths") and f"{key[:-6]}U" in state
    )


def overlap_image(state: dict[str, Tensor], prefix: str) -> Tensor:
    """``(out, in)`` count of the components covering each weight entry of one GBLR layer
    (exact eval intervals; wrap-around included).

    Examples:
        >>> from gblr.recipes.models import VisionTransformer, structure_model
        >>> model = VisionTransformer(dim=16, depth=1, heads=2)
        >>> _ = structure_model(model, "gblr", 0.5)
        >>> from gblr.recipes.report import overlap_image
        >>> image = overlap_image(model.state_dict(), "blocks.0.fc1.")  # fc1: 32 x 16
        >>> image.shape, bool((image >= 0).all())
        (torch.Size([32, 16]), True)
    """
    u, v = state[prefix + "U"], state[prefix + "V"]
    widths, locations = state[prefix + "widths"], state[prefix + "locations"]
    rows, cols = u.shape[2], v.shape[2]
    masks = []
    for axis, size in ((1, rows), (0, cols)):
        lengths = interval_lengths(widths[axis], size)
        starts = interval_starts(locations[axis], size)
        index = torch.arange(size)
        masks.append(((index[None, :] - starts[:, None]) % size < lengths[:, None]).float())
    row_masks, col_masks = masks
    return row_masks.t() @ col_masks


def layer_costs(state: dict[str, Tensor]) -> list[dict]:
    """Per layer: name, kind, ``(out, in)`` shape, MACs per row, dense MACs, of the GBLR
    layers (``U``, ``V``, ``widths``) and dense 2-D weights of a state dict; the other
    structured families' parameters are not told apart from other tensors here (see
    `run_layer_costs`, and `unknown_layers`).

    Examples:
        >>> from gblr.recipes.models import VisionTransformer, structure_model
        >>> model = VisionTransformer(dim=16, depth=1, heads=2)
        >>> _ = structure_model(model, "gblr", 0.5)
        >>> from gblr.recipes.report import layer_costs
        >>> costs = layer_costs(model.state_dict())
        >>> [(c["name"], c["kind"], c["shape"], c["dense_macs"]) for c in costs[-2:]]
        [('blocks.0.qkv', 'GBLR', (48, 16), 768), ('head', 'dense', (10, 16), 160)]
        >>> sum(c["macs"] for c in costs) < sum(c["dense_macs"] for c in costs)
        True
    """
    rows = []
    gblr = _gblr_prefixes(state)
    for prefix in gblr:
        u, v = state[prefix + "U"], state[prefix + "V"]
        widths = state[prefix + "widths"]
        out_features, in_features = u.shape[2], v.shape[2]
        macs = gblr_cost(
            interval_lengths(widths[1], out_features),
            interval_lengths(widths[0], in_features),
            u.shape[1],
        )
        shape = (out_features, in_features)
        rows.append(_cost_row(prefix.rstrip("."), "GBLR", shape, macs, out_features * in_features))
    taken = tuple(gblr)
    for key, value in state.items():
        # Other 2-D weights count as dense linear layers (convolution kernels and
        # norm parameters are not 2-D).
        if key.endswith("weight") and value.dim() == 2 and not key.startswith(taken):
            name, shape = key[: -len(".weight")], tuple(value.shape)
            rows.append(_cost_row(name, "dense", shape, value.numel(), value.numel()))
    return sorted(rows, key=lambda row: row["name"])


def _cost_row(name: str, kind: str, shape: tuple, macs: int, dense_macs: int) -> dict:
    """One row of `layer_costs` and `run_layer_costs`."""
    return {
        "name": name,
        "kind": kind,
        "shape": tuple(shape),
        "macs": int(macs),
        "dense_macs": int(dense_macs),
    }


def unknown_layers(state: dict[str, Tensor]) -> list[str]:
    """The modules of ``state`` holding matrices that `layer_costs` does not count: 2-D or
    larger tensors of a module that has neither GBLR's ``U``/``V``/``widths`` nor a
    ``weight`` (a low-rank layer's ``U`` and ``V``, Monarch's ``left`` and ``right``,
    block-diagonal ``blocks``, ...).

    Examples:
        >>> import torch, gblr
        >>> from gblr.recipes.report import unknown_layers
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
        >>> _ = gblr.convert(model, gblr.LowRankConfig(budget=0.3, include="0"))
        >>> unknown_layers(model.state_dict())
        ['0']
    """
    gblr = tuple(_gblr_prefixes(state))
    modules: dict[str, set[str]] = {}
    for key, value in state.items():
        module, _, name = key.rpartition(".")
        if value.dim() >= 2 and not key.startswith(gblr):
            modules.setdefault(module, set()).add(name)
    return sorted(module or "(model)" for module, names in modules.items() if "weight" not in names)


def run_layer_costs(run_dir: str | Path) -> list[dict]:
    """`layer_costs` rows of a run folder's model, rebuilt from its ``config.yaml`` and
    ``model_state.pt`` and counted by [`gblr.count_flops`][]: every structured family
    (low-rank, Monarch, ... whose parameters a state dict alone does not tell from other
    tensors), GBLR and the dense linear layers and convolutions (``kind``: the layer's
    class name; per input row, or per output position for a convolution).

    Examples:
        >>> import tempfile
        >>> from gblr.recipes.config import load_config
        >>> from gblr.recipes.report import run_layer_costs
        >>> from gblr.recipes.train import train_from_config
        >>> out = tempfile.mkdtemp()
        >>> tiny = ["model.dim=16", "model.depth=1", "model.heads=2", "optim.steps=1"]
        >>> settings = [*tiny, "structure.kind=lowrank", "trainer.logger=none", f"out={out}"]
        >>> config = load_config("digits-vit-gblr", settings)
        >>> _ = train_from_config(config, progress=False)
        >>> sorted({row["kind"] for row in run_layer_costs(out)})
        ['Conv2d', 'Linear', 'LowRankLinear']
    """
    from ..cost import count_flops
    from .build import model_from_run

    model, _, _ = model_from_run(run_dir)
    rows = [
        _cost_row(layer.name, layer.kind, layer.shape, layer.macs, layer.dense_macs)
        for layer in count_flops(model).layers
    ]
    return sorted(rows, key=lambda row: row["name"])


def format_costs(rows: list[dict]) -> str:
    """The per-layer cost table of [`layer_costs`][gblr.recipes.report.layer_costs] (or rows like
    them) as text, with a total row.

    Examples:
        >>> from gblr.recipes.report import format_costs
        >>> row = {"name": "fc", "kind": "GBLR", "shape": (8, 4), "macs": 16, "dense_macs": 32}
        >>> print(format_costs([row]).splitlines()[1])
        fc                          GBLR            8x4          16        32   0.500
    """
    header = ["layer", "kind", "shape", "MACs/row", "dense", "ratio"]
    cells = [
        [
            row["name"],
            row["kind"],
            f"{row['shape'][0]}x{row['shape'][1]}",
            f"{row['macs']:,}",
            f"{row['dense_macs']:,}",
            f"{row['macs'] / row['dense_macs']:.3f}",
        ]
        for row in rows
    ]
    macs = sum(row["macs"] for row in rows)
    dense = sum(row["dense_macs"] for row in rows)
    cells.append(["total", "", "", f"{macs:,}", f"{dense:,}", f"{macs / max(dense, 1):.3f}"])
    return text_table(header, cells, align="<<>>>>", widths=_COST_WIDTHS, sep="")


_COST_WIDTHS = (28, 7, 12, 12, 10, 8)


def _savefig(figure, path: Path) -> None:
    save_atomically(lambda f: figure.savefig(f, format="png", dpi=110, bbox_inches="tight"), path)


# Logged names that changed: run folders written before still draw their curves.
_RENAMED_METRICS = {"gblr/mac_ratio": "gblr/macs_ratio"}


def _read_metrics(run_dir: Path) -> dict[str, list[tuple[float, float]]]:
    path = run_dir / "metrics.csv"
    series: dict[str, list[tuple[float, float]]] = {}
    if not path.is_file():
        return series
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            step = float(row.get("step") or 0)
            for key, value in row.items():
                if key in ("step", "epoch") or value in ("", None):
                    continue
                key = _RENAMED_METRICS.get(key, key)
                series.setdefault(key, []).append((step, float(value)))
    return series


def write_report(run_dir: str | Path) -> Path:
    """Write ``REPORT.md`` and its PNG figures into ``run_dir``; returns the Markdown path.

    Figures: the block-overlap image of every GBLR layer (how many components cover each
    weight entry, as in the paper's figure of learned masks), MACs per layer, training
    loss and accuracy, and σ and the MACs ratio over the steps (when logged).

    Examples:
        The report of a one-step run of a tiny ViT:

        >>> import tempfile
        >>> from gblr.recipes.config import load_config
        >>> from gblr.recipes.report import write_report
        >>> from gblr.recipes.train import train_from_config
        >>> out = tempfile.mkdtemp()
        >>> tiny = ["model.dim=16", "model.depth=1", "model.heads=2", "optim.steps=1"]
        >>> config = load_config("digits-vit-gblr", [*tiny, "trainer.logger=none", f"out={out}"])
        >>> _ = train_from_config(config, progress=False)
        >>> path = write_report(out)
        >>> path.name, path.read_text().startswith("#")
        ('REPORT.md', True)
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("reports need matplotlib: pip install 'gblr[train]'") from error
    run_dir = Path(run_dir)
    state = load_state(run_dir)
    figures = run_dir / "figures"
    figures.mkdir(exist_ok=True)
    lines = [f"# Run report: {run_dir.name}", ""]

    # the rebuilt model knows every family's cost; the state dict alone only GBLR's and
    # dense weights' (a run folder from before config.yaml was written has no other)
    costs = run_layer_costs(run_dir) if (run_dir / "config.yaml").is_file() else layer_costs(state)
    lines += ["## Cost per layer", "", "```", format_costs(costs), "```", ""]
    figure, axis = plt.subplots(figsize=(8, 0.3 * len(costs) + 1))
    axis.barh([row["name"] for row in costs], [row["macs"] for row in costs], label="MACs/row")
    axis.barh(
        [row["name"] for row in costs],
        [row["dense_macs"] for row in costs],
        fill=False,
        edgecolor="grey",
        label="dense",
    )
    axis.set_xlabel("MACs per input row")
    axis.invert_yaxis()
    axis.legend()
    _savefig(figure, figures / "macs_per_layer.png")
    plt.close(figure)
    lines += ["![MACs per layer](figures/macs_per_layer.png)", ""]

    prefixes = _gblr_prefixes(state)
    if prefixes:
        columns = min(4, len(prefixes))
        grid_rows = math.ceil(len(prefixes) / columns)
        figure, axes = plt.subplots(
            grid_rows,
            columns,
            figsize=(3.8 * columns, 3.2 * grid_rows),
            squeeze=False,
            constrained_layout=True,
        )
        for axis in axes.flat[len(prefixes) :]:
            axis.axis("off")
        for axis, prefix in zip(axes.flat, prefixes):
            image = overlap_image(state, prefix)
            shown = axis.imshow(
                image.numpy(), cmap="viridis", interpolation="nearest", aspect="auto"
            )
            axis.set_title(prefix.rstrip("."), fontsize=8)
            figure.colorbar(shown, ax=axis, fraction=0.046)
        figure.suptitle("components covering each weight entry (rows: outputs, columns: inputs)")
        _savefig(figure, figures / "masks.png")
        plt.close(figure)
        lines += ["## Learned structure", "", "![GBLR masks](figures/masks.png)", ""]

    series = _read_metrics(run_dir)
    panels = [
        key
        for key in ("train/loss", "train/accuracy", "gblr/sigma", "gblr/macs_ratio")
        if key in series
    ]
    if panels:
        figure, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.0), squeeze=False)
        for axis, key in zip(axes[0], panels):
            steps, values = zip(*series[key])
            axis.plot(steps, values)
            axis.set_title(key, fontsize=9)
            axis.set_xlabel("step")
            if key == "gblr/sigma":
                axis.set_yscale("log")
        _savefig(figure, figures / "training.png")
        plt.close(figure)
        lines += ["## Training", "", "![training curves](figures/training.png)", ""]

    report = run_dir / "REPORT.md"
    save_atomically(lambda f: f.write("\n".join(lines)), report, text=True)
    return report


def write_run_report(run_dir: str | Path) -> Path:
    """[`write_report`][gblr.recipes.report.write_report], with a banner on top when the folder
    holds a smoke run (so that its numbers are not taken for results); returns the Markdown path.

    Examples:
        >>> import tempfile
        >>> from gblr.recipes.config import load_config
        >>> from gblr.recipes.report import write_run_report
        >>> from gblr.recipes.smoke import smoke_config
        >>> from gblr.recipes.train import train_from_config
        >>> out = tempfile.mkdtemp()
        >>> config = load_config("digits-vit-gblr", ["trainer.logger=none", f"out={out}"])
        >>> smoke, _ = smoke_config(config)
        >>> _ = train_from_config(smoke, progress=False)
        >>> write_run_report(out).read_text().startswith("> **Smoke run**")
        True
    """
    path = write_report(run_dir)
    if smoke_kind(run_dir):
        mark_smoke_report(path)
    return path
