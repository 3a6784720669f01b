"""The servers' wildcard lists and the permutations waiting for a press, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest

from db.confirmations import KEPT_FOR, Confirmations
from db.wildcards import MAX_WILDCARDS, WildcardError, Wildcards


def test_wildcard_lists_are_kept_per_server_replaced_and_removed_with_an_audit(db_engine, clock):
    lists = Wildcards(db_engine, clock=clock)
    assert lists.put(1, 10, "colours", ["red", "deep blue"]) == 1
    assert lists.put(1, 10, "__metal__", ["gold"]) == 2  # written as in a prompt
    assert lists.put(2, 20, "colours", ["green"]) == 1
    assert lists.put(1, 10, "colours", ["red", "deep blue", "gold, shiny"]) == 2  # replaced
    assert lists.lines(1, ["colours", "metal", "nope"]) == {
        "colours": ["red", "deep blue", "gold, shiny"],
        "metal": ["gold"],
    }
    assert lists.lines(2, ["colours"]) == {"colours": ["green"]}
    assert lists.sizes(1) == [("colours", 3), ("metal", 1)] and lists.names(2) == ["colours"]
    assert lists.remove(1, 10, "metal") and not lists.remove(1, 10, "metal")
    assert lists.names(1) == ["colours"]
    with pytest.raises(WildcardError, match="cannot name"):
        lists.put(1, 10, "../x", ["a"])
    for n in range(MAX_WILDCARDS):
        lists.put(3, 30, f"l{n}", ["a"])
    with pytest.raises(WildcardError, match=f"up to {MAX_WILDCARDS}"):
        lists.put(3, 30, "one-too-many", ["a"])
    assert len(lists.names(3)) == MAX_WILDCARDS  # the refused list was not kept


def test_a_confirmation_is_taken_once_by_its_member_within_a_day(db_engine, clock):
    waiting = Confirmations(db_engine, clock=clock)
    asked = {"prompt": "a {red, blue} car", "size": [64, 64], "tile": True}
    first = waiting.add(7, 1, 2, asked)
    assert waiting.take(first, 8) is None  # another member's press
    assert waiting.take(first, 7) == asked
    assert waiting.take(first, 7) is None  # once
    waiting.release(first)  # refused after it was taken: it may be pressed again
    assert waiting.take(first, 7) == asked
    late = waiting.add(7, 1, 2, asked)
    clock.advance(KEPT_FOR.total_seconds() + 1)
    assert waiting.take(late, 7) is None
