"""``import samkit`` imports neither transformers nor accelerate; the integration imports them when it is imported.

Run in a fresh interpreter: the test session has transformers loaded already."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("transformers", reason="the transformers integration needs samkit[transformers]")

CODE = """
import sys
import samkit
import samkit.integrations
import samkit.integrations.window
loaded = lambda: sorted(m for m in ("transformers", "accelerate") if m in sys.modules)
print(loaded())
from samkit.integrations.transformers import SAMTrainer
import transformers
print(loaded(), issubclass(SAMTrainer, transformers.Trainer))
"""


def test_import_samkit_does_not_import_transformers():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:2] == ["[]", "['accelerate', 'transformers'] True"]
