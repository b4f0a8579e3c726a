"""The calibration's pure core: reading labelled pairs, what is served at a threshold, and
which threshold is chosen."""

from __future__ import annotations

import numpy as np
import pytest

from proxy.calibrate import (
    SERVED_MARGIN,
    THRESHOLDS,
    Pair,
    Point,
    choose,
    point,
    read_pairs,
    score,
    shipped_pairs,
)
from proxy.errors import ConfigError


def test_pairs_are_read_and_bad_lines_named() -> None:
    """Good lines become pairs (kind defaults by label); a bad line is named by number."""
    pairs = read_pairs([b'{"a": "x", "b": "y", "same_answer": true}', b""], "f")
    assert pairs == [Pair("x", "y", True, "same answer", False)]
    with pytest.raises(ConfigError, match="line 2"):
        read_pairs([b'{"a": "x", "b": "y", "same_answer": false}', b'{"a": 1}'], "f")
    with pytest.raises(ConfigError, match="no pairs"):
        read_pairs([], "f")


def test_the_shipped_set_is_large_and_covers_every_trap_kind() -> None:
    """At least 400 pairs, a held-out third, and traps of every kind the guards cover."""
    pairs = read_pairs(shipped_pairs().splitlines(), "shipped")
    assert len(pairs) >= 400
    kinds = {p.kind for p in pairs if not p.same_answer}
    assert {"negation", "antonym", "scope", "entity", "number", "order", "language"} <= kinds
    assert 0.25 < sum(p.held_out for p in pairs) / len(pairs) < 0.4
    assert len({(p.a, p.b) for p in pairs}) == len(pairs)


def unit(*xs: float) -> np.ndarray:
    v = np.asarray(xs, dtype=np.float32)
    return v / np.linalg.norm(v)


def test_served_needs_the_threshold_and_the_guards() -> None:
    """A pair is served at a threshold when its similarity clears it and no guard refuses."""
    pairs = [
        Pair("How do I boil an egg?", "How should I boil eggs?", True, "paraphrase", False),
        Pair("Is it suitable?", "Is it unsuitable?", False, "antonym", False),
        Pair("Is it far?", "Is it near?", False, "antonym", False),
    ]
    va = np.vstack([unit(1, 0), unit(1, 0), unit(1, 0)])
    vb = np.vstack([unit(1, 0.2), unit(1, 0), unit(1, 0.5)])
    scored = score(pairs, va, vb)
    assert scored[1].refusal == "affix" and scored[2].refusal is None
    low = point(scored, 0.80)
    assert (low.served, low.wrong) == (1.0, 0.5)  # "near" passes the guards at 0.89
    high = point(scored, 0.95)
    assert (high.served, high.wrong) == (1.0, 0.0)
    assert dict(high.by_kind) == {"paraphrase": 1.0, "antonym": 0.0}


def test_the_chosen_threshold_serves_most_within_the_wrong_budget() -> None:
    """The most same-answer pairs served with wrong answers within budget; ties go higher;
    None when nothing fits."""
    pairs = [Pair("a", "b", True, "p", False), Pair("c", "d", False, "t", False)]
    scored = score(
        pairs, np.vstack([unit(1, 0), unit(1, 0)]), np.vstack([unit(1, 0.3), unit(1, 0.4)])
    )
    points = [point(scored, t) for t in THRESHOLDS]
    chosen = choose(points, 0.05)
    assert chosen is not None and chosen.wrong == 0.0 and chosen.served == 1.0
    assert chosen.threshold == pytest.approx(0.95)  # the trap is 0.928, the pair 0.958
    assert choose([point(scored, 0.80)], 0.05) is None


def test_the_choice_is_conservative() -> None:
    """Half the wrong budget, then the highest threshold within SERVED_MARGIN of the most
    served: not the lowest threshold that fits (it served 3x the traps on unseen pairs)."""
    rows = [(0.90, 0.80, 0.04), (0.91, 0.78, 0.02), (0.92, 0.77, 0.02), (0.93, 0.70, 0.0)]
    points = [Point(t, served, wrong, ()) for t, served, wrong in rows]
    chosen = choose(points, 0.05)
    assert chosen is not None and chosen.threshold == 0.92
    assert pytest.approx(0.03) == SERVED_MARGIN
    only_full_budget = [Point(0.90, 0.8, 0.04, ()), Point(0.95, 0.6, 0.03, ())]
    fallback = choose(only_full_budget, 0.05)
    assert fallback is not None and fallback.threshold == 0.90
    assert choose([Point(0.9, 0.9, 0.2, ())], 0.05) is None
