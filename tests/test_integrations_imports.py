"""flatness never imports Lightning or transformers; the integrations name the extra to install."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SRC = str(Path(__file__).parent.parent / "src")


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {SRC!r}); {code}"],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_core_imports_neither_framework():
    out = run(
        "import flatness, flatness.integrations, flatness.monitor, flatness.plot; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('lightning', 'pytorch_lightning', 'transformers', 'accelerate', 'matplotlib')))"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_missing_framework_names_the_extra():
    for module, blocked, extra in (
        ("flatness.integrations.lightning", "lightning", "flatness[lightning]"),
        ("flatness.integrations.huggingface", "transformers", "flatness[hf]"),
    ):
        out = run(f"sys.modules[{blocked!r}] = None; import {module}")
        assert out.returncode != 0
        assert "ImportError" in out.stderr and extra in out.stderr, out.stderr
