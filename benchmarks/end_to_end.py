"""End-to-end latency: from the last instance's acknowledgement to the SR stored in Orthanc, by stage.

A 300-slice 512x512 CT series is sent with DCMTK storescu to a node started as an admin would
(``dicom-node serve``, its default workers) with the completion wait set to ``--wait`` seconds and Orthanc
as its destination. Stage boundaries come from the node's own records (the series' last arrival, the
job's creation, start and end, the pipeline's timings); the SR's arrival is when it is first found in
Orthanc (polled every 0.1 s).

    python -m benchmarks.end_to_end [--slices 300] [--wait 2] [--model CHECKPOINT]

Without --model the model has the default architecture with fresh heads, capped at 8 answer tokens (the
length of a typical answer), as in benchmarks.inference: the time is right, the answers are not.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import select

from benchmarks.ct_series import write_ct_series
from storage.database import make_engine, make_sessionmaker
from storage.models import Job, Series
from tests.localpeers import free_port, orthanc, orthanc_find, start_node, storescu, write_node_config


def fresh_checkpoint(folder: Path) -> Path:
    from inference.model.builtin import BuiltinModel
    from inference.model.card import ModelCard
    from inference.model.grounded import GroundedConfig

    architecture = dataclasses.replace(GroundedConfig(), max_new_tokens=8).to_dict()
    BuiltinModel.new(ModelCard(name="benchmark", version="0", architecture=architecture, modalities=("CT",))).save(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--wait", type=float, default=2.0, help="jobs.completion_wait_s")
    parser.add_argument("--model", type=Path, help="checkpoint folder (default: default architecture, fresh heads)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="e2e-bench-") as tmp:
        tmp_path = Path(tmp)
        model = args.model.resolve() if args.model else fresh_checkpoint(tmp_path / "model")
        paths = write_ct_series(tmp_path / "ct", args.slices)
        node_port = free_port()
        with orthanc(tmp_path / "orthanc") as pacs:
            extra = (f"\n[jobs]\ncompletion_wait_s = {args.wait}\npoll_s = 0.5\n\n"
                     f'[[routes]]\nname = "ct"\nmodalities = ["CT"]\nmodel = "{model}"\n')
            peers = [{"ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs.port, "allow": ["echo", "destination"]},
                     {"ae_title": "STORESCU", "host": "127.0.0.1", "allow": ["store"]}]
            config = write_node_config(tmp_path / "node", node_port, peers, extra=extra)
            node = start_node(config, node_port, tmp_path / "node")
            try:
                _wait_for_model(tmp_path / "node" / "node.log")  # a node in service has its model loaded
                result = storescu(node_port, paths, "DICOM_NODE")
                assert result.returncode == 0, result.stderr
                sr_seen = _wait_for_sr(pacs)
            finally:
                node.stop()
        figures = _stages(config.parent / "data" / "index.sqlite", sr_seen)
    figures.update(slices=args.slices, wait_s=args.wait)
    for name, value in figures.items():
        print(f"{name:28} {value:8.2f}" if isinstance(value, float) else f"{name:28} {value}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


def _wait_for_model(log: Path, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if log.is_file() and "loaded in" in log.read_text(errors="replace"):
            return
        time.sleep(0.2)
    raise TimeoutError(f"the node did not load its model within {timeout_s:.0f} s (see {log})")


def _wait_for_sr(pacs, timeout_s: float = 3600) -> datetime:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if orthanc_find(pacs, "Series", {"Modality": "SR"}):
            return datetime.now(timezone.utc).replace(tzinfo=None)
        time.sleep(0.1)
    raise TimeoutError("the SR never reached Orthanc")


def _stages(database: Path, sr_seen: datetime) -> dict:
    engine = make_engine(f"sqlite:///{database}")
    with make_sessionmaker(engine)() as session:
        job, series = session.execute(select(Job, Series).join(Series, Job.series_fk == Series.id)).one()
    engine.dispose()
    seconds = json.loads(job.summary)["seconds"]
    worked = (job.finished_at - job.started_at).total_seconds()
    stages = {
        "wait for completion": (job.created_at - series.last_received_at).total_seconds(),
        "queue to start": (job.started_at - job.created_at).total_seconds(),
        "load and slice": seconds["load"],
        "model": seconds["model"],
        "SEG and SR": seconds["outputs"],
        "store, index, queue": worked - sum(seconds.values()),
        "delivery to Orthanc": (sr_seen - job.finished_at).total_seconds(),
        "total": (sr_seen - series.last_received_at).total_seconds(),
    }
    stages["total minus model"] = stages["total"] - stages["model"]
    return {k: round(v, 2) for k, v in stages.items()}


if __name__ == "__main__":
    main()
