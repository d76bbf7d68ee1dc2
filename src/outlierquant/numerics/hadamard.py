"""Hadamard and orthogonal matrices (numpy only): Sylvester and Paley constructions, the
Kronecker factorization ``d = m·2ᵏ`` with a small orthogonal block for the odd part,
randomized Hadamard and Haar-random rotations. Shared by the rotation passes and the
kernels' numpy reference.
"""

from __future__ import annotations

import math

import numpy as np

from outlierquant.errors import UnsupportedModelError


def is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def sylvester_hadamard(n: int) -> np.ndarray:
    """The unnormalized ``n x n`` Sylvester Hadamard matrix (entries ±1), ``n = 2^k``."""
    if not is_power_of_two(n):
        raise UnsupportedModelError(f"Sylvester Hadamard size must be a power of two, got {n}")
    matrix = np.ones((1, 1))
    while matrix.shape[0] < n:
        matrix = np.block([[matrix, matrix], [matrix, -matrix]])
    return matrix


def _is_prime(value: int) -> bool:
    if value < 2:
        return False
    return all(value % p for p in range(2, int(value**0.5) + 1))


def paley_hadamard(order: int) -> np.ndarray | None:
    """Paley construction I: a Hadamard matrix of order ``q + 1``, ``q`` prime, ``q ≡ 3 mod 4``."""
    q = order - 1
    if not (_is_prime(q) and q % 4 == 3):
        return None
    residues = {(i * i) % q for i in range(1, q)}
    chi = np.array([0] + [1 if i in residues else -1 for i in range(1, q)])
    jacobsthal = np.array([[chi[(j - i) % q] for j in range(q)] for i in range(q)])
    skew = np.zeros((order, order))
    skew[0, 1:] = 1
    skew[1:, 0] = -1
    skew[1:, 1:] = jacobsthal
    return skew + np.eye(order)


