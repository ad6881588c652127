"""DP-SGD's randomness from a cryptographic source: ChaCha20 noise and Poisson sampling.

Opacus draws DP-SGD's Gaussian noise and its Poisson batches from torch's
Mersenne Twister unless ``secure_mode`` is on, and secure mode needs
``torchcsprng``, which has no build for the torch fedvault runs on. A
Mersenne Twister is predictable from its output (624 consecutive words give
its state), and a seeded one is reproducible by anyone who knows the seed:
a hospital's training seed derives from the job's seed, which the
coordinator knows, so it could regenerate the noise and subtract it from an
update. Here both come from a ChaCha20 keystream (RFC 8439, via ``cryptography``'s
OpenSSL binding) under a 256-bit key fresh from the operating system
(``os.urandom``) for every :class:`ChaChaRandom`: unpredictable, and never the
same twice, whatever torch's seed.

Uniforms
    Each uniform double takes 64 keystream bits and keeps the top 53:
    ``k * 2**-53`` for ``k`` uniform on ``[0, 2**53)``, i.e. every double of
    that grid in ``[0, 1)`` with equal probability (exact: ``k`` converts to a
    double without rounding).

Gaussians, robust to floating-point attacks
    A Gaussian sampler's *floating-point* output does not have the support
    of the real distribution: one Box–Muller draw is a function of two
    53-bit uniforms, so it takes at most 2**106 distinct values, spread
    unevenly over the doubles. Mironov (CCS 2012) broke the Laplace mechanism
    this way, and Jin et al. (arXiv:2112.05307) did it for Opacus' Gaussian
    noise: an output value that one neighbouring input can produce and the
    other cannot gives the record away, with no noise to hide it.
    Holohan & Braghin (arXiv:2107.10138, section 5.1) close the gap by
    summing ``2n`` independent Gaussian draws and rescaling by
    ``1/sqrt(2n)``: the sum has the same N(0, 1) law, and the set of values
    it can take is so dense (an attack costs ``2**(p(2n-1))`` work for
    ``p = 53``: ``2**159`` at ``n = 2``) that no output is telling. Opacus'
    own secure mode takes ``n = 2``, as here: each noise value is
    ``(z1 + z2 + z3 + z4) / 2`` for four independent N(0, 1) Box–Muller
    draws computed in float64 from 53-bit uniforms, the four taken from
    four *different* Box–Muller pairs (eight uniforms behind every value;
    the two outputs of one pair are independent but share their inputs, so
    they go to different noise values). Only then is the sum scaled by
    ``std`` and rounded to the parameters' dtype (float32): the float64
    lattice of the sum is far finer than float32's, so every float32 value
    in range is reachable whatever the clipped gradient it is added to.
    Box–Muller's ``-2 ln u`` with ``u`` in ``(0, 1]`` and 53-bit ``u``
    bounds one draw at ``sqrt(106 ln 2) ~ 8.6`` (a true Gaussian exceeds it
    with probability ~1e-17) and the sum at ~17 standard deviations: a
    departure from the exact Gaussian of order 1e-16 per value, far below
    any delta a job uses.

Poisson sampling
    Each record joins a batch independently with probability ``q``:
    ``uniform < q``, one uniform per record per step; an empty batch is
    still yielded (and the noise-only step taken), as Opacus does.

Cost per noise value: 32 keystream bytes and two Box–Muller pairs (two
logarithms, square roots, sines and cosines), vectorised with numpy and torch
in blocks of 2**15 values (bounded memory at any parameter count): about 6x
``torch.normal`` on one CPU thread; ``bench/dp_step.py`` measures the cost of
a whole DP-SGD step against the fast path.

:func:`secure_noise` and :func:`secure_data_loader` put the two into the
objects Opacus' ``PrivacyEngine.make_private`` returns (both flat-clipping
optimizers fedvault uses: hooks' ``DPOptimizer`` and ghost clipping's
``DPOptimizerFastGradientClipping``); :func:`fedvault.privacy.dp.make_private`
calls them when ``secure_rng`` is on. Imports torch and Opacus: load it on
the training path only.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizer
from opacus.optimizers import DPOptimizerFastGradientClipping as _GhostOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils.data import DataLoader

from fedvault.errors import InvalidConfigError

__all__ = [
    "ChaChaRandom",
    "SecureDPDataLoader",
    "SecureDPOptimizer",
    "SecureDPOptimizerFastGradientClipping",
    "SecurePoissonSampler",
    "secure_data_loader",
    "secure_noise",
]

_KEY_BYTES = 32
# ChaCha20's 32-bit block counter runs out after 2**32 blocks of 64 bytes (256
# GiB) under one key and nonce: take a fresh key long before.
_REKEY_AFTER_BYTES = 1 << 36
_BLOCK = 1 << 15  # noise values per vectorised block (1 MiB of keystream): cache-sized
_TWO_PI = 2.0 * math.pi


class ChaChaRandom:
    """A CSPRNG: a ChaCha20 keystream under a key from ``os.urandom``.

    Thread-safe; re-keyed from the OS after 64 GiB of keystream and in a
    forked child (which would otherwise repeat its parent's stream).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._zeros = bytes(8 * _BLOCK * 4)
        self._rekey()

    def _rekey(self) -> None:
        key = os.urandom(_KEY_BYTES)
        # The nonce's first 4 bytes are the block counter: start it at 0. A
        # fresh random key per stream makes a fixed nonce safe.
        cipher = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None)
        self._encryptor = cipher.encryptor()
        self._used = 0
        self._pid = os.getpid()

    def _words(self, count: int) -> np.ndarray[Any, np.dtype[np.uint64]]:
        """``count`` 64-bit keystream words."""
        out = bytearray(8 * count)
        view = memoryview(out)
        with self._lock:
            if self._pid != os.getpid() or self._used + len(out) > _REKEY_AFTER_BYTES:
                self._rekey()
            for start in range(0, len(out), len(self._zeros)):
                part = view[start : start + len(self._zeros)]
                # ChaCha20 of zeros is the keystream itself.
                self._encryptor.update_into(memoryview(self._zeros)[: len(part)], part)
            self._used += len(out)
        return np.frombuffer(out, dtype="<u8")

    def uniform(self, count: int) -> torch.Tensor:
        """``count`` float64 uniforms on ``[0, 1)``, multiples of ``2**-53``."""
        top = self._words(count) >> np.uint64(11)  # the top 53 bits: < 2**53, exact as double
        return torch.from_numpy(top.view(np.int64)).to(torch.float64).mul_(2.0**-53)

    def standard_normal(self, count: int) -> torch.Tensor:
        """``count`` float64 N(0, 1) values, each the sum of four Box–Muller draws over 2."""
        return self._fill_normal(torch.empty(count, dtype=torch.float64), 1.0)

    def _fill_normal(self, out: torch.Tensor, std: float) -> torch.Tensor:
        """Fill the 1-D ``out`` with N(0, std**2) values, computed in float64, rounded once."""
        for start in range(0, out.numel(), _BLOCK):
            stop = min(start + _BLOCK, out.numel())
            out[start:stop] = self._normal_block(stop - start, 0.5 * std)
        return out

    def _normal_block(self, count: int, scale: float) -> torch.Tensor:
        """``count`` values ``scale * (z1 + z2 + z3 + z4)``, float64."""
        m = max(count, 2)  # below 2 the four draws could not come from four pairs
        u = self.uniform(4 * m).view(2, 2 * m)
        radius = torch.rsub(u[0], 1.0).log_().mul_(-2.0).sqrt_()  # 1 - u in (0, 1]: finite log
        angle = u[1].mul_(_TWO_PI)
        z1 = (radius * torch.cos(angle)).view(2, m)
        z2 = (radius * torch.sin(angle)).view(2, m)
        # Value i sums the cosine draws of pairs i and m+i and the sine draws of
        # pairs i-1 and m+i-1 (mod m): four different pairs for m >= 2.
        total = z1[0] + z1[1] + torch.roll(z2[0], 1) + torch.roll(z2[1], 1)
        return total.mul_(scale)[:count]

    def gaussian_like(self, reference: torch.Tensor, std: float) -> torch.Tensor:
        """N(0, std**2) noise of ``reference``'s shape, dtype and device."""
        if std == 0:
            return torch.zeros_like(reference)
        noise = self._fill_normal(torch.empty(reference.numel(), dtype=reference.dtype), std)
        return noise.view(reference.shape).to(reference.device)

    def poisson_mask(self, count: int, rate: float) -> torch.Tensor:
        """``count`` independent Bernoulli(``rate``) draws (the Poisson-sampling mask)."""
        return self.uniform(count) < rate


