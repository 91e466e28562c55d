"""DICOM objects the node writes back: DICOM-SEG and the TID 1500 Structured Report."""
