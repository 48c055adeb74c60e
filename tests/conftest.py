import pytest
import torch


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
