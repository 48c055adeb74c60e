import os

import pytest
import torch

# Without a GPU the Triton kernels are tested through Triton's interpreter on CPU tensors.
# Triton reads the flag when its language module is first imported (its own helpers such
# as tl.sum are jitted functions), so it is set before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Under pytest-xdist each worker process takes one core's share of torch's threads, so
# that the workers do not oversubscribe the machine's cores; the processes a test starts
# get the same count (a fresh process's outputs are compared bit for bit with this one's,
# and another thread count sums in another order).
if os.environ.get("PYTEST_XDIST_WORKER") and not torch.cuda.is_available():
    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, torch.get_num_threads() // _workers))
    os.environ["OMP_NUM_THREADS"] = str(torch.get_num_threads())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def circular_boxcar(starts, lengths, n, dtype=torch.float64):
    """Brute-force reference: a Python loop over each interval's indices."""
    out = torch.zeros(len(starts), n, dtype=dtype)
    for k, (s, length) in enumerate(zip(starts, lengths)):
        for t in range(length):
            out[k, (s + t) % n] = 1.0
    return out


def tiny_bert():
    """A 1-layer BERT (hidden 32, 2 heads, vocab 100) with random weights seeded 0, built
    offline from a config, in eval mode; skips the test without transformers."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        vocab_size=100,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()
