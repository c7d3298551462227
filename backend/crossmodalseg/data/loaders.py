"""Endless patch streams over preprocessed (cached) case items.

Batch k of a stream is a pure function of (seed, k): which cases its patches come from and every random choice of
its transforms (crop positions, augmentation) are drawn from a generator seeded with (seed, k). So the stream is the
same with 0 or N loader workers (each worker computes whole batches, and no two batches share random draws), and a
resumed run continues exactly where the interrupted one stopped by starting at its next batch index.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from monai.data import MetaTensor, list_data_collate
from torch.utils.data import DataLoader, Dataset

from ..errors import UserError
from .transforms import CLASS_INDICES


def batch_seed(seed: int, index: int) -> np.random.Generator:
    """The generator for batch `index` of a stream seeded with `seed` (independent streams for any two pairs)."""
    return np.random.default_rng([int(seed) % 2**63, int(index)])


class PatchBatches(Dataset):
    """Batch `index` = one case drawn at random, several patches from it (the transform decides how many, e.g.
    RandCropByLabelClassesd with num_samples=B), collated to tensors (B, C, ...).

    A case that the patch covers whole has one patch position only: its B patches would be one crop B times (exact
    copies when the plan does not augment, as on small or coarse images), a batch that costs B steps and teaches
    one. Then each patch of the batch comes from a case of its own, drawn at random, as nnU-Net draws every batch."""

    def __init__(self, items: Sequence[dict], transform: Callable, seed: int, keys: Sequence[str]):
        if not items:
            raise UserError("no training cases for this data stream")
        # Only the arrays (and the class positions) travel through the transforms and the collate.
        self.items = [{k: item[k] for k in (*keys, CLASS_INDICES) if k in item} for item in items]
        self.transform = copy.deepcopy(transform)  # its random state is ours to set
        self.seed, self.keys = seed, list(keys)

    def __len__(self) -> int:
        return 1 << 62  # endless; a sampler picks the indices

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = batch_seed(self.seed, index)
        item, patches = self._patches(rng)
        if len(patches) > 1 and patches[0]["image"].shape[1:] == item["image"].shape[1:]:
            patches = [patches[0], *(self._patches(rng)[1][0] for _ in patches[1:])]
        batch = list_data_collate(patches)
        return {k: _plain(batch[k]) for k in self.keys if k in batch}

    def _patches(self, rng: np.random.Generator) -> tuple[dict, list[dict]]:
        """A case drawn with `rng` and the transform's patches of it, its random choices drawn with `rng` too."""
        item = self.items[int(rng.integers(len(self.items)))]
        if hasattr(self.transform, "set_random_state"):
            self.transform.set_random_state(seed=int(rng.integers(2**32)))
        patches = self.transform(dict(item))
        return item, patches if isinstance(patches, list) else [patches]


def patch_stream(items: Sequence[dict], transform: Callable, seed: int, device: torch.device,
                 keys: Sequence[str] = ("image", "label"), num_workers: int | None = None,
                 start: int = 0) -> Iterator[dict]:
    """Yields batches `start`, `start + 1`, ... of the stream (seed, items, transform), on `device`, forever."""
    dataset = PatchBatches(items, transform, seed, keys)
    if num_workers is None:
        num_workers = 0 if device.type == "cpu" else 4  # on a 2-core CPU a worker only competes with training
    # Its own generator: a loader draws a base seed from the global one when iterated, which would shift the
    # global random state that the training steps use (and break exact resume). Batches never use that seed.
    loader = DataLoader(dataset, batch_size=None, sampler=itertools.count(start), num_workers=num_workers,
                        pin_memory=device.type == "cuda", persistent_workers=num_workers > 0,
                        prefetch_factor=2 if num_workers > 0 else None, generator=torch.Generator().manual_seed(seed))
    for batch in loader:
        yield {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _plain(x) -> torch.Tensor:
    # MetaTensor dispatches every op through __torch_function__: several times slower in a training step.
    return x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)
