"""The coverage-guided fuzz target (tools/fuzz_commands.py), bounded for a
normal test run: at most 25 s of fuzzing. Longer runs: docs/hostile-input.md."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SECONDS = int(os.environ.get("FUZZ_SECONDS", "25"))

pytestmark = pytest.mark.timeout(SECONDS + 90)


def test_fuzz_target_runs_clean_for_a_bounded_time(tmp_path):
    try:
        import atheris  # noqa: F401
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("atheris is not installed (pip install atheris)")
        pytest.skip("atheris is not installed")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, seed in enumerate([b"\x00" + b'{"id":1,"op":"subscribe","channel":"bill:1"}\n{"op":"ping"}',
                              b"\x01\x81\x85\x00\x00\x00\x00hello",
                              b"\x02\xc1\x83\x00\x00\x00\x00\x4a\x04\x00"]):
        (corpus / f"seed-{i}").write_bytes(seed)
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "fuzz_commands.py"), f"-max_total_time={SECONDS}",
         "-seed=1", "-rss_limit_mb=1024", f"-artifact_prefix={tmp_path}/", str(corpus)],
        capture_output=True, text=True, timeout=SECONDS + 60, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    crashes = list(tmp_path.glob("crash-*")) + list(tmp_path.glob("timeout-*")) + list(tmp_path.glob("oom-*"))
    assert result.returncode == 0 and not crashes, result.stderr[-4000:]
    assert "Done" in result.stderr and "runs in" in result.stderr
