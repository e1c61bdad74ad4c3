"""The offline data is the same on every CPU: byte-identical whatever SIMD level NumPy dispatches to."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

from medmerge.data import exactmath
from medmerge.data.synthetic import generate_synthetic

# NumPy's run-time dispatch, held back step by step: native (AVX-512 where present), AVX2, the baseline.
CPU_FEATURE_LIMITS = ("", "AVX512_SPR AVX512_ICL X86_V4", "AVX512_SPR AVX512_ICL X86_V4 X86_V3")

HASH_SNIPPET = """
import hashlib
from medmerge.data.synthetic import generate_synthetic
from numpy._core._multiarray_umath import __cpu_features__ as features
data = generate_synthetic("{task}", 12, 8, 8, image_size=32, seed=7)
digest = hashlib.sha256(b"".join(data[k].tobytes() for k in sorted(data) if k != "class_names")).hexdigest()
print(digest, next((k for k in ("AVX512_SPR", "AVX512_ICL", "AVX512_SKX", "AVX2") if features.get(k)), "baseline"))
"""

# sha256 of generate_synthetic(task, 12, 8, 8, image_size=32, seed=7) as the committed code makes it: the same
# bytes on every machine (x86-64 with or without AVX-512, and any other platform with IEEE doubles).
EXPECTED = {
    "lesions": "9831006d7575866a192e168b34482d09b5f5a3f98b858827a5837da3fb921bb9",
    "shapes": "547e3c81402983837db371d24cc7cffdc38144792a839fff91559400a87637bb",
    "textures": "f30d7a42dba36dc03d224faedbfc7ae2afe3c583dd292f63a9f5dd585d966478",
}


def _hash_under(limit: str, task: str) -> tuple[str, str]:
    env = {**os.environ, "NPY_DISABLE_CPU_FEATURES": limit}
    out = subprocess.run([sys.executable, "-c", HASH_SNIPPET.format(task=task)], env=env, capture_output=True,
                         text=True, check=True, timeout=120).stdout.split()
    return out[0], out[1]


@pytest.mark.parametrize("task", sorted(EXPECTED))
def test_synthetic_data_is_byte_identical_under_every_numpy_dispatch_level(task: str) -> None:
    results = {limit: _hash_under(limit, task) for limit in CPU_FEATURE_LIMITS}
    digests = {digest for digest, _ in results.values()}
    assert len(digests) == 1, f"{task}: the generator's bytes depend on NumPy's SIMD level: {results}"
    assert digests == {EXPECTED[task]}, f"{task}: this machine generates other bytes than the committed hash"


def test_exact_math_agrees_with_numpy_to_a_few_ulp() -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(-60, 60, 100_000)
    y, z = rng.normal(size=100_000), rng.normal(size=100_000)
    u = rng.uniform(1e-300, 1, 100_000)
    np.testing.assert_allclose(exactmath.sin(x), np.sin(x), rtol=0, atol=4e-16)
    np.testing.assert_allclose(exactmath.cos(x), np.cos(x), rtol=0, atol=4e-16)
    np.testing.assert_allclose(exactmath.exp(y * 30), np.exp(y * 30), rtol=2e-15)
    np.testing.assert_allclose(exactmath.log(u), np.log(u), rtol=2e-15)
    np.testing.assert_allclose(exactmath.atan2(y, z), np.arctan2(y, z), rtol=0, atol=2e-15)
    for y0, x0 in [(0.0, 0.0), (1.0, 0.0), (-1.0, 0.0), (0.0, -1.0), (-1.0, -1.0), (1.0, 1.0)]:
        assert exactmath.atan2(np.array(y0), np.array(x0)) == pytest.approx(np.arctan2(y0, x0), abs=1e-15)
    normal = exactmath.standard_normal(np.random.default_rng(1), (400_000,))
    assert abs(normal.mean()) < 0.01 and abs(normal.std() - 1.0) < 0.01
    assert abs(np.mean(normal**4) - 3.0) < 0.05  # Gaussian tails, not a uniform's


def test_same_seed_same_bytes_other_seed_other_bytes() -> None:
    a, b = (generate_synthetic("lesions", 8, 4, 4, image_size=32, seed=s) for s in (3, 3))
    c = generate_synthetic("lesions", 8, 4, 4, image_size=32, seed=4)
    digest = lambda d: hashlib.sha256(d["train_images"].tobytes()).hexdigest()  # noqa: E731
    assert digest(a) == digest(b) != digest(c)
