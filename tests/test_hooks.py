"""gptlab.hooks: the fault points tests use; nothing installed means nothing happens."""

from __future__ import annotations

import pytest

from gptlab import hooks


def test_install_apply_fire_and_remove():
    assert hooks.apply("micro_loss", 3.0, step=1, rank=0) == 3.0  # nothing installed: the value passes
    seen = []
    remove_a = hooks.install("micro_loss", lambda value, step, rank: value * 2)
    remove_b = hooks.install("micro_loss", lambda value, step, rank: value + step)
    remove_c = hooks.install("step_logged", lambda step: seen.append(step))
    try:
        assert hooks.apply("micro_loss", 3.0, step=1, rank=0) == 7.0  # in installation order
        hooks.fire("step_logged", step=5)
        assert seen == [5]
    finally:
        remove_a(), remove_b(), remove_c()
    assert hooks.apply("micro_loss", 3.0, step=1, rank=0) == 3.0
    hooks.fire("step_logged", step=6)
    assert seen == [5]


def test_unknown_point_is_refused():
    with pytest.raises(ValueError, match="unknown.*step_logged"):
        hooks.install("step_loged", lambda step: None)
