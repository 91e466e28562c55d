"""SNOMED CT codes for finding labels: segmented property category, type and anatomic region.

Labels the table does not know fall back to a generic "Lesion" so a SEG is always valid; extend the table
when a model learns a new finding.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

ABNORMAL = codes.SCT.MorphologicallyAbnormalStructure


@dataclass(frozen=True)
class FindingCodes:
    category: Code
    property_type: Code
    site: Code | None = None  # anatomic region (finding site in the SR)


FINDING_CODES: dict[str, FindingCodes] = {
    "Liver tumor": FindingCodes(ABNORMAL, codes.SCT.Neoplasm, codes.SCT.Liver),
    "Kidney tumor": FindingCodes(ABNORMAL, codes.SCT.Neoplasm, codes.SCT.Kidney),
    "Brain tumor": FindingCodes(ABNORMAL, codes.SCT.Neoplasm, codes.SCT.Brain),
    "Lung nodule": FindingCodes(ABNORMAL, codes.SCT.Nodule, codes.SCT.Lung),
    "Lung tumor": FindingCodes(ABNORMAL, codes.SCT.Neoplasm, codes.SCT.Lung),
    "Liver cyst": FindingCodes(ABNORMAL, codes.SCT.Cyst, codes.SCT.Liver),
    "Kidney cyst": FindingCodes(ABNORMAL, codes.SCT.Cyst, codes.SCT.Kidney),
}
FALLBACK = FindingCodes(ABNORMAL, codes.SCT.Lesion)


def codes_for(label: str) -> FindingCodes:
    return FINDING_CODES.get(label, FALLBACK)
