"""Ingest benchmark: a 300-instance 512x512 CT series sent by DCMTK storescu to dicom-node, to DCMTK storescp
and to Orthanc, in one run, several times each, with 1 and with 4 concurrent associations.

Every run sends a freshly generated series (new UIDs), so no receiver ever sees a duplicate. Runs are
interleaved (node, storescp, Orthanc, node, ...) so that the machine's drift hits all three alike. dicom-node
runs with durability on (fsync of file and folder, index committed with SQLite synchronous=FULL) as in
production; storescp does not fsync; Orthanc runs with its default SyncStorageArea=true.

    python -m benchmarks.ingest [--slices 300] [--repeats 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

from benchmarks.ct_series import write_ct_series
from tests.localpeers import node_process, orthanc, storescp, storescu


def send(port: int, called_ae: str, files: list[Path], associations: int) -> float:
    """Seconds to send ``files`` over ``associations`` concurrent storescu processes."""
    chunks = [files[i::associations] for i in range(associations)]
    start = time.perf_counter()
    with ThreadPoolExecutor(associations) as pool:
        results = list(pool.map(lambda chunk: storescu(port, chunk, called_ae), chunks))
    elapsed = time.perf_counter() - start
    for result in results:
        if result.returncode != 0:
            raise RuntimeError(f"storescu to {called_ae} failed: {result.stderr[-2000:]}")
    return elapsed


def run(slices: int, repeats: int, work: Path) -> dict:
    series_counter = iter(range(10_000))
    results: dict[str, dict[str, list[float]]] = {}
    with ExitStack() as stack:
        node = stack.enter_context(node_process(work / "node", [{"ae_title": "STORESCU", "host": "127.0.0.1"}]))
        scp = stack.enter_context(storescp(work / "storescp"))
        pacs = stack.enter_context(orthanc(work / "orthanc"))
        targets = {"dicom-node": (node.port, "DICOM_NODE"), "storescp": (scp.port, "STORESCP"), "orthanc": (pacs.port, "ORTHANC")}
        for associations in (1, 4):
            for _ in range(repeats):
                for name, (port, ae) in targets.items():
                    files = write_ct_series(work / f"series{next(series_counter)}", slices, seed=len(results))
                    os.sync()  # the series' own dirty pages must not be flushed during the timed run
                    seconds = send(port, ae, files, associations)
                    results.setdefault(f"{associations}", {}).setdefault(name, []).append(seconds)
                    print(f"{name:10s} {associations} assoc: {seconds:6.3f} s  {slices / seconds:7.1f} inst/s", flush=True)
                    for f in files:
                        f.unlink()
    return results


def summarize(results: dict, slices: int) -> dict:
    summary = {}
    for associations, per_target in results.items():
        rates = {name: slices / statistics.median(times) for name, times in per_target.items()}
        summary[associations] = {
            "median_seconds": {name: statistics.median(times) for name, times in per_target.items()},
            "instances_per_second": rates,
            "node_vs_storescp": rates["dicom-node"] / rates["storescp"],
            "node_vs_orthanc": rates["dicom-node"] / rates["orthanc"],
        }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the raw and summarized figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ingest-bench-", dir=Path.cwd()) as tmp:
        results = run(args.slices, args.repeats, Path(tmp))
    summary = summarize(results, args.slices)
    for associations, figures in summary.items():
        rates = figures["instances_per_second"]
        print(f"\n{associations} association(s), median of {args.repeats}:")
        for name, rate in rates.items():
            print(f"  {name:10s} {figures['median_seconds'][name]:6.3f} s  {rate:7.1f} instances/s")
        print(f"  dicom-node / storescp = {figures['node_vs_storescp']:.2f}   dicom-node / Orthanc = {figures['node_vs_orthanc']:.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"raw_seconds": results, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
