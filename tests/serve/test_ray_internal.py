"""Ray's private API behind one door: every name serve/ray_internal.py fetches still resolves.

That no other module reaches `ray.llm._internal` is checked with the other import rules, in
tests/test_architecture.py."""

from __future__ import annotations

import importlib

import pytest


def test_every_private_name_fedforge_uses_resolves():
    # Imported here, not at the top: after a Ray upgrade that moved a name, this test fails
    # with "ray.llm._internal.<module>.<name> is gone in ray <version> (fedforge uses it ...)".
    door = importlib.import_module("serve.ray_internal")
    assert door.__all__ and all(getattr(door, name) is not None for name in door.__all__)


def test_a_moved_symbol_is_named_with_what_fedforge_uses_it_for():
    from serve.ray_internal import _private

    with pytest.raises(ImportError) as moved:
        _private("common.models", "renamed_manager", "for the LoRA ids")
    message = str(moved.value)
    assert "ray.llm._internal.common.models.renamed_manager" in message
    assert "for the LoRA ids" in message and "serve/ray_internal.py" in message
    with pytest.raises(ImportError, match=r"ray\.llm\._internal\.no_such_module\.Thing"):
        _private("no_such_module", "Thing", "for nothing")
