import pytest

from mpsd.units import format_bytes, format_duration, parse_duration, parse_size


@pytest.mark.parametrize("text,expected", [
    ("96GiB", 96 * 1024**3), ("512MB", 512 * 1000**2), ("1.5 GiB", int(1.5 * 1024**3)), (4096, 4096), ("10", 10),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["lots", "12 parsecs", -1, True, "-5GiB"])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


@pytest.mark.parametrize("text,expected", [("30s", 30.0), ("500ms", 0.5), ("2m", 120.0), (5, 5.0), ("1h", 3600.0)])
def test_parse_duration(text, expected):
    assert parse_duration(text) == expected


def test_parse_duration_rejects():
    with pytest.raises(ValueError, match="30s"):
        parse_duration("soon")


def test_formatting():
    assert format_bytes(3 * 1024**3) == "3.0GiB"
    assert format_bytes(12) == "12B"
    assert format_duration(3725) == "1h02m"
    assert format_duration(7) == "7s"
