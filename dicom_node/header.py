"""A minimal reader of the first top-level elements of a little-endian data set.

The index needs about twenty elements, all in groups 0008-0028, i.e. in the first few hundred bytes of a
data set. Decoding them through pydicom's ``Dataset`` cost about a third of the node's CPU time per
instance; this reader walks the raw elements, skips sequences (defined or undefined length) without
decoding them, and stops at the first tag past the last one wanted. It handles the two little-endian
encodings (implicit and explicit VR) that all native and encapsulated transfer syntaxes except deflate and
big endian use; for those two, and for data sets labelled explicit VR but encoded implicit VR
(:class:`UnexpectedImplicitVRError`), the caller falls back to pydicom. A data set whose structure is broken
raises :class:`HeaderFormatError`.
"""

from __future__ import annotations

import struct

_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQUENCE_END = 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_TAG = struct.Struct("<HH")
_SHORT = struct.Struct("<2sH")
_LONG = struct.Struct("<I")
MAX_NESTING = 128  # sequences nested deeper are refused: no real header comes near, and each level recurses


class HeaderFormatError(ValueError):
    """The bytes are not a well-formed little-endian data set (an element runs past the end, ...)."""


class UnexpectedImplicitVRError(HeaderFormatError):
    """Labelled explicit VR but encoded implicit VR: a common fault that pydicom reads correctly."""


def read_elements(data: bytes | memoryview, wanted: frozenset[int], explicit_vr: bool) -> dict[int, bytes]:
    """Raw values of the ``wanted`` top-level tags (as ``0xGGGGEEEE`` ints) that are present."""
    last = max(wanted)
    found: dict[int, bytes] = {}
    reader = _Reader(memoryview(data), explicit_vr)
    while reader.pos < reader.end:
        tag, length, is_sequence = reader.element_header()
        if tag > last:
            break
        if length == _UNDEFINED:
            if not is_sequence:
                raise HeaderFormatError(f"undefined length on non-sequence element {tag:08X}")
            reader.skip_undefined_sequence()
            continue
        value_end = reader.pos + length
        if value_end > reader.end:
            raise HeaderFormatError(f"element {tag:08X} runs past the end of the data set")
        if tag in wanted:
            found[tag] = bytes(reader.data[reader.pos:value_end])
        reader.pos = value_end
    return found


class _Reader:
    def __init__(self, data: memoryview, explicit_vr: bool) -> None:
        self.data = data
        self.explicit_vr = explicit_vr
        self.pos = 0
        self.end = len(data)

    def element_header(self) -> tuple[int, int, bool]:
        """Read one element header; returns (tag, value length, whether it may hold items)."""
        if self.pos + 8 > self.end:
            raise HeaderFormatError("truncated element header")
        group, element = _TAG.unpack_from(self.data, self.pos)
        tag = (group << 16) | element
        if group == 0xFFFE or not self.explicit_vr:
            (length,) = _LONG.unpack_from(self.data, self.pos + 4)
            self.pos += 8
            return tag, length, True
        vr, short_length = _SHORT.unpack_from(self.data, self.pos + 4)
        if vr in _LONG_VRS:
            if self.pos + 12 > self.end:
                raise HeaderFormatError("truncated element header")
            (length,) = _LONG.unpack_from(self.data, self.pos + 8)
            self.pos += 12
            return tag, length, vr in (b"SQ", b"UN", b"OB", b"OW")
        if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
            raise UnexpectedImplicitVRError(f"element {tag:08X} has no explicit VR")
        self.pos += 8
        return tag, short_length, False

    def skip_undefined_sequence(self, depth: int = 1) -> None:
        """Skip items up to and including the sequence delimiter."""
        if depth > MAX_NESTING:
            raise HeaderFormatError(f"sequences nested more than {MAX_NESTING} deep")
        while True:
            tag, length, _ = self.element_header()
            if tag == _SEQUENCE_END:
                return
            if tag != _ITEM:
                raise HeaderFormatError(f"expected an item, found {tag:08X}")
            if length == _UNDEFINED:
                self._skip_undefined_item(depth)
            else:
                self.pos += length
            if self.pos > self.end:
                raise HeaderFormatError("item runs past the end of the data set")

    def _skip_undefined_item(self, depth: int) -> None:
        while True:
            tag, length, is_sequence = self.element_header()
            if tag == _ITEM_END:
                return
            if length == _UNDEFINED:
                if not is_sequence:
                    raise HeaderFormatError(f"undefined length on non-sequence element {tag:08X}")
                self.skip_undefined_sequence(depth + 1)
            else:
                self.pos += length
            if self.pos > self.end:
                raise HeaderFormatError("element runs past the end of the data set")
