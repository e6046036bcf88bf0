"""Toy 2-D densities (FFJORD's conventions) and loaders for user data files."""

import math
import os

import numpy as np
import torch

__all__ = ["TOY", "toy", "load", "ENTROPY", "IMAGES", "digits"]

# Differential entropies (nats) where they are known in closed form or to good accuracy.
ENTROPY = {"checkerboard": math.log(32.0),  # uniform on 8 squares of area 4
           "8gaussians": math.log(8) + math.log(2 * math.pi * math.e * 0.5 ** 2 / 2)}


def _moons(n, g):
    # sklearn's make_moons(noise=0.05) with a continuous angle, scaled x2 and shifted as in
    # FFJORD: noise std 0.1 at this scale, entropy about 1.67 nats
    outer = torch.rand(n, generator=g) < 0.5
    angle = torch.rand(n, generator=g) * math.pi
    x = torch.where(outer, torch.cos(angle), 1 - torch.cos(angle))
    y = torch.where(outer, torch.sin(angle), 0.5 - torch.sin(angle))
    pts = torch.stack([x, y], -1) + 0.05 * torch.randn(n, 2, generator=g)
    return pts * 2 + torch.tensor([-1.0, -0.2])


def _checkerboard(n, g):
    x1 = torch.rand(n, generator=g) * 4 - 2
    x2 = torch.rand(n, generator=g) - torch.randint(0, 2, (n,), generator=g) * 2.0
    x2 = x2 + torch.floor(x1) % 2
    return torch.stack([x1, x2], -1) * 2


def _eight_gaussians(n, g):
    angles = torch.arange(8) * (2 * math.pi / 8)
    centers = 4 * torch.stack([torch.cos(angles), torch.sin(angles)], -1)
    idx = torch.randint(0, 8, (n,), generator=g)
    return (centers[idx] + 0.5 * torch.randn(n, 2, generator=g)) / math.sqrt(2)


def _spirals(n, g):
    r = torch.sqrt(torch.rand(n, 1, generator=g)) * 540 * (2 * math.pi) / 360
    pts = (torch.cat([-torch.cos(r) * r, torch.sin(r) * r], -1)
           + torch.rand(n, 2, generator=g) * 0.5)
    sign = torch.where(torch.rand(n, 1, generator=g) < 0.5, -1.0, 1.0)
    return pts * sign / 3 + 0.1 * torch.randn(n, 2, generator=g)


def _pinwheel(n, g, arms=5, radial_std=0.3, tangential_std=0.1, rate=0.25):
    feats = torch.randn(n, 2, generator=g) * torch.tensor([radial_std, tangential_std])
    feats[:, 0] += 1.0
    arm = torch.randint(0, arms, (n,), generator=g)
    angle = arm * (2 * math.pi / arms) + rate * torch.exp(feats[:, 0])
    c, s = torch.cos(angle), torch.sin(angle)
    rot = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    return 2 * torch.einsum("ni,nij->nj", feats, rot)


def _rings(n, g):
    radius = torch.tensor([1.0, 0.75, 0.5, 0.25])[torch.randint(0, 4, (n,), generator=g)]
    angle = torch.rand(n, generator=g) * 2 * math.pi
    pts = torch.stack([torch.cos(angle), torch.sin(angle)], -1) * radius[:, None] * 3
    return pts + 0.08 * torch.randn(n, 2, generator=g)


TOY = {"moons": _moons, "checkerboard": _checkerboard, "8gaussians": _eight_gaussians,
       "spirals": _spirals, "pinwheel": _pinwheel, "rings": _rings}


def toy(name, n=10_000, seed=0):
    """``n`` points of a 2-D toy density, a ``(n, 2)`` float32 tensor (FFJORD's scales).

    Args:
        name: one of ``moons, checkerboard, 8gaussians, spirals, pinwheel, rings``.
        n: number of points.
        seed: seed of a private generator (the global RNG is untouched).
    """
    if name not in TOY:
        raise ValueError(f"unknown toy data set {name!r}; expected one of: {', '.join(TOY)}")
    if n < 1:
        raise ValueError(f"n must be a positive number of points, got {n}")
    return TOY[name](int(n), torch.Generator().manual_seed(seed)).float()


#: Image data sets the CLI knows (``pyro-flows fit digits``): name -> (image size, levels).
IMAGES = {"digits": (8, 17), "digits16": (16, 17)}
DIGITS_TEST = 360  # images in the fixed test split (20% of scikit-learn's 1797)


