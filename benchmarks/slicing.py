"""Slicing benchmark: a 300-slice 512x512 CT series from its files to model-ready slices.

Each repeat runs in a fresh Python process (so peak memory is the pipeline's own, imports included):
`load_series` (read, decode, order, HU) then `prepare` (window, resize to 256x256). The files are in the
page cache, as they are when the node has just received them.

    python -m benchmarks.slicing [--slices 300] [--repeats 5] [--size 256]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.ct_series import write_ct_series

CHILD = """
import json, resource, sys, time
from pathlib import Path
t0 = time.perf_counter()
from inference.preprocess import prepare
from inference.slicing import load_series
t1 = time.perf_counter()
paths = sorted(Path(sys.argv[1]).glob("*.dcm"))
volume = load_series(paths)
t2 = time.perf_counter()
model_input = prepare(volume, size=int(sys.argv[2]))
t3 = time.perf_counter()
print(json.dumps({"load_s": t2 - t1, "prepare_s": t3 - t2, "total_s": t3 - t1, "import_s": t1 - t0,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "shape": list(model_input.images.shape)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="slicing-bench-") as tmp:
        write_ct_series(Path(tmp), args.slices)
        runs = []
        for _ in range(args.repeats):
            out = subprocess.run([sys.executable, "-c", CHILD, tmp, str(args.size)], capture_output=True, text=True,
                                 check=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
            runs.append(json.loads(out.stdout))
            print(json.dumps(runs[-1]))
    median = {key: statistics.median(r[key] for r in runs) for key in ("load_s", "prepare_s", "total_s", "peak_rss_mb")}
    print(f"\n{args.slices} slices of 512x512 -> {runs[0]['shape']} float32, median of {args.repeats}: "
          f"load {median['load_s']:.2f} s + prepare {median['prepare_s']:.2f} s = {median['total_s']:.2f} s, "
          f"peak RSS {median['peak_rss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
