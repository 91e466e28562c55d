"""One series to its results, as `dicom-node analyze` runs it on a folder (the job worker runs the same)."""

import json
import logging

from pydicom import dcmread

from dicom_node.cli import main
from tests.test_outputs_seg import dciodvfy_errors
from tests.localpeers import write_node_config
from tests.synthetic import write_toy_ct


def test_analyze_writes_a_valid_seg_sr_and_summary_for_each_series(trained_checkpoint, tmp_path, capsys, caplog):
    folder = tmp_path / "DOE_JANE_1980"  # an export foldered by patient
    sources = write_toy_ct(folder / "toy", "-FFF--")
    clear = write_toy_ct(folder / "clear", "---", description="Clear axial")
    (folder / "README.txt").write_text("not DICOM")
    config = write_node_config(tmp_path, 11112, [])
    out = tmp_path / "out"

    caplog.set_level(logging.INFO)
    assert main(["analyze", str(folder), "--out", str(out), "--model", str(trained_checkpoint), "--config", str(config)]) == 0
    assert "1 files in the folder are not DICOM instances" in caplog.text and "DOE_JANE" not in caplog.text

    summaries = {s["series_instance_uid"]: s for s in json.loads((out / "summary.json").read_text())}
    toy_uid, clear_uid = (str(dcmread(p[0]).SeriesInstanceUID) for p in (sources, clear))
    assert set(summaries) == {toy_uid, clear_uid}
    toy = summaries[toy_uid]
    assert toy["assessment"] == "assessed"
    assert sorted(l["label"] for l in toy["lesions"]) == ["Kidney tumor", "Lung nodule"]
    assert all(l["instance_numbers"] == [2, 4] for l in toy["lesions"])  # the three "F" images
    nodule = next(l for l in toy["lesions"] if l["label"] == "Lung nodule")
    assert abs(nodule["volume_ml"] - 40 * 40 * 3 / 1000) < 0.25 * 4.8  # 40x40 px of 1 mm, 3 slices of 1 mm
    assert summaries[clear_uid]["assessment"] == "assessed" and summaries[clear_uid]["lesions"] == []

    seg, sr = dcmread(out / toy_uid / "seg.dcm"), dcmread(out / toy_uid / "sr.dcm")
    assert dciodvfy_errors(out / toy_uid / "seg.dcm") == [] and dciodvfy_errors(out / toy_uid / "sr.dcm") == []
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == toy_uid
    assert seg.StudyInstanceUID == dcmread(sources[0]).StudyInstanceUID
    assert toy["seg_sop_instance_uid"] == seg.SOPInstanceUID and toy["sr_sop_instance_uid"] == sr.SOPInstanceUID
    assert not (out / clear_uid / "seg.dcm").exists()  # no findings: an SR that says so, no empty SEG
    assert "No findings" in str(dcmread(out / clear_uid / "sr.dcm").ContentSequence)
    printed = capsys.readouterr().out
    assert "2 finding(s)" in printed and "2 series" in printed
