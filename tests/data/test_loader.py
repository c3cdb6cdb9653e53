"""Batching: the global batch is the same on one process and split across several; the augmentation is the one
written out per image; evaluation covers every sample once."""
from __future__ import annotations

import pytest
import torch

from attnkit.data.loader import TensorLoader, pad_crop_flip


def images(n=40, c=2, h=6, w=5):
    return torch.randint(0, 256, (n, c, h, w), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def test_pad_crop_flip_matches_a_per_image_crop_and_mirror():
    x = images(6)
    offsets = torch.tensor([[0, 0], [8, 8], [3, 5], [4, 4], [8, 0], [1, 7]])
    flips = torch.tensor([False, True, True, False, False, True])
    out = pad_crop_flip(x, offsets, flips)
    for i in range(len(x)):
        padded = torch.zeros(2, 6 + 8, 5 + 8, dtype=x.dtype)
        padded[:, 4:10, 4:9] = x[i]
        crop = padded[:, offsets[i, 0]:offsets[i, 0] + 6, offsets[i, 1]:offsets[i, 1] + 5]
        assert torch.equal(out[i], crop.flip(-1) if flips[i] else crop)


@pytest.mark.parametrize("augment", ["none", "crop_flip"])
def test_ranks_split_exactly_the_single_process_batch(augment):
    x, y = images(), torch.arange(40)
    single = TensorLoader(x, y, batch_size=8, train=True, seed=3, augment=augment)
    ranks = [TensorLoader(x, y, batch_size=8, train=True, seed=3, rank=r, world_size=2, augment=augment) for r in (0, 1)]
    for loader in (single, *ranks):
        loader.set_epoch(2)
    assert len(single) == len(ranks[0]) == 5
    for whole, part0, part1 in zip(single, *ranks):
        assert torch.equal(whole[0], torch.cat([part0[0], part1[0]]))
        assert torch.equal(whole[1], torch.cat([part0[1], part1[1]]))


def test_order_depends_on_seed_and_epoch_only():
    x, y = images(), torch.arange(40)
    order = lambda seed, epoch: torch.cat([b[1] for b in _epoch(TensorLoader(x, y, batch_size=8, train=True, seed=seed), epoch)])  # noqa: E731
    assert torch.equal(order(1, 0), order(1, 0))
    assert not torch.equal(order(1, 0), order(1, 1)) and not torch.equal(order(1, 0), order(2, 0))
    assert sorted(order(1, 0).tolist()) == list(range(40))


def _epoch(loader, epoch):
    loader.set_epoch(epoch)
    return list(loader)


def test_evaluation_covers_every_sample_once_across_ranks():
    x, y = images(37), torch.arange(37)
    seen = [b[1] for r in range(3) for b in TensorLoader(x, y, batch_size=6, train=False, rank=r, world_size=3)]
    assert sorted(torch.cat(seen).tolist()) == list(range(37))


def test_normalisation_and_batch_errors():
    x = images()
    loader = TensorLoader(x, torch.arange(40), batch_size=8, train=False, mean=(0.5, 0.25), std=(0.5, 2.0))
    batch = next(iter(loader))[0]
    assert torch.allclose(batch[:, 1], (x[:8, 1].float() / 255 - 0.25) / 2.0)
    with pytest.raises(ValueError, match="multiple of the 3 processes, got 8"):
        TensorLoader(x, torch.arange(40), batch_size=8, train=True, world_size=3)
    with pytest.raises(ValueError, match="--batch-size 64 is larger than the 40 training images"):
        TensorLoader(x, torch.arange(40), batch_size=64, train=True)
