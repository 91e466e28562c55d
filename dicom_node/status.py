"""DIMSE status codes the node answers with (PS3.7 Annex C, PS3.4 B.2.3 and C.4.1.1.4)."""

SUCCESS = 0x0000
PENDING = 0xFF00
CANCEL = 0xFE00  # C-FIND: matching terminated due to cancel request
NOT_AUTHORIZED = 0x0124  # Refused: Not Authorized (the calling AE may not use this service)
OUT_OF_RESOURCES = 0xA700  # storage full or an internal failure: the sender should retry later
DATASET_MISMATCH = 0xA900  # C-STORE: data set does not match SOP class; C-FIND: identifier mismatch
CANNOT_UNDERSTAND = 0xC000  # the data set cannot be parsed
MISSING_UID = 0xC001  # Study, Series or SOP Instance UID absent
INVALID_UID = 0xC002  # a UID is malformed (it would otherwise become part of a file path)
UID_CONFLICT = 0xC003  # the SOP Instance UID is already stored under another study or series
