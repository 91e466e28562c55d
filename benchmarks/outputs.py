"""Output benchmark: building the DICOM-SEG and the TID 1500 SR for a 300-slice 512x512 CT series with two
lesions spanning 40 slices each (headers read from the stored files, as the pipeline does).

    python -m benchmarks.outputs [--slices 300] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from pydicom import dcmread

from benchmarks.ct_series import write_ct_series
from dicom_node.outputs.seg import AlgorithmInfo, build_seg
from dicom_node.outputs.sr import build_sr
from inference.engine import Assessment, SeriesResult
from inference.findings import SliceFinding, aggregate
from inference.reliability import Reliability
from inference.slicing import load_series


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    algorithm = AlgorithmInfo("dicom-node built-in", "benchmark")
    with tempfile.TemporaryDirectory(prefix="outputs-bench-") as tmp:
        paths = write_ct_series(Path(tmp), args.slices)
        volume = load_series(paths)
        findings = []
        for k in range(args.slices // 3, args.slices // 3 + 40):
            liver, kidney = np.zeros((512, 512), bool), np.zeros((512, 512), bool)
            liver[200:260, 220:300], kidney[350:380, 100:130] = True, True
            findings += [SliceFinding(k, "Liver tumor", liver, 0.9, Reliability.HIGH),
                         SliceFinding(k, "Kidney tumor", kidney, 0.8, Reliability.MEDIUM)]
        lesions = aggregate(volume, findings)
        result = SeriesResult(Assessment.ASSESSED, "", lesions, algorithm.version)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            sources = [dcmread(p, stop_before_pixels=True) for p in paths]
            seg = build_seg(sources, volume, lesions, algorithm)
            build_sr(sources, volume, result, seg, algorithm)
            times.append(time.perf_counter() - start)
            print(f"SEG + SR: {times[-1]:.2f} s ({int(seg.NumberOfFrames)} SEG frames)")
    print(f"\nmedian of {args.repeats}: {statistics.median(times):.2f} s for {args.slices} slices, {len(lesions)} lesions")


if __name__ == "__main__":
    main()
