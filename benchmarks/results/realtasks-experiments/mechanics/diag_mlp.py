"""Development trace of one t1-mlp run (a record, see README.md): live components, covered
area and test accuracy every EVERY steps.

    python diag_mlp.py VARIANT_JSON SEED EVERY
"""

import json
import os
import sys

import lightning.pytorch as pl
import torch

sys.path.insert(0, os.environ.get("BENCH", "/work/wt-diag2/benchmarks"))
import realtask_vision as rv
from gblr.layers.linear import GBLRLinear

opts = json.loads(sys.argv[1])
seed = int(sys.argv[2])
every = int(sys.argv[3]) if len(sys.argv) > 3 else 50
train, test = rv._upsampled_data()
init = {}


def exact(l):
    was = l.training
    l.eval()
    with torch.no_grad():
        cm, rm = l.masks()
        W = l.dense_weight().detach().clone()
    l.train(was)
    w = l.widths.detach()
    alive = (w > 0).all(0)
    sup = torch.einsum("kr,kc->rc", rm[alive], cm[alive]) > 0
    return sup, int(alive.sum()), W


class Diag(pl.Callback):
    def on_train_batch_end(self, trainer, module, outputs, batch, i):
        s = trainer.global_step
        m = module.model
        if s == 1 or s % every == 0:
            parts = []
            for n, l in m.named_modules():
                if isinstance(l, GBLRLinear):
                    sup, alive, _ = exact(l)
                    if n not in init:
                        init[n] = sup
                    s0 = init[n]
                    kept = (sup & s0).sum().item() / max(1, s0.sum().item())
                    new = (sup & ~s0).sum().item() / max(1, s0.sum().item())
                    sig = float(l.sigma) if not l.sigma.is_meta else -1
                    parts.append(
                        f"{n}: alive {alive} area {sup.float().mean():.3f} kept {kept:.2f} "
                        f"new {new:.2f} sig {sig:.3g}"
                    )
            m.eval()
            with torch.no_grad():
                x, y = test.tensors
                acc = (m(x).argmax(-1) == y).float().mean().item()
                xt, yt = train.tensors
                tl = torch.nn.functional.cross_entropy(m(xt), yt).item()
            m.train()
            print(
                f"{s:4d} loss {float(outputs['loss']):.3f} trainloss(eval) {tl:.3f} "
                f"test {acc:.4f} | " + " | ".join(parts),
                flush=True,
            )


import gblr.recipes.engine as E  # noqa: E402

orig = E._run


def run(module, tr, va, config, cbs, bf):
    return orig(module, tr, va, config, [*cbs, Diag()], bf)


E._run = run
torch.set_num_threads(1)
print(rv.train_digits("mlp", "gblr", 0.1, seed, False, opts))
