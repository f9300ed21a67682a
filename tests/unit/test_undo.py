"""agent.undo.UndoStack: rollback order, commit hands the actions over."""

from __future__ import annotations

import asyncio

import pytest

from agent.undo import UndoStack


def test_commit_hands_over_a_stack_that_rolls_back_later():
    done: list[str] = []

    async def scenario() -> UndoStack:
        async with UndoStack() as undo:
            undo.push("a", lambda: done.append("a"))

            async def b() -> None:
                done.append("b")
            undo.push("b", b)
            kept = undo.commit()
        assert done == []  # leaving the block normally runs nothing
        await undo.rollback()  # the committed stack is empty
        assert done == []
        await kept.rollback()
        await kept.rollback()  # ran once: the actions are gone
        return kept

    asyncio.run(scenario())
    assert done == ["b", "a"]


def test_failure_rolls_back_newest_first_and_a_failing_undo_does_not_stop_the_rest():
    done: list[str] = []

    def broken() -> None:
        raise OSError("undo failed")

    async def scenario() -> None:
        async with UndoStack() as undo:
            undo.push("a", lambda: done.append("a"))
            undo.push("broken", broken)
            undo.push("c", lambda: done.append("c"))
            raise RuntimeError("step failed")

    with pytest.raises(RuntimeError):
        asyncio.run(scenario())
    assert done == ["c", "a"]
