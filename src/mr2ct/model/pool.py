"""History of generated images shown to the discriminators (Shrivastava et al. 2017; CycleGAN)."""

from __future__ import annotations

import torch


class ImagePool:
    """Keep up to ``size`` generated volumes; answer a query with a mix of new and remembered ones.

    Each image of the query batch is either returned as is (pool not full yet, or with probability 0.5)
    or swapped for a random stored image, which then takes its place in the pool. Training the
    discriminator on older fakes damps the oscillation between G and D. ``size=0`` disables the pool.
    Stored images live on the CPU-side device they came from and are part of the checkpoint
    (:meth:`state_dict`), so a resumed run sees the same history.
    """

    def __init__(self, size: int = 50) -> None:
        self.size = int(size)
        self.images: list[torch.Tensor] = []

    def draw(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Answer a query without changing the pool: (images to show, the pool's contents after this query).

        ``images``: (B, C, X, Y, Z), detached; the answer has the same shape. Pass the second value to
        :meth:`commit` once the step that used the answer was taken (a skipped step leaves the pool as it was).
        """
        if self.size == 0:
            return images, self.images
        history = list(self.images)
        out = []
        for image in images.detach():
            image = image.unsqueeze(0)
            if len(history) < self.size:
                history.append(image.clone())
                out.append(image)
            elif torch.rand(1).item() < 0.5:
                idx = int(torch.randint(len(history), (1,)).item())
                # in the query's dtype: a stored fake may come from steps in other numerics (the numerics trial's
                # bf16 steps, a checkpoint resumed in fp32), and outside autocast a conv takes one dtype only
                out.append(history[idx].to(image.dtype, copy=True))
                history[idx] = image.clone()
            else:
                out.append(image)
        return torch.cat(out, 0), history

    def commit(self, history: list[torch.Tensor]) -> None:
        """Make the contents returned by :meth:`draw` the pool's own."""
        self.images = history

    def query(self, images: torch.Tensor) -> torch.Tensor:
        """:meth:`draw` and :meth:`commit` at once."""
        out, history = self.draw(images)
        self.commit(history)
        return out

    def state_dict(self) -> dict:
        return {"size": self.size, "images": [im.cpu() for im in self.images]}

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        self.size = int(state["size"])
        self.images = [im.to(device) for im in state["images"]]
