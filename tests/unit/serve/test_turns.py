"""Turns: work per caller handed out round robin, a caller with nothing queued first."""

from __future__ import annotations

import pytest

from serve.turns import Turns


def _drain(turns: Turns[str, str]) -> list[str]:
    return [turns.pop()[1] for _ in range(len(turns))]


def _busy(turns: Turns[str, str], callers: str, pieces: int) -> None:
    for caller in callers:
        for i in range(pieces):
            turns.push(caller, f"{caller}{i}")


def test_callers_take_turns_one_piece_each_and_a_callers_pieces_keep_their_order() -> None:
    turns: Turns[str, str] = Turns()
    _busy(turns, "abc", 3)

    assert _drain(turns) == ["a0", "b0", "c0", "a1", "b1", "c1", "a2", "b2", "c2"]
    assert len(turns) == 0


def test_a_caller_with_nothing_queued_goes_ahead_of_the_round_for_one_piece() -> None:
    turns: Turns[str, str] = Turns()
    _busy(turns, "abc", 3)
    served = [turns.pop()[1] for _ in range(4)]  # a0 b0 c0 a1: every busy caller is in the round now

    turns.push("d", "d0")
    turns.push("d", "d1")

    assert served == ["a0", "b0", "c0", "a1"]
    # d's first piece next; its second waits its turn at the back of the round.
    assert turns.pop()[1] == "d0"
    assert _drain(turns) == ["b1", "c1", "a2", "d1", "b2", "c2"]


def test_a_new_caller_with_one_piece_queued_is_sparse() -> None:
    turns: Turns[str, str] = Turns()
    _busy(turns, "a", 3)  # new, but three pieces: not sparse
    assert turns.first_sparse() is None
    turns.push("b", "b0")
    turns.push("c", "c0")

    assert turns.first_sparse() == ("b", "b0")  # left queued
    assert turns.remove("b", "b0") and turns.first_sparse() == ("c", "c0")
    turns.pop()  # a0: a is in the round now, with two pieces
    assert turns.pop()[1] == "c0" and turns.first_sparse() is None


def test_a_busy_caller_cannot_stay_ahead_by_queueing_more() -> None:
    turns: Turns[str, str] = Turns()
    _busy(turns, "ab", 2)
    assert turns.pop() == ("a", "a0")

    turns.push("a", "a2")  # a still has a1 queued: it is not new again

    assert _drain(turns) == ["b0", "a1", "b1", "a2"]


def test_a_caller_whose_queue_ran_dry_is_new_again() -> None:
    turns: Turns[str, str] = Turns()
    _busy(turns, "ab", 2)
    turns.push("c", "c0")
    assert [turns.pop()[1] for _ in range(2)] == ["a0", "b0"]
    assert turns.pop() == ("c", "c0")

    turns.push("c", "c1")

    assert turns.peek() == ("c", "c1") and _drain(turns) == ["c1", "a1", "b1"]


def test_without_turns_callers_go_in_arrival_order_each_callers_pieces_together() -> None:
    turns: Turns[str, str] = Turns(in_turn=False)
    _busy(turns, "ab", 2)
    turns.pop()
    turns.push("c", "c0")

    assert _drain(turns) == ["a1", "b0", "b1", "c0"]


def test_pieces_and_callers_can_be_taken_out() -> None:
    turns: Turns[str, str] = Turns()
    _busy(turns, "ab", 3)

    assert turns.remove("a", "a1") and not turns.remove("a", "a9") and not turns.remove("z", "z0")
    assert turns.drop("b") == ["b0", "b1", "b2"] and turns.drop("b") == []
    assert sorted(turns.values()) == ["a0", "a2"] and len(turns) == 2
    assert turns.remove("a", "a0") and turns.remove("a", "a2") and len(turns) == 0
    turns.push("c", "c0")
    turns.clear()
    assert len(turns) == 0 and list(turns.values()) == []


def test_nothing_queued_is_an_index_error() -> None:
    turns: Turns[str, str] = Turns()

    with pytest.raises(IndexError, match="nothing is queued"):
        turns.pop()
    with pytest.raises(IndexError, match="nothing is queued"):
        turns.peek()
