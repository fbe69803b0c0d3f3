from mpsd.worker.backends.text import IncrementalDetokenizer, StopMatcher


def byte_decode(ids):
    """A byte-level tokenizer in miniature: each id is one byte."""
    return bytes(ids).decode("utf-8", errors="replace")


def test_multibyte_characters_are_never_split():
    text = "naïve café 🙂 ok"
    detok = IncrementalDetokenizer(byte_decode, list(b"Say: "))
    pieces = [detok.push(b) for b in text.encode("utf-8")]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert pieces[text.encode().index("🙂".encode()) : text.encode().index("🙂".encode()) + 3] == ["", "", ""]


def test_stop_sequence_split_across_tokens_is_withheld_and_cut():
    matcher = StopMatcher(["END"])
    assert matcher.feed("hello E") == ("hello ", False)
    assert matcher.feed("N") == ("", False)
    assert matcher.feed("D and more") == ("", True)


def test_false_alarm_is_released():
    matcher = StopMatcher(["END"])
    assert matcher.feed("the EN") == ("the ", False)
    assert matcher.feed("TRY") == ("ENTRY", False)
    matcher = StopMatcher(["END"])
    assert matcher.feed("xE") == ("x", False)
    assert matcher.feed("x") == ("Ex", False)
    assert matcher.flush() == ""


def test_earliest_of_several_stops_wins_and_flush_returns_the_rest():
    matcher = StopMatcher(["\n\n", "###"])
    assert matcher.feed("a ### b\n\n") == ("a ", True)
    matcher = StopMatcher(["###"])
    assert matcher.feed("tail #") == ("tail ", False)
    assert matcher.flush() == "#"
