"""Lookup throughput on a CPU without AVX-512, emulated on this one.

``lookup.py``'s *avx2* and *generic* rows force embpress's expand instructions but compile
the rest of each kernel for this machine's CPU (on an AVX-512 machine: 32 wide registers,
which a row's 128 sums fit in). This section runs ``lookup.py`` in a child process set up as
an AVX2-only CPU runs it: numba compiles for Haswell (AVX2, FMA, F16C, BMI2, no AVX-512;
``NUMBA_CPU_NAME`` / ``NUMBA_CPU_FEATURES``, cached apart from the host's kernels), torch's
own kernels are held to AVX2 (``ATEN_CPU_CAPABILITY=avx2``, float32 ``nn.EmbeddingBag``) and
FBGEMM's too (``FBGEMM_ENABLE_INSTRUCTIONS=AVX2``). Memory, caches and clock are still this
machine's, so the figures show the instruction sets' share, not a particular AVX2 CPU.

Its first run compiles every kernel for the emulated CPU (a few minutes on 2 cores); a quick
run (``--quick``) measures the block-sparse layout on the AVX2 path alone, to compile less.

Usage (from the repository root; ``lookup.py``'s options)::

    python bench/lookup_avx2cpu.py
    python bench/lookup_avx2cpu.py --quick --out out/bench-quick
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

# what makes this process's kernels those of an AVX2-only CPU (see the module docstring)
EMULATION = {
    "NUMBA_CPU_NAME": "haswell",
    "NUMBA_CPU_FEATURES": "+avx,+avx2,+fma,+f16c,+popcnt,+bmi,+bmi2,+sse4.2,"
    "-avx512f,-avx512vl,-avx512bw,-avx512vbmi2",
    "ATEN_CPU_CAPABILITY": "avx2",
    "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    env = {**os.environ, **EMULATION}
    cmd = [sys.executable, str(common.BENCH / "lookup.py"), "--emulated-avx2", *argv]
    return subprocess.run(cmd, cwd=common.REPO, env=env, check=False).returncode


if __name__ == "__main__":
    raise SystemExit(main())
