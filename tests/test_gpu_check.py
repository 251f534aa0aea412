"""scripts/gpu_check.py, the sampler's GPU core checks, run here with --cpu's shapes and backends so that the
script is known to work before a GPU is ever lent."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_memory_cli():
    """The 7B preset's KV cache as KVCache allocates it (on the meta device: shapes only) against plan.py's row."""
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "memory", "--cpu"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASS memory: KV cache: 8.31 GiB allocated by KVCache = plan row 8.31 GiB" in proc.stdout
