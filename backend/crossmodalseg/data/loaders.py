"""Endless patch streams over preprocessed (cached) case items."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from monai.data import Dataset, MetaTensor, list_data_collate
from torch.utils.data import DataLoader, RandomSampler


def patch_stream(items: Sequence[dict], transform: Callable, seed: int, device: torch.device,
                 keys: Sequence[str] = ("image", "label"), num_workers: int | None = None) -> Iterator[dict]:
    """Yields batches of patches forever: one case drawn at random per batch, several patches from it.

    The transform (e.g. RandCropByLabelClassesd with num_samples=B) decides how many patches a case gives.
    """
    if not items:
        raise ValueError("no training cases for this data stream")
    if num_workers is None:
        num_workers = 0 if device.type == "cpu" else 4  # on a 2-core CPU a worker only competes with training
    # Only the arrays travel through the random transforms and the collate (grids and ids stay behind).
    dataset = Dataset(data=[{k: it[k] for k in keys if k in it} for it in items], transform=transform)
    generator = torch.Generator().manual_seed(seed)
    sampler = RandomSampler(dataset, replacement=True, num_samples=1 << 30, generator=generator)
    if hasattr(transform, "set_random_state"):
        transform.set_random_state(seed=seed % (2**32))
    loader = DataLoader(dataset, batch_size=1, sampler=sampler, num_workers=num_workers,
                        collate_fn=list_data_collate, pin_memory=device.type == "cuda",
                        persistent_workers=num_workers > 0)
    for batch in loader:
        yield {k: _plain(batch[k]).to(device, non_blocking=True) for k in keys if k in batch}


def _plain(x) -> torch.Tensor:
    # MetaTensor dispatches every op through __torch_function__: several times slower in a training step.
    return x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)
