"""Elementwise ``sin``, ``cos``, ``exp``, ``log``, ``atan2`` and normal deviates that give the same bits on
every CPU.

NumPy dispatches its transcendental functions to SIMD kernels chosen at run time (AVX-512 kernels round
differently from the AVX2 and baseline ones), and the C library picks FMA or non-FMA variants of its own.
These functions use only IEEE-754 basic operations (``+ - * /``, ``sqrt``, ``rint``, ``frexp``, ``ldexp``),
which are correctly rounded on every platform, in a fixed order; so the offline data generated with them
is byte-identical whatever instruction set NumPy or libm picks. They are accurate to a few units in the
last place, far finer than the uint8 pixels they end in.
"""

from __future__ import annotations

import numpy as np

# pi/2 split (fdlibm): k * PIO2_HI is exact for |k| < 2**20, so the reduction loses nothing for the
# arguments used here (|x| < 1e5).
_PIO2_HI = 1.57079632673412561417e00
_PIO2_LO = 6.07710050650619224932e-11
_TWO_OVER_PI = 6.36619772367581382433e-01
_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10
_INV_LN2 = 1.44269504088896338700e00
_SQRT_HALF = 7.07106781186547524401e-01
_PI = 3.14159265358979311600e00
_PI_2 = 1.57079632679489655800e00

# fdlibm's __kernel_sin / __kernel_cos minimax coefficients on [-pi/4, pi/4]
_SIN = (-1.66666666666666324348e-01, 8.33333333332248946124e-03, -1.98412698298579493134e-04,
        2.75573137070700676789e-06, -2.50507602534068634195e-08, 1.58969099521155010221e-10)
_COS = (4.16666666666666019037e-02, -1.38888888888741095749e-03, 2.48015872894767294178e-05,
        -2.75573143513906633035e-07, 2.08757232129817482790e-09, -1.13596475577881948265e-11)


def _horner(x: np.ndarray, coefficients: tuple[float, ...]) -> np.ndarray:
    result = np.full_like(x, coefficients[-1])
    for c in reversed(coefficients[:-1]):
        result = result * x + c
    return result


def _sin_cos_reduced(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``sin(r)``, ``cos(r)`` and the quadrant ``k mod 4`` with ``x = k * pi/2 + r``, ``|r| <= pi/4``."""
    x = np.asarray(x, dtype=np.float64)
    k = np.rint(x * _TWO_OVER_PI)
    r = (x - k * _PIO2_HI) - k * _PIO2_LO
    z = r * r
    sin_r = r + r * z * _horner(z, _SIN)
    cos_r = 1.0 - 0.5 * z + z * z * _horner(z, _COS)
    return sin_r, cos_r, k.astype(np.int64) & 3


def _sin_cos(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s, c, q = _sin_cos_reduced(x)
    return np.choose(q, (s, c, -s, -c)), np.choose(q, (c, -s, -c, s))


def sin(x: np.ndarray) -> np.ndarray:
    return _sin_cos(x)[0]


def cos(x: np.ndarray) -> np.ndarray:
    return _sin_cos(x)[1]


def exp(x: np.ndarray) -> np.ndarray:
    """``e**x``; underflows to 0 below about -745, as IEEE arithmetic does."""
    x = np.clip(np.asarray(x, dtype=np.float64), -1000.0, 700.0)
    k = np.rint(x * _INV_LN2)
    r = (x - k * _LN2_HI) - k * _LN2_LO  # |r| <= ln2 / 2
    term, total = np.ones_like(r), np.ones_like(r)
    for n in range(1, 14):  # Taylor series: the 14th term is below 1e-17 on |r| <= 0.35
        term = term * r / n
        total = total + term
    return np.ldexp(total, k.astype(np.int64))


def log(x: np.ndarray) -> np.ndarray:
    """Natural logarithm of positive ``x``."""
    m, e = np.frexp(np.asarray(x, dtype=np.float64))  # x = m * 2**e, m in [0.5, 1)
    small = m < _SQRT_HALF
    m = np.where(small, m * 2.0, m)  # m in [sqrt(1/2), sqrt(2))
    e = (e - small).astype(np.float64)
    f = (m - 1.0) / (m + 1.0)  # |f| <= 0.1716: log(m) = 2 atanh(f)
    s = f * f
    series = _horner(s, tuple(1.0 / (2 * n + 1) for n in range(12)))
    return e * _LN2_HI + (2.0 * f * series + e * _LN2_LO)


def _atan_unit(t: np.ndarray) -> np.ndarray:
    """``atan(t)`` for ``t`` in [0, 1]: two half-angle steps bring ``t`` below tan(pi/16), then a series."""
    for _ in range(2):
        t = t / (1.0 + np.sqrt(1.0 + t * t))
    z = t * t
    series = _horner(z, tuple((-1.0) ** n / (2 * n + 1) for n in range(13)))
    return 4.0 * t * series


def atan2(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The angle of ``(x, y)`` in (-pi, pi] (``atan2(0, 0) = 0``)."""
    y, x = np.broadcast_arrays(np.asarray(y, dtype=np.float64), np.asarray(x, dtype=np.float64))
    ax, ay = np.abs(x), np.abs(y)
    steep = ay > ax
    num, den = np.where(steep, ax, ay), np.where(steep, ay, ax)
    t = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
    angle = _atan_unit(t)
    angle = np.where(steep, _PI_2 - angle, angle)
    angle = np.where(x < 0, _PI - angle, angle)
    return np.where(y < 0, -angle, angle)


def hypot(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    return np.sqrt(x * x + y * y)


def standard_normal(rng: np.random.Generator, shape: int | tuple[int, ...]) -> np.ndarray:
    """Standard normal deviates by Box-Muller from ``rng``'s uniforms, both of each pair used (NumPy's own
    normal sampler calls the C library's ``exp``/``log``, whose last bits depend on the CPU)."""
    count = int(np.prod(shape))
    pairs = (count + 1) // 2
    radius = np.sqrt(-2.0 * log(1.0 - rng.random(pairs)))  # 1 - U is in (0, 1]
    sin_t, cos_t = _sin_cos(2.0 * _PI * rng.random(pairs))
    return np.concatenate([radius * cos_t, radius * sin_t])[:count].reshape(shape)
