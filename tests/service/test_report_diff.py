from service.report_diff import Piece, changed, word_diff


def test_word_diff_keeps_both_texts_and_marks_changed_words():
    pieces = word_diff("No acute bleed. Small old infarct.", "No acute bleed. Old infarct, left.")
    assert "".join(p.text for p in pieces if p.op != "added") == "No acute bleed. Small old infarct."
    assert "".join(p.text for p in pieces if p.op != "removed") == "No acute bleed. Old infarct, left."
    assert pieces[0] == Piece("same", "No acute bleed. ")
    assert {p.text for p in pieces if p.op == "removed"} >= {"Small"}


def test_unchanged_text_is_one_piece():
    assert word_diff("Normal.", "Normal.") == [Piece("same", "Normal.")]
    assert word_diff("", "New.") == [Piece("added", "New.")]
    assert not changed("Normal. ", "Normal.") and changed("Normal.", "Abnormal.")
