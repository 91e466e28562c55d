import pytest
from hypothesis import given
from hypothesis import strategies as st

from storage.uids import InvalidUIDError, is_valid_uid, validate_uid


@pytest.mark.parametrize("uid", ["1.2.840.10008.1.2", "0", "2.25.1234567890", "1.2.0.3", "1." + "2" * 62])
def test_valid_uids(uid):
    assert validate_uid(uid) == uid


@pytest.mark.parametrize(
    ("uid", "reason"),
    [
        ("", "missing"),
        (None, "missing"),
        ("../../etc/passwd", "digits"),
        ("1.2/3", "digits"),
        ("1.02.3", "leading zeros"),
        ("1..2", "digits"),
        (".1.2", "digits"),
        ("1.2.", "digits"),
        ("1." + "2" * 63, "longer than 64"),
        ("1.2\x003", "digits"),
    ],
)
def test_invalid_uids_say_why(uid, reason):
    with pytest.raises(InvalidUIDError, match=reason):
        validate_uid(uid, "StudyInstanceUID")


def test_trailing_nul_padding_is_removed():
    assert validate_uid("1.2.3\x00") == "1.2.3"


@given(st.text(max_size=80))
def test_a_valid_uid_can_never_leave_its_folder(text):
    if is_valid_uid(text):
        assert set(text.strip().rstrip("\x00")) <= set("0123456789.")
        assert ".." not in text and "/" not in text
