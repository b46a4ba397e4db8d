"""The core never imports transformers (moelab.hf recognises HF classes by name, so even it
does not); runs whether or not transformers is installed."""

from __future__ import annotations

import subprocess
import sys


def test_core_never_imports_transformers():
    code = ("import sys, moelab, moelab.moe, moelab.methods.default_moe, "
            "moelab.methods.momentum, moelab.methods.excitation, moelab.models, "
            "moelab.train.trainer, moelab.cli, moelab.hf\n"
            "assert 'transformers' not in sys.modules, 'transformers imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
