"""Synthetic dermoscopy-like images: the offline demo data.

Every image is a skin-coloured background with one pigmented lesion near the centre. A lesion is
described by a few continuous *features* (border irregularity, elongation, dot density, radial
streaks, blue tint); each task makes some of them depend on the class and draws the rest at random.
Class ranges overlap slightly, and every image gets nuisance variation (size, position, rotation,
colour, illumination, pixel noise, hairs), so the tasks are learnable but not trivially so.

See ``docs/synthetic_data.md`` for what each task and class means.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from medmerge.data import exactmath as xm
from medmerge.data.npz import SPLITS

Range = tuple[float, float]
Params = dict[str, np.ndarray]

#: Shape features per profile: ``aspect`` (long/short axis), ``irregularity`` (RMS border wobble / radius).
SHAPE_PROFILES: dict[str, dict[str, Range]] = {
    "round_regular": {"aspect": (1.0, 1.3), "irregularity": (0.0, 0.075)},
    "irregular_border": {"aspect": (1.0, 1.3), "irregularity": (0.065, 0.18)},
    "elongated": {"aspect": (1.27, 2.0), "irregularity": (0.0, 0.075)},
    "regular": {"aspect": (1.0, 1.45), "irregularity": (0.0, 0.075)},
    "irregular": {"aspect": (1.0, 1.45), "irregularity": (0.065, 0.18)},
}

#: Texture features per profile: ``dots`` (count and contrast of dark globules), ``streaks`` (radial
#: lines), ``blue`` (tint from brown to blue-grey); all in [0, 1].
TEXTURE_PROFILES: dict[str, dict[str, Range]] = {
    "homogeneous_brown": {"dots": (0.0, 0.32), "streaks": (0.0, 0.3), "blue": (0.0, 0.35)},
    "dotted_dark": {"dots": (0.28, 1.0), "streaks": (0.0, 0.3), "blue": (0.0, 0.35)},
    "streaked_bluish": {"dots": (0.0, 0.32), "streaks": (0.28, 1.0), "blue": (0.32, 1.0)},
    "plain": {"dots": (0.0, 0.32), "streaks": (0.0, 0.3), "blue": (0.0, 0.5)},
    "dotted": {"dots": (0.28, 1.0), "streaks": (0.0, 0.3), "blue": (0.0, 0.5)},
}

MAX_DOTS = 36
MAX_HAIRS = 3
HARMONICS = np.arange(3, 9, dtype=np.float32)  # border wobble frequencies (lobes per turn)
_CHUNK = 256  # images rendered at once; fixed so the output never depends on memory settings

_SKIN = np.array([224.0, 176.0, 152.0], dtype=np.float32)
_BROWN = np.array([138.0, 88.0, 62.0], dtype=np.float32)
_BLUE_GREY = np.array([98.0, 102.0, 138.0], dtype=np.float32)
_DOT = np.array([42.0, 26.0, 22.0], dtype=np.float32)
_HAIR = np.array([38.0, 28.0, 24.0], dtype=np.float32)


@dataclass(frozen=True)
class SyntheticTask:
    """A named classification task: class names and a sampler of per-image lesion features."""

    name: str
    description: str
    class_names: list[str]
    sampler: Callable[[np.random.Generator, np.ndarray], Params]  # (rng, labels) -> feature arrays


def _pick_profiles(
    rng: np.random.Generator, labels: np.ndarray, per_class: list[str | None], pool: tuple[str, ...]
) -> list[str]:
    """Profile name per image: its class's profile, or (for ``None``) a random one from ``pool``."""
    random_pick = rng.integers(0, len(pool), len(labels)) if pool else np.zeros(len(labels), dtype=int)
    return [per_class[y] or pool[r] for y, r in zip(labels.tolist(), random_pick.tolist(), strict=True)]


def _draw_features(
    rng: np.random.Generator, table: dict[str, dict[str, Range]], profiles: list[str]
) -> Params:
    """Each feature of ``table`` drawn uniformly from the range of every image's profile."""
    features: Params = {}
    for key in next(iter(table.values())):
        lo, hi = np.array([table[name][key] for name in profiles]).reshape(-1, 2).T
        features[key] = lo + (hi - lo) * rng.random(len(profiles))
    return features


