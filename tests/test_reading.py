"""One answer per crop from its views: first views, unsure crops, further views, merge.

The reader here is a plain function over labelled stand-in views, so each rule of the
policy is checked exactly; ``test_model`` and the service tests run it with the real model.
"""

from __future__ import annotations

import pytest

from model.reading import Recognition, first_views, further_views, merge, most_confident, read_views, unsure


def _r(text: str, confidence: float) -> Recognition:
    return Recognition(text, confidence, [confidence] * len(text))


#: What each stand-in view reads as.
READS = {
    "a0": _r("sure", 0.9),  # confident: its further views are never read
    "a1": _r("never", 1.0),
    "b0": _r("faint", 0.2),  # unsure: the best of its views wins
    "b1": _r("better", 0.7),
    "b2": _r("worse", 0.1),
    "c0": _r("alone", 0.1),  # unsure but nothing more to read
    "d0": _r("tie", 0.3),
    "d1": _r("tie-later", 0.3),  # a tie keeps the first view's reading
}
CROPS = [["a0", "a1"], ["b0", "b1", "b2"], ["c0"], ["d0", "d1"]]


def test_most_confident_keeps_the_first_on_a_tie() -> None:
    assert most_confident([READS["d0"], READS["d1"]]) is READS["d0"]
    assert most_confident([READS["b0"], READS["b1"], READS["b2"]]) is READS["b1"]
    with pytest.raises(ValueError):
        most_confident([])


def test_the_steps() -> None:
    first = [READS[v] for v in first_views(CROPS)]
    assert first_views(CROPS) == ["a0", "b0", "c0", "d0"]
    crops = unsure(first, CROPS, confident_at=0.6)
    assert crops == [1, 3]
    assert further_views(CROPS, crops) == ["b1", "b2", "d1"]
    answers = merge(first, CROPS, crops, [READS["b1"], READS["b2"], READS["d1"]])
    assert [a.text for a in answers] == ["sure", "better", "alone", "tie"]
    with pytest.raises(ValueError, match="2 readings for 3 further views"):
        merge(first, CROPS, crops, [READS["b1"], READS["b2"]])


@pytest.mark.parametrize(
    ("confident_at", "calls", "texts"),
    [
        (0.0, [["a0", "b0", "c0", "d0"]], ["sure", "faint", "alone", "tie"]),  # never unsure
        (0.6, [["a0", "b0", "c0", "d0"], ["b1", "b2", "d1"]], ["sure", "better", "alone", "tie"]),
        (1.0, [["a0", "b0", "c0", "d0"], ["a1", "b1", "b2", "d1"]], ["never", "better", "alone", "tie"]),  # every view
    ],
)
def test_read_views_reads_at_most_twice(confident_at: float, calls: list[list[str]], texts: list[str]) -> None:
    seen: list[list[str]] = []

    def read(views: list[str]) -> list[Recognition]:
        seen.append(list(views))
        return [READS[v] for v in views]

    assert [a.text for a in read_views(read, CROPS, confident_at)] == texts
    assert seen == calls
    assert read_views(read, [], confident_at) == []
