"""The mmkit plugin API: every hook a plugin may implement.

Each ``register_<kind>`` hook is handed ``register(name, factory)``. The factory is a class
or function whose typed keyword parameters (with defaults) are the component's recipe
schema and whose docstring is its documentation. Import heavy libraries inside the hook,
not at module level, so ``mmkit --help`` stays fast.
"""

from __future__ import annotations

from typing import Any, Callable

import pluggy

hookspec = pluggy.HookspecMarker("mmkit")
hookimpl = pluggy.HookimplMarker("mmkit")

Register = Callable[[str, Callable[..., Any]], None]


@hookspec
def register_image_encoders(register: Register) -> None:
    """Register image encoders: modules turning images into ``Encoded`` features."""


@hookspec
def register_text_encoders(register: Register) -> None:
    """Register text encoders: modules turning token ids into ``Encoded`` features."""


@hookspec
def register_audio_encoders(register: Register) -> None:
    """Register audio encoders: modules turning waveforms into ``Encoded`` features."""


@hookspec
def register_fusion_heads(register: Register) -> None:
    """Register fusion heads combining several modalities' ``Encoded`` features into ``Fused``
    (see mmkit.fusion.base); a head's factory takes ``modalities``, which mmkit provides."""


@hookspec
def register_tasks(register: Register) -> None:
    """Register tasks; a task factory may take ``encoders``, ``fusion`` and ``data`` (the
    dataset's DatasetInfo), which mmkit provides."""


@hookspec
def register_datasets(register: Register) -> None:
    """Register datasets: map-style datasets whose samples are dicts, each declaring what it
    gives in an ``info`` attribute (an mmkit.samples.DatasetInfo)."""


@hookspec
def register_commands(cli: Any) -> None:
    """Add subcommands to the ``mmkit`` command line (``cli`` is its click group)."""
