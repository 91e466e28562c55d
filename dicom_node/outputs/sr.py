"""The TID 1500 Measurement Report (Comprehensive 3D SR) of a series' interpretation, with highdicom.

Per lesion a volumetric measurement group: the finding (coded from its label), its site where known, its
volume (mL) and largest axial diameter (mm), its reliability level and the mask's predicted quality, and a
reference to its SEG segment. A series with no finding gets one group saying "clinical finding absent"; a
series outside the model's scope one saying "not done", with the reason in the group's tracking identifier,
so that a reader never mistakes "not assessed" for "normal". A pure function: data in, data out.
"""

from __future__ import annotations

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dicom_node.outputs.codes import codes_for
from dicom_node.outputs.seg import AlgorithmInfo, segment_labels, sources_with_type2
from dicom_node.outputs.uids import output_uids, stable_uid, statement_uid, tracking_uid
from inference.engine import Assessment, SeriesResult
from inference.findings import Lesion
from inference.slicing import Volume

SERIES_NUMBER = 9902
PROCEDURES = {"CT": Code("77477000", "SCT", "Computed Tomography"), "MR": Code("113091000", "SCT", "Magnetic resonance imaging")}
IMAGING = Code("363679005", "SCT", "Imaging")
FINDING_ABSENT = Code("373572006", "SCT", "Clinical finding absent")
NOT_DONE = Code("385660001", "SCT", "Not done")
DIAMETER = Code("81827009", "SCT", "Diameter")
MILLILITER = Code("ml", "UCUM", "milliliter")
# Reliability and mask quality have no standard codes: a private coding scheme ("99" prefix, PS3.3 8.2).
RELIABILITY = Code("RELIABILITY", "99DICOMNODE", "AI finding reliability")
LEVELS = {level: Code(level.upper(), "99DICOMNODE", level.capitalize()) for level in ("high", "medium", "low", "unknown")}
ANSWER = Code("121106", "DCM", "Comment")  # holds the model's answer text, e.g. "It is [SEG]. Liver tumor."
MASK_QUALITY = Code("MASKIOU", "99DICOMNODE", "Predicted mask IoU")
RATIO = Code("1", "UCUM", "no units")


def build_sr(sources: list[Dataset], volume: Volume, result: SeriesResult, seg: Dataset | None,
             algorithm: AlgorithmInfo, run: int = 1) -> hd.sr.Comprehensive3DSR:
    """The report for ``result``; ``seg`` is the SEG built for its lesions (None when there are none)."""
    device = hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=stable_uid("device", algorithm.name), name=algorithm.name, model_name=algorithm.version),
    )
    if result.assessment is Assessment.NOT_ASSESSED:
        groups = [_statement(volume, NOT_DONE, f"Not assessed: {result.reason}", algorithm.version, run)]
    elif not result.lesions:
        groups = [_statement(volume, FINDING_ABSENT, "No findings", algorithm.version, run)]
    else:
        if seg is None:
            raise ValueError("lesions need their SEG to be referenced")
        sop_classes = {str(ds.SOPInstanceUID): str(ds.SOPClassUID) for ds in sources}
        groups = [_lesion_group(lesion, label, number, tracking_uid(volume.series_instance_uid, algorithm.version, number, run),
                                seg, sop_classes)
                  for number, (label, lesion) in enumerate(zip(segment_labels(result.lesions), result.lesions), start=1)]
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=PROCEDURES.get(volume.modality, IMAGING),
        imaging_measurements=groups,
    )
    series_uid, sop_uid = output_uids(volume.series_instance_uid, algorithm.version, "SR", run)
    evidence = sources_with_type2(sources, volume) + ([seg] if seg is not None else [])
    return hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=series_uid,
        series_number=SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=run,
        manufacturer="dicom-node",
        is_complete=True,
        series_description=f"AI report ({algorithm.name} {algorithm.version}) - not for diagnosis"[:64],
    )


def _statement(volume: Volume, value: Code, text: str, version: str, run: int) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    uid = statement_uid(volume.series_instance_uid, version, text, run)
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=uid, identifier=text[:64]),
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=codes.DCM.Finding, value=value)],
    )


def _lesion_group(lesion: Lesion, label: str, number: int, uid: str, seg: Dataset,
                  sop_classes: dict[str, str]) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    """The group of SEG segment ``number``, with its Tracking UID ``uid`` and Tracking ID ``label``: the segment's own."""
    coded = codes_for(lesion.label)
    qualitative = [hd.sr.QualitativeEvaluation(name=RELIABILITY, value=LEVELS[lesion.reliability.value])]
    measurements = [
        hd.sr.Measurement(name=codes.SCT.Volume, value=round(lesion.volume_ml, 3), unit=MILLILITER),
        hd.sr.Measurement(name=DIAMETER, value=round(lesion.largest_axial_diameter_mm, 1), unit=codes.UCUM.Millimeter),
        hd.sr.Measurement(name=MASK_QUALITY, value=round(lesion.mean_score, 3), unit=RATIO),
    ]
    source_images = [hd.sr.SourceImageForSegmentation(sop_classes[ref.sop_instance_uid], ref.sop_instance_uid)
                     for ref in lesion.sources]
    group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=uid, identifier=label),
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID, segment_number=number,
            source_images=source_images),
        finding_type=coded.property_type,
        finding_category=coded.category,
        finding_sites=[hd.sr.FindingSite(coded.site)] if coded.site else None,
        measurements=measurements,
        qualitative_evaluations=qualitative,
    )
    for text in lesion.texts:  # the model's own answer(s), as the radiologist should be able to read them
        group[0].ContentSequence.append(
            hd.sr.TextContentItem(name=ANSWER, value=text[:1024], relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    return group
