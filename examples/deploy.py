"""Deploy a GBLR model: freeze it into its exact inference form, let the planner time the
execution plans on this machine for your batch size, save it, load it without training
code, export it to ONNX (with the ``[onnx]`` extra), and compare its latency with the
dense model's.

    python examples/deploy.py               # 768x3072 MLP at 20% of the MACs, 4096 rows
    python examples/deploy.py --smoke       # small sizes (CI)
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch

import gblr

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--rows", type=int, default=4096, help="input rows (batch x tokens)")
parser.add_argument("--smoke", action="store_true", help="small sizes")
args = parser.parse_args()
dim, hidden, rows = (64, 256, 256) if args.smoke else (768, 3072, args.rows)

torch.manual_seed(0)


def mlp() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(dim, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, dim)
    )


dense = mlp().eval()
model = mlp()
# a trained model would come from the learner; here each layer starts at 20% of its MACs
for index in (0, 2):
    layer = model[index]
    model[index] = gblr.GBLRLinear(
        layer.in_features, layer.out_features, structure_init="half", init_cost=0.2
    )
model.eval()
x = torch.randn(rows, dim)
with torch.no_grad():
    expected = model(x)

frozen = gblr.freeze(model)  # exact boxcar intervals, dead components dropped
report = gblr.plan(frozen, x)  # times dense / lowrank / blocksparse / segment per layer
print(report)
with torch.no_grad():
    assert torch.allclose(frozen(x), expected, rtol=1e-4, atol=1e-5)

path = Path(tempfile.mkdtemp()) / "mlp.safetensors"
gblr.save(frozen, path)  # safetensors + structure JSON + checksum, written atomically
loaded = gblr.load(path)  # an nn.Sequential of frozen layers is rebuilt from the file
gblr.plan(loaded, x)
with torch.no_grad():
    assert torch.equal(loaded(x), frozen(x))

try:  # ONNX export needs the [onnx] extra: pip install -e ".[onnx]"
    import onnx  # noqa: F401
except ImportError:
    print("onnx not installed: skipping the ONNX export")
else:
    # each frozen layer as a dense or low-rank product (fewer MACs), checked in onnxruntime
    exported = gblr.export_onnx(loaded, x[:8], path.with_suffix(".onnx"))
    print(exported)


def median_ms(module: torch.nn.Module, repeats: int = 7) -> float:
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            module(x)
            times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[repeats // 2]


macs = gblr.count_flops(loaded)
print(
    f"MACs ratio {macs.ratio:.3f}; {rows} rows: dense {median_ms(dense):.2f} ms, "
    f"frozen GBLR {median_ms(loaded):.2f} ms (this machine, medians of 7)"
)