def _profile_sampler(
    classes: dict[str, tuple[str | None, str | None]],
    shape_pool: tuple[str, ...],
    texture_pool: tuple[str, ...],
) -> Callable[[np.random.Generator, np.ndarray], Params]:
    """Sampler for classes given as (shape profile, texture profile); ``None`` = random from the pool."""
    shapes, textures = ([spec[i] for spec in classes.values()] for i in (0, 1))
    for table, per_class, pool in (
        (SHAPE_PROFILES, shapes, shape_pool),
        (TEXTURE_PROFILES, textures, texture_pool),
    ):
        unknown = sorted({name for name in (*per_class, *pool) if name is not None} - set(table))
        if unknown:
            raise ValueError(f"unknown profile(s) {unknown}; known: {sorted(table)}")
        if None in per_class and not pool:
            raise ValueError(
                "a class leaves a feature random, but the pool of profiles to draw from is empty"
            )

    def sample(rng: np.random.Generator, labels: np.ndarray) -> Params:
        return {
            **_draw_features(rng, SHAPE_PROFILES, _pick_profiles(rng, labels, shapes, shape_pool)),
            **_draw_features(rng, TEXTURE_PROFILES, _pick_profiles(rng, labels, textures, texture_pool)),
        }

    return sample


def _task(name: str, description: str, classes: dict, shape_pool=(), texture_pool=()) -> SyntheticTask:
    return SyntheticTask(
        name, description, list(classes), _profile_sampler(classes, tuple(shape_pool), tuple(texture_pool))
    )


_SOURCE_SHAPES = ("round_regular", "irregular_border", "elongated")
_SOURCE_TEXTURES = ("homogeneous_brown", "dotted_dark", "streaked_bluish")

SYNTHETIC_TASKS: dict[str, SyntheticTask] = {
    "shapes": _task(
        "shapes",
        "source task A: lesion shape and border; colour and texture are uninformative",
        {name: (name, None) for name in _SOURCE_SHAPES},
        texture_pool=_SOURCE_TEXTURES,
    ),
    "textures": _task(
        "textures",
        "source task B: lesion texture and colour; shape and border are uninformative",
        {name: (None, name) for name in _SOURCE_TEXTURES},
        shape_pool=_SOURCE_SHAPES,
    ),
    "lesions": _task(
        "lesions",
        "target task: border (regular/irregular) x texture (plain/dotted), needs both source features",
        {
            "regular_plain": ("regular", "plain"),
            "irregular_plain": ("irregular", "plain"),
            "regular_dotted": ("regular", "dotted"),
            "irregular_dotted": ("irregular", "dotted"),
        },
    ),
}


def get_task(task: str) -> SyntheticTask:
    """The registered task ``task``; ValueError naming the known tasks otherwise."""
    try:
        return SYNTHETIC_TASKS[task]
    except KeyError:
        raise ValueError(f"unknown synthetic task {task!r}; known tasks: {sorted(SYNTHETIC_TASKS)}") from None


# ---------------------------------------------------------------- parameters


