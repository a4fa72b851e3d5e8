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

    def query(self, images: torch.Tensor) -> torch.Tensor:
        """``images``: (B, C, X, Y, Z), detached. Returns a tensor of the same shape."""
        if self.size == 0:
            return images
        out = []
        for image in images.detach():
            image = image.unsqueeze(0)
            if len(self.images) < self.size:
                self.images.append(image.clone())
                out.append(image)
            elif torch.rand(1).item() < 0.5:
                idx = int(torch.randint(len(self.images), (1,)).item())
                out.append(self.images[idx].clone())
                self.images[idx] = image.clone()
            else:
                out.append(image)
        return torch.cat(out, 0)

    def state_dict(self) -> dict:
        return {"size": self.size, "images": [im.cpu() for im in self.images]}

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        self.size = int(state["size"])
        self.images = [im.to(device) for im in state["images"]]