def orthogonal_block(m: int) -> np.ndarray:
    """An ``m x m`` orthogonal matrix that spreads every input over all outputs.

    A normalized Hadamard matrix where one is constructible (powers of two, Paley I
    orders); otherwise the Kronecker product of blocks of the factors of ``m``; for a prime
    without a Hadamard matrix, the Householder reflection ``I - (2/m) 11ᵀ``.
    """
    if m < 1:
        raise UnsupportedModelError(f"orthogonal block size must be >= 1, got {m}")
    if is_power_of_two(m):
        return sylvester_hadamard(m) / np.sqrt(m)
    paley = paley_hadamard(m)
    if paley is not None:
        return paley / np.sqrt(m)
    for factor in range(2, int(m**0.5) + 1):
        if m % factor == 0:
            return np.kron(orthogonal_block(factor), orthogonal_block(m // factor))
    return np.eye(m) - (2.0 / m) * np.ones((m, m))


def hadamard_factorization(dim: int) -> tuple[int, int]:
    """Split ``dim`` into ``(m, n)``, ``dim = m * n``, ``n = 2^k``, for the default block.

    ``m`` is the odd part of ``dim``, doubled up to twice while that reaches an order with
    a Paley Hadamard matrix (384 = 12 * 32, 1536 = 12 * 128; 576 = 9 * 64 has none).
    """
    if dim < 1:
        raise UnsupportedModelError(f"Hadamard dimension must be >= 1, got {dim}")
    odd = dim
    while odd % 2 == 0:
        odd //= 2
    if odd == 1:
        return 1, dim
    for doubling in range(3):
        m = odd << doubling
        if dim % m == 0 and paley_hadamard(m) is not None:
            return m, dim // m
    return odd, dim // odd


def default_hadamard_block(dim: int) -> np.ndarray | None:
    """The ``block`` input HadamardTransform needs for ``dim`` (None for a power of two)."""
    m, _ = hadamard_factorization(dim)
    return None if m == 1 else orthogonal_block(m).astype(np.float32)


def check_hadamard_size(dim: int, block: np.ndarray | None) -> tuple[int, int]:
    """Validate ``dim`` against ``block``; return ``(m, n)``. Raises with the reason."""
    m = 1
    if block is not None:
        block = np.asarray(block)
        if block.ndim != 2 or block.shape[0] != block.shape[1] or block.shape[0] < 1:
            raise UnsupportedModelError(
                f"HadamardTransform block must be a square m x m matrix, got shape {block.shape}"
            )
        m = block.shape[0]
        gram = block.astype(np.float64) @ block.T.astype(np.float64)
        if not np.allclose(gram, np.eye(m), atol=1e-5):
            raise UnsupportedModelError("HadamardTransform block must be orthogonal (block @ block.T == I)")
    if dim < 1 or dim % m or not is_power_of_two(dim // m):
        hint = f" with an m x m block, m = {hadamard_factorization(dim)[0]}" if dim >= 1 else ""
        raise UnsupportedModelError(
            f"HadamardTransform: dimension {dim} is not m * 2^k for block size m = {m}; "
            f"supported sizes are powers of two, or m * 2^k{hint}"
        )
    return m, dim // m


def hadamard_rotation(dim: int, block: np.ndarray | None = None) -> np.ndarray:
    """The orthogonal ``dim x dim`` matrix ``R = M ⊗ H_n / sqrt(n)`` (float64); ``Y = X @ R``."""
    m, n = check_hadamard_size(dim, block)
    mix = np.eye(1) if block is None else np.asarray(block, dtype=np.float64)
    return np.kron(mix, sylvester_hadamard(n) / np.sqrt(n))


def hadamard_transform(x: np.ndarray, block: np.ndarray | None = None) -> np.ndarray:
    """HadamardTransform reference: ``x @ hadamard_rotation(d, block)``, float32 out."""
    x = np.asarray(x)
    rotation = hadamard_rotation(x.shape[-1], block)
    return (x.astype(np.float64) @ rotation).astype(np.float32)


def random_orthogonal(n: int, rng: np.random.Generator) -> np.ndarray:
    """A Haar-random ``n × n`` orthogonal matrix (QR of a Gaussian, signs fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))[None, :]


def _has_hadamard(m: int) -> bool:

    return is_power_of_two(m) or paley_hadamard(m) is not None


def hadamard_block(dim: int, rng: np.random.Generator | None = None) -> np.ndarray | None:
    """The ``m × m`` block of ``M ⊗ H_n`` for ``dim``: a Hadamard matrix where one exists,
    else (with ``rng``) a random orthogonal one, else the reference's default block."""

    m, _ = hadamard_factorization(dim)
    if m == 1:
        return None
    if rng is not None and not _has_hadamard(m):
        return random_orthogonal(m, rng)
    return default_hadamard_block(dim).astype(np.float64)


def orthogonal_matrix(dim: int, kind: str = "hadamard", *, seed: int = 0,
                      covariance: np.ndarray | None = None) -> np.ndarray:
    """A ``dim × dim`` orthogonal matrix (float64) of the given ``kind``.

    ``hadamard``: ``diag(±1)·(M ⊗ H_n/√n)`` with seeded random signs; ``random``: Haar;
    ``klt``: ``K · (M ⊗ H_n/√n)`` with ``K`` the eigenvectors of ``covariance``
    (descending eigenvalues); ``identity``: ``I`` (for tests).
    """

    rng = np.random.default_rng(seed)
    if kind == "identity":
        return np.eye(dim)
    if kind == "random":
        return random_orthogonal(dim, rng)
    hadamard = hadamard_rotation(dim, hadamard_block(dim, rng))
    if kind == "hadamard":
        signs = rng.choice([-1.0, 1.0], size=dim)
        return signs[:, None] * hadamard
    if kind == "klt":
        if covariance is None:
            raise ValueError("rotation 'klt' needs a covariance")
        eigenvalues, vectors = np.linalg.eigh(np.asarray(covariance, dtype=np.float64))
        vectors = vectors[:, np.argsort(eigenvalues)[::-1]]
        return vectors @ hadamard
    raise ValueError(f"rotation {kind!r}: allowed 'hadamard', 'random', 'klt', 'identity'")


def kronecker_factors(dim: int) -> tuple[int, int]:
    """``(k₁, k₂)`` with ``k₁·k₂ = dim``, ``k₁ ≤ k₂`` and ``k₁`` the largest divisor ≤ √dim."""
    if dim < 1:
        raise ValueError(f"dim={dim!r}: must be >= 1")
    k1 = max(d for d in range(1, math.isqrt(dim) + 1) if dim % d == 0)
    return k1, dim // k1


def kronecker_split(dim: int, block: np.ndarray | None = None) -> tuple[int, int]:
    """``(p, q)`` with ``dim = p * q``, ``q`` a power of two dividing ``n``, ``p + q`` minimal."""
    m, n = check_hadamard_size(dim, block)
    candidates = []
    q = 1
    while q <= n:
        candidates.append((dim // q + q, q))
        q *= 2
    _, best_q = min(candidates)
    return dim // best_q, best_q