def balanced_labels(rng: np.random.Generator, n: int, num_classes: int) -> np.ndarray:
    """``n`` shuffled labels, each class appearing ``n // num_classes`` or one more times."""
    extra = rng.choice(num_classes, size=n % num_classes, replace=False)
    labels = np.concatenate([np.repeat(np.arange(num_classes), n // num_classes), extra])
    return rng.permutation(labels).astype(np.int64)


def sample_nuisance(rng: np.random.Generator, n: int) -> Params:
    """Class-independent variation: geometry, colours, lighting, noise, hairs, dot/streak layout."""
    u = rng.random
    k = len(HARMONICS)
    weights = u((n, k)) * (1.0 / np.sqrt(HARMONICS / HARMONICS[0]))
    weights /= np.sqrt(_row_sum(weights * weights) / 2.0)  # unit RMS wobble
    return {
        "cx": 0.5 + 0.14 * (u(n) - 0.5),
        "cy": 0.5 + 0.14 * (u(n) - 0.5),
        "radius": 0.2 + 0.1 * u(n),
        "theta": np.pi * u(n),
        "edge": 0.02 + 0.03 * u(n),
        "harm_w": weights,
        "harm_phase": 2 * np.pi * u((n, k)),
        "skin": _SKIN * (0.86 + 0.16 * u((n, 1))) + 9.0 * xm.standard_normal(rng, (n, 3)),
        "darkness": 0.7 + 0.35 * u(n),
        "tint": 4.0 * xm.standard_normal(rng, (n, 3)),
        "shade": 0.1 + 0.2 * u(n),
        "illum": 0.25 * u(n),
        "illum_dir": 2 * np.pi * u(n),
        "noise_sd": 2.0 + 5.0 * u(n),
        "dot_r": np.sqrt(u((n, MAX_DOTS))) * 0.85,
        "dot_a": 2 * np.pi * u((n, MAX_DOTS)),
        "dot_sigma": 0.017 + 0.012 * u((n, MAX_DOTS)),
        "dot_gain": 0.8 + 0.4 * u((n, MAX_DOTS)),
        "streak_n": rng.integers(9, 17, n).astype(np.float64),
        "streak_phase": 2 * np.pi * u(n),
        "hair_on": u((n, MAX_HAIRS)) < np.array([0.5, 0.3, 0.15]),
        "hair_xy": u((n, MAX_HAIRS, 2)),
        "hair_angle": np.pi * u((n, MAX_HAIRS)),
        "hair_bend": 1.2 * (u((n, MAX_HAIRS)) - 0.5),
        "hair_width": 0.006 + 0.01 * u((n, MAX_HAIRS)),
        "hair_dark": 0.45 + 0.4 * u((n, MAX_HAIRS)),
    }


# ---------------------------------------------------------------- rendering


def _row_sum(a: np.ndarray) -> np.ndarray:
    """Sum over the last axis, left to right (a fixed order on every CPU), keeping the axis."""
    total = np.zeros(a.shape[:-1] + (1,), dtype=a.dtype)
    for j in range(a.shape[-1]):
        total += a[..., j : j + 1]
    return total


def _float32(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float32) if a.dtype.kind in "fb" else a


def _col(a: np.ndarray) -> np.ndarray:
    """Per-image vector (n,) -> (n, 1, 1) for broadcasting against (n, H, W)."""
    return np.asarray(a, dtype=np.float32)[:, None, None]


def _lesion_geometry(p: Params, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lesion mask in [0, 1], normalised radius rho/border, and polar angle, all (n, H, W)."""
    g = ((np.arange(size, dtype=np.float32) + 0.5) / size)[None]
    dx, dy = g[:, None, :] - _col(p["cx"]), g[:, :, None] - _col(p["cy"])
    cos, sin = xm.cos(_col(p["theta"])), xm.sin(_col(p["theta"]))
    sqa = np.sqrt(_col(p["aspect"]))
    eu, ev = (dx * cos + dy * sin) / sqa, (dy * cos - dx * sin) * sqa
    rho, phi = xm.hypot(eu, ev), xm.atan2(ev, eu)
    wobble = np.zeros_like(rho)
    for j, k in enumerate(HARMONICS):
        wobble += p["harm_w"][:, j, None, None] * xm.cos(k * phi + p["harm_phase"][:, j, None, None])
    border = _col(p["radius"]) * (1.0 + _col(p["irregularity"]) * wobble)
    mask = np.clip((border - rho) / _col(p["edge"]) + 0.5, 0.0, 1.0)
    return mask, rho / np.maximum(border, 1e-3), phi


def _dot_map(p: Params, size: int) -> np.ndarray:
    """Dark globules inside the lesion as a sum of separable Gaussians, (n, H, W) in [0, 1]."""
    n = len(p["dots"])
    active = np.arange(MAX_DOTS)[None] < np.round(p["dots"] * MAX_DOTS)[:, None]
    amp = active * p["dot_gain"] * (0.3 + 0.6 * p["dots"])[:, None]
    sqa = np.sqrt(p["aspect"])[:, None]
    eu = p["dot_r"] * xm.cos(p["dot_a"]) * sqa * p["radius"][:, None]
    ev = p["dot_r"] * xm.sin(p["dot_a"]) / sqa * p["radius"][:, None]
    cos, sin = xm.cos(p["theta"])[:, None], xm.sin(p["theta"])[:, None]
    x0, y0 = p["cx"][:, None] + eu * cos - ev * sin, p["cy"][:, None] + eu * sin + ev * cos
    g = (np.arange(size) + 0.5) / size
    sigma = np.maximum(p["dot_sigma"], 0.6 / size)[..., None]
    gx, gy = ((g - x0[..., None]) / sigma, (g - y0[..., None]) / sigma)
    gx = xm.exp(-0.5 * gx * gx).astype(np.float32)
    gy = (xm.exp(-0.5 * gy * gy) * amp[..., None]).astype(np.float32)
    dots = np.zeros((n, size, size), dtype=np.float32)
    for k in range(MAX_DOTS):  # a fixed summation order (einsum and BLAS pick theirs by CPU)
        dots += gy[:, k, :, None] * gx[:, k, None, :]
    return np.clip(dots, 0.0, 1.0)


def _hair_map(p: Params, size: int) -> np.ndarray:
    """Darkening factor of up to ``MAX_HAIRS`` slightly curved hairs, (n, H, W) in [0, 1]."""
    g = (np.arange(size, dtype=np.float32) + 0.5) / size
    x, y = g[None, None, :], g[None, :, None]
    out = np.zeros((len(p["cx"]), size, size), dtype=np.float32)
    for h in range(MAX_HAIRS):
        dx, dy = x - _col(p["hair_xy"][:, h, 0]), y - _col(p["hair_xy"][:, h, 1])
        cos, sin = xm.cos(_col(p["hair_angle"][:, h])), xm.sin(_col(p["hair_angle"][:, h]))
        along, across = dx * cos + dy * sin, dy * cos - dx * sin
        dist = np.abs(across + _col(p["hair_bend"][:, h]) * along * along)
        width = np.maximum(_col(p["hair_width"][:, h]), 0.8 / size)
        line = np.clip(1.0 - dist / width, 0.0, 1.0) * _col(p["hair_dark"][:, h] * p["hair_on"][:, h])
        out = np.maximum(out, line)
    return out


def render(p: Params, size: int, rng: np.random.Generator) -> np.ndarray:
    """Render feature + nuisance parameters to uint8 RGB images (n, size, size, 3)."""
    mask, rel, phi = _lesion_geometry(p, size)
    lesion_rgb = (1 - p["blue"])[:, None] * _BROWN + p["blue"][:, None] * _BLUE_GREY
    lesion_rgb = lesion_rgb * p["darkness"][:, None] + p["tint"]
    shading = 1.0 - _col(p["shade"]) * np.clip(1.0 - rel, 0.0, 1.0)  # darker centre
    streak = 0.5 + 0.5 * xm.cos(_col(p["streak_n"]) * phi + _col(p["streak_phase"]))
    streak = streak * streak * streak
    streak = streak * streak  # powers by multiplication: np.power's kernels differ by CPU
    rel_in = np.clip(rel, 0.0, 1.0)
    streak *= rel_in * np.sqrt(rel_in) * _col(p["streaks"])
    lesion = lesion_rgb[:, None, None, :] * (shading * (1.0 - 0.55 * streak))[..., None]
    img = p["skin"][:, None, None, :] * (1.0 - mask[..., None]) + lesion * mask[..., None]
    dots = (_dot_map(p, size) * mask)[..., None]
    img = img * (1.0 - dots) + _DOT * dots
    g = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    ramp = g[None, None, :] * _col(xm.cos(p["illum_dir"])) + g[None, :, None] * _col(xm.sin(p["illum_dir"]))
    img = img * (1.0 + 2.0 * _col(p["illum"]) * ramp)[..., None]
    hair = _hair_map(p, size)[..., None]
    img = img * (1.0 - hair) + _HAIR * hair
    img += xm.standard_normal(rng, img.shape).astype(np.float32) * p["noise_sd"][:, None, None, None]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def synthesize(task: str, labels: np.ndarray, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """Images (N, S, S, 3) uint8 for the given labels of ``task``, rendered in fixed-size chunks."""
    spec = get_task(task)
    params = {**sample_nuisance(rng, len(labels)), **spec.sampler(rng, labels)}
    out = np.empty((len(labels), image_size, image_size, 3), dtype=np.uint8)
    for start in range(0, len(labels), _CHUNK):
        chunk = {k: _float32(v[start : start + _CHUNK]) for k, v in params.items()}
        out[start : start + _CHUNK] = render(chunk, image_size, rng)
    return out


def generate_synthetic(
    task: str, n_train: int, n_val: int, n_test: int, image_size: int = 64, seed: int = 0
) -> dict[str, np.ndarray]:
    """A synthetic dataset in the MedMNIST npz layout (plus ``class_names`` as a unicode array).

    Classes are balanced within every split and shuffled; all splits come from one seeded stream, so
    the same arguments give byte-identical arrays.
    """
    spec = get_task(task)
    counts = dict(zip(SPLITS, (n_train, n_val, n_test), strict=True))
    for split, n in counts.items():
        if int(n) != n or n < 1:
            raise ValueError(f"n_{split} must be a positive integer, got {n!r}")
    if int(image_size) != image_size or image_size < 16:
        raise ValueError(f"image_size must be an integer >= 16, got {image_size!r}")
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for split, n in counts.items():
        labels = balanced_labels(rng, int(n), len(spec.class_names))
        out[f"{split}_images"] = synthesize(task, labels, int(image_size), rng)
        out[f"{split}_labels"] = labels[:, None]
    out["class_names"] = np.array(spec.class_names, dtype=str)
    return out