class SecurePoissonSampler(UniformWithReplacementSampler):  # type: ignore[misc]
    """Opacus' Poisson batch sampler, drawing from a :class:`ChaChaRandom`.

    ``steps`` batches (default ``int(1 / sample_rate)``, as Opacus); each record
    is in a batch with probability ``sample_rate``, independently; empty
    batches are yielded.
    """

    def __init__(
        self,
        *,
        num_samples: int,
        sample_rate: float,
        steps: int | None = None,
        rng: ChaChaRandom | None = None,
    ) -> None:
        super().__init__(num_samples=num_samples, sample_rate=sample_rate, steps=steps)
        self.rng = rng or ChaChaRandom()

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            mask = self.rng.poisson_mask(self.num_samples, self.sample_rate)
            yield mask.nonzero().reshape(-1).tolist()


class SecureDPDataLoader(DPDataLoader):  # type: ignore[misc]
    """Opacus' Poisson data loader with its batches drawn by a :class:`SecurePoissonSampler`.

    Built from an Opacus ``DPDataLoader`` by :func:`secure_data_loader`: same
    data set, sample rate, step count, collate function (empty batches
    included) and workers; only the sampler's source of randomness differs.
    """

    def __init__(self, loader: DPDataLoader, rng: ChaChaRandom | None = None) -> None:
        self.sample_rate = loader.sample_rate
        self.distributed = False
        sampler = SecurePoissonSampler(
            num_samples=len(loader.dataset),
            sample_rate=loader.sample_rate,
            steps=len(loader.batch_sampler),
            rng=rng,
        )
        # DataLoader's own constructor: DPDataLoader's would build Opacus' sampler.
        DataLoader.__init__(
            self,
            dataset=loader.dataset,
            batch_sampler=sampler,
            num_workers=loader.num_workers,
            collate_fn=loader.collate_fn,
            pin_memory=loader.pin_memory,
            timeout=loader.timeout,
            worker_init_fn=loader.worker_init_fn,
            multiprocessing_context=loader.multiprocessing_context,
            prefetch_factor=loader.prefetch_factor,
            persistent_workers=loader.persistent_workers,
        )


