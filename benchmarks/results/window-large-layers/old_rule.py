"""``benchmarks/bench_families.py`` with the rule before 2026-12-07 (the held strips'
window form only where the rows are fewer than ``in * out / (K r)``), for comparison:

    python benchmarks/results/window-large-layers/old_rule.py --skip-errors \
        --families gblr-default lowrank --output OUT.json
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/
import bench_families
import gblr.layers.linear

gblr.layers.linear.WINDOWED_LAYER_ENTRIES = 10**18
sys.exit(bench_families.main(sys.argv[1:]))
