"""Plugin files written to temporary folders by the tests."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_mechanism() -> str:
    """The complete mechanism file shown in README.md's "Add a mechanism" section."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Add a mechanism") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


FAULTY = '''
"""Faulty mechanisms for failure-path tests."""
from dataclasses import dataclass

import torch

from harness.core.attention import Attention
from harness.core.registry import register_mechanism


@dataclass
class FaultyConfig:
    fail_at_step: int = 3


@register_mechanism("raises", FaultyConfig, key_padding=True)
class Raises(Attention):
    """Raises in the forward pass after a few training steps."""

    def forward(self, q, k, v, *, key_padding_mask=None, causal=False, context=None):
        if context is not None and context.step >= self.cfg.fail_at_step:
            raise RuntimeError("deliberate failure for the test")
        return v[..., : q.shape[-2], :] * 1.0


@register_mechanism("makes_nan", FaultyConfig, key_padding=True)
class MakesNaN(Attention):
    """Returns NaN."""

    def forward(self, q, k, v, *, key_padding_mask=None, causal=False, context=None):
        return q * float("nan")


@register_mechanism("no_padding", FaultyConfig)
class NoPadding(Attention):
    """Lacks the key_padding capability (the grid must mark ListOps unsupported)."""

    def forward(self, q, k, v, *, key_padding_mask=None, causal=False, context=None):
        return v
'''

BROKEN = "import this_module_does_not_exist_anywhere\n"
