"""Keeping patient data out of the node's log where libraries would put it there: highdicom and pydicom warn
(on stderr, the node's log) and pydicom logs at WARNING with the very value they find odd, a name or a date."""

from __future__ import annotations

import logging
import warnings

# highdicom, on a Patient Name of one component ("DOE"): valid DICOM, common in PACS data, quoted in full
PERSON_NAME_WARNING = r"The string .* is unlikely to represent the intended person name"
# pydicom's value validation (a birth date written "01/01/1980", say), the value quoted
INVALID_VALUE_WARNING = r"Invalid value for VR"


def keep_patient_data_out_of_logs(debug: bool) -> None:
    """Hide the library warnings that quote a data set's values, and pydicom's log lines below ERROR (they
    quote them too). At DEBUG the administrator asked for everything, patient data included."""
    if debug:
        return
    for message in (PERSON_NAME_WARNING, INVALID_VALUE_WARNING):
        warnings.filterwarnings("ignore", message=message, category=UserWarning)
    logging.getLogger("pydicom").setLevel(logging.ERROR)
