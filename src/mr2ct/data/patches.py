"""Training samples: patch pairs drawn from however many volumes exist, a fixed number per epoch."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

class TrainPatches(torch.utils.data.Dataset):
    """Training samples: unpaired draws from domains ``a`` and ``b``, and registered ``pairs`` when given.

    Items of ``a``/``b`` are dicts with ``"image"`` and ``"image_body"``, items of ``pairs`` dicts with
    ``"a"``, ``"b"``, ``"a_body"``, ``"b_body"`` (or lists of such dicts, one per patch sampled from a
    volume). A sample is ``{"a", "b", "mask_a", "mask_b", "paired"}`` (or a list of them).

    Without ``length`` an epoch visits every volume of the longer domain once (the shorter one is
    resampled at random) and every pair once. With ``length`` an epoch is that many draws, each a pair
    with probability n_pairs / (n_pairs + n_longer_domain) and a random volume of each domain otherwise,
    so the training length does not depend on how many files there are.
    """

    def __init__(
        self,
        a: torch.utils.data.Dataset,
        b: torch.utils.data.Dataset,
        pairs: torch.utils.data.Dataset | None = None,
        length: int | None = None,
    ) -> None:
        self.a, self.b, self.pairs = a, b, pairs
        self.len_a, self.len_b = len(a), len(b)  # type: ignore[arg-type]
        self.len_pairs = len(pairs) if pairs is not None else 0  # type: ignore[arg-type]
        self.n_unpaired = max(self.len_a, self.len_b) if self.len_a and self.len_b else 0
        if self.n_unpaired + self.len_pairs == 0:
            raise ValueError("no training volumes: both domains (or the pairs) need at least one volume")
        self.length = int(length) if length else None

    def __len__(self) -> int:
        return self.length or self.n_unpaired + self.len_pairs

    @staticmethod
    def _draw(n: int) -> int:
        # torch's RNG is seeded per worker by Lightning (seed_everything(workers=True)) and per epoch
        # by the sampler, so draws differ between epochs and workers
        return int(torch.randint(n, (1,)).item())

    def __getitem__(self, i: int) -> Any:
        if self.length:
            total = self.n_unpaired + self.len_pairs
            k = self._draw(total)
            if k >= self.n_unpaired:
                return self._paired(self._draw(self.len_pairs))
            return self._unpaired(self._draw(self.len_a), self._draw(self.len_b))
        if i >= self.n_unpaired:
            return self._paired(i - self.n_unpaired)
        longer_a = self.len_a == self.n_unpaired
        ia = i if longer_a else self._draw(self.len_a)
        ib = self._draw(self.len_b) if longer_a else i
        return self._unpaired(ia, ib)

    def _unpaired(self, ia: int, ib: int) -> Any:
        a, b = self.a[ia], self.b[ib]

        def make(pa: Mapping, pb: Mapping) -> dict[str, Any]:
            out = {"a": pa["image"], "b": pb["image"], "paired": torch.tensor(False)}
            if "image_body" in pa and "image_body" in pb:
                out.update(mask_a=pa["image_body"], mask_b=pb["image_body"])
            return out

        return [make(pa, pb) for pa, pb in zip(a, b)] if isinstance(a, list) else make(a, b)

    def _paired(self, i: int) -> Any:
        item = self.pairs[i]  # type: ignore[index]
        make = lambda p: {  # noqa: E731
            "a": p["a"], "b": p["b"], "mask_a": p["a_body"], "mask_b": p["b_body"], "paired": torch.tensor(True),
        }
        return [make(p) for p in item] if isinstance(item, list) else make(item)