def secure_data_loader(loader: DPDataLoader, rng: ChaChaRandom | None = None) -> DPDataLoader:
    """``loader`` (Opacus' Poisson loader) drawing its batches from a CSPRNG.

    Raises
    ------
    InvalidConfigError
        For anything but a single-process ``DPDataLoader``.
    """
    if not isinstance(loader, DPDataLoader) or loader.distributed:
        raise InvalidConfigError(
            f"secure sampling replaces a non-distributed DPDataLoader (got {type(loader).__name__})"
        )
    return SecureDPDataLoader(loader, rng)


class _SecureNoise:
    """``add_noise`` from a :class:`ChaChaRandom`; otherwise the Opacus optimizer it mixes into.

    The same step as Opacus' ``add_noise`` (std ``noise_multiplier *
    max_grad_norm``, or the adaptive-clipping ``_adjusted_noise_multiplier``
    where set; added to each parameter's clipped sum; each sum used once),
    with the noise drawn from the CSPRNG instead of torch's generator.
    """

    rng: ChaChaRandom
    params: list[torch.nn.Parameter]
    noise_multiplier: float
    max_grad_norm: float

    def add_noise(self) -> None:
        """Add CSPRNG Gaussian noise to the clipped gradients, into ``p.grad``."""
        multiplier = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier)
        std = float(multiplier) * float(self.max_grad_norm)
        for p in self.params:
            summed: Any = p.summed_grad  # type: ignore[attr-defined]
            _check_processed_flag(summed)
            p.grad = (summed + self.rng.gaussian_like(summed, std)).view_as(p)
            _mark_as_processed(summed)


class SecureDPOptimizer(_SecureNoise, DPOptimizer):  # type: ignore[misc]
    """Opacus' ``DPOptimizer`` (hooks mode) with CSPRNG noise."""


class SecureDPOptimizerFastGradientClipping(_SecureNoise, _GhostOptimizer):  # type: ignore[misc]
    """Opacus' ``DPOptimizerFastGradientClipping`` (ghost mode) with CSPRNG noise."""


_SECURE_CLASSES: dict[type, type] = {
    DPOptimizer: SecureDPOptimizer,
    _GhostOptimizer: SecureDPOptimizerFastGradientClipping,
}


def secure_noise(optimizer: DPOptimizer, rng: ChaChaRandom | None = None) -> DPOptimizer:
    """``optimizer`` (from ``PrivacyEngine.make_private``) drawing its noise from a CSPRNG.

    Changes the instance's class to its secure subclass (state, hooks and
    accountant untouched). Only the two flat-clipping, single-process
    optimizers are covered; any other class is refused rather than left on
    torch's generator.
    """
    secure = _SECURE_CLASSES.get(type(optimizer))
    if secure is None:
        if isinstance(optimizer, _SecureNoise):
            return optimizer
        raise InvalidConfigError(
            f"no CSPRNG noise for Opacus optimizer {type(optimizer).__name__}; fedvault covers "
            + ", ".join(sorted(c.__name__ for c in _SECURE_CLASSES))
        )
    optimizer.__class__ = secure
    optimizer.rng = rng or ChaChaRandom()
    return optimizer
