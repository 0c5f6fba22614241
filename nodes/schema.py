"""ComfyUI's V3 node schema, pinned: ``comfy_api.v0_0_2`` (in every host since 0.3.75; ``latest``
moves with the host), and the one check a V3 dropdown needs on every host.

A V3 combo is declared as ``("COMBO", {"options": [...]})``.  ComfyUI 0.3.75 does not check a
submitted value against those options before running (newer hosts do), so each node's
``validate_inputs`` checks its own dropdowns with :func:`check_choice`: a bad value in a saved
workflow or an API call is refused before anything runs, with the same message on every host.
"""

from __future__ import annotations

from collections.abc import Iterable

from comfy_api.v0_0_2 import ComfyExtension, io

__all__ = ["ComfyExtension", "io", "check_choice", "check_choices"]


def check_choice(name: str, value, options: Iterable) -> bool | str:
    """``True``, or a message naming the input, the value and what was expected.  ``None`` (the
    input is driven by a link, so its value is not known yet) passes."""
    if value is None:
        return True
    options = list(options)
    if value in options:
        return True
    shown = ", ".join(map(repr, options[:20])) + (f", ... ({len(options)} in all)" if len(options) > 20 else "")
    return f"{name}={value!r}: expected one of {shown}"


def check_choices(**choices: tuple) -> bool | str:
    """``check_choices(mode=(value, options), ...)``: the first failing :func:`check_choice`, else True."""
    for name, (value, options) in choices.items():
        verdict = check_choice(name, value, options)
        if verdict is not True:
            return verdict
    return True