def digits(split="train", seed=0, size=8, labels=False):
    """scikit-learn's handwritten digits (``load_digits``: 1797 images of 8x8 pixels with 17
    grey levels, shipped with scikit-learn, no download) as integer images ``(N, 1, size,
    size)`` with values ``0 .. 16``.

    The split is fixed by ``seed``: a permutation from ``torch.Generator().manual_seed(seed)``
    whose first 360 images are ``"test"`` and the other 1437 ``"train"`` (``"all"``: the
    1797 in scikit-learn's order). ``size=16`` upsamples each image bilinearly by 2 and rounds
    back to the 17 levels: a 16x16 set (three levels of a multi-scale flow) on the fly.

    Args:
        split: ``"train"``, ``"test"`` or ``"all"``.
        seed: seed of the split.
        size: 8 (the original) or 16.
        labels: also return the digit classes ``(N,)``.
    Returns: a long tensor ``(N, 1, size, size)``, or ``(images, labels)``.
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"unknown split {split!r}; expected 'train', 'test' or 'all'")
    if size not in (8, 16):
        raise ValueError(f"digits come in size 8 (the original) or 16 (upsampled), got {size}")
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("the digits data set needs scikit-learn (it ships the images): "
                          "pip install scikit-learn") from e
    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float64).unsqueeze(1)
    classes = torch.as_tensor(bunch.target, dtype=torch.long)
    if size == 16:
        images = torch.nn.functional.interpolate(images, scale_factor=2, mode="bilinear",
                                                 align_corners=False).round().clamp(0, 16)
    images = images.long()
    if split != "all":
        perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
        idx = perm[:DIGITS_TEST] if split == "test" else perm[DIGITS_TEST:]
        images, classes = images[idx], classes[idx]
    return (images, classes) if labels else images


def load(path, finite=False):
    """Loads a data matrix ``(N, D)`` from ``.csv`` (comma separated, an optional header
    line), ``.npy`` or ``.npz`` (its only array, or the one named ``data``/``x``).

    Args:
        path: the file.
        finite: raise a ``ValueError`` naming the first rows (and, for a CSV, their lines in
            the file) that hold NaN or infinite values.
    Returns: a float32 tensor ``(N, D)``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path!r} does not exist")
    ext = os.path.splitext(path)[1].lower()
    skip = 0
    try:
        if ext == ".csv":
            with open(path) as f:
                first = f.readline()
            skip = 0 if _is_numeric_row(first) else 1
            array = np.loadtxt(path, delimiter=",", skiprows=skip, ndmin=2, dtype=np.float64)
        elif ext == ".npy":
            array = np.load(path, allow_pickle=False)
        elif ext == ".npz":
            with np.load(path, allow_pickle=False) as z:
                keys = list(z.keys())
                key = next((k for k in ("data", "x") if k in keys),
                           keys[0] if len(keys) == 1 else None)
                if key is None:
                    raise ValueError(f"the .npz file holds {keys}; name the data array 'data'")
                array = z[key]
        else:
            raise ValueError(f"unsupported extension {ext!r}; expected .csv, .npy or .npz")
    except ValueError as e:
        raise ValueError(f"could not read {path!r}: {e}") from e
    array = np.asarray(array)
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"{path!r} must hold a numeric (N, D) matrix, got {array.dtype} "
                         f"with shape {array.shape}")
    if finite:
        _check_finite(array, path, skip if ext == ".csv" else None)
    if np.isfinite(array).all() and np.abs(array).max(initial=0) > np.finfo(np.float32).max:
        raise ValueError(f"{path!r} holds values up to {np.abs(array).max():.3g}, beyond "
                         "float32's range (3.4e38); rescale the data")
    return torch.as_tensor(array, dtype=torch.float32)


def _check_finite(array, path, header_lines):
    """Raises a ``ValueError`` naming the rows of ``array`` with NaN or infinite values (0-based
    data rows; for a CSV also the 1-based line in the file)."""
    bad = np.flatnonzero(~np.isfinite(np.asarray(array, dtype=np.float64)).all(1))
    if len(bad) == 0:
        return
    first = int(bad[0])
    where = f"row {first}"
    if header_lines is not None:
        where += f" (line {first + header_lines + 1} of the file)"
    shown = ", ".join(map(str, bad[:5].tolist())) + (", ..." if len(bad) > 5 else "")
    raise ValueError(f"{path!r} has {len(bad)} row(s) with NaN or infinite values (first: "
                     f"{where}; rows {shown}, counted from 0 without the header); expected "
                     "finite numbers: drop or impute them")


def _is_numeric_row(line):
    try:
        [float(v) for v in line.strip().split(",") if v.strip()]
        return bool(line.strip())
    except ValueError:
        return False
