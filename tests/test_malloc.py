"""attn_jax.malloc: the command sets glibc's allocator up before anything else; elsewhere the call is harmless.

What the setting does to a step's page faults and time is measured, not tested: on the default model it removes
all ~29,000 faults a step (experiments/results/NOTES.md, finding 26), but a small model's step in the full test
suite faulted more with it than without (417 against 38 a step), so no threshold holds for every model.
"""

import platform

import pytest

from attn_jax import malloc


def test_the_setting_is_accepted_by_glibc_and_a_no_op_elsewhere():
    assert malloc.reuse_freed_memory() is (platform.libc_ver()[0] == "glibc")


def test_the_command_sets_up_the_allocator_before_anything_else(monkeypatch):
    from attn_jax import main

    calls = []
    monkeypatch.setattr(malloc, "reuse_freed_memory", lambda: calls.append("malloc"))
    monkeypatch.setattr(main, "_parser", lambda: calls.append("parse") or pytest.fail("stop here"))
    with pytest.raises(pytest.fail.Exception):
        main.main(["eval", "--workdir", "nowhere"])
    assert calls == ["malloc", "parse"]
