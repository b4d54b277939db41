"""ClassPrior: accumulation, epoch mixing, unseen classes, EMA mode, state, and DDP agreement."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_port

from advgkl.methods.priors import ClassPrior


def direct_prior(logits, y, classes, temperature):
    """Per class: the mean of softmax(logits / T) over its samples (the normalized sum)."""
    p = torch.softmax(logits.double() / temperature, 1)
    rows = torch.stack([p[y == c].sum(0) for c in range(classes)])
    return rows / rows.sum(1, keepdim=True)


def test_starts_uniform_and_rows_pick_true_classes():
    prior = ClassPrior(4)
    assert torch.equal(prior.prior, torch.full((4, 4), 0.25))
    prior.prior = torch.arange(16.0).view(4, 4)
    assert torch.equal(prior.rows(torch.tensor([2, 0])), torch.tensor([[8.0, 9, 10, 11],
                                                                         [0.0, 1, 2, 3]]))


def test_epoch_end_replaces_with_class_means_at_momentum_1():
    torch.manual_seed(0)
    logits, y = torch.randn(40, 5), torch.arange(40) % 5
    prior = ClassPrior(5, temperature=4.0)
    for chunk in range(4):  # several batches accumulate
        prior.update(logits[chunk * 10:(chunk + 1) * 10], y[chunk * 10:(chunk + 1) * 10])
    assert torch.equal(prior.prior, torch.full((5, 5), 0.2))  # unchanged until the epoch ends
    prior.end_epoch()
    torch.testing.assert_close(prior.prior, direct_prior(logits, y, 5, 4.0).float())
    torch.testing.assert_close(prior.prior.sum(1), torch.ones(5))


def test_momentum_mixes_and_unseen_class_keeps_its_row():
    logits, y = torch.randn(6, 3), torch.tensor([0, 0, 1, 1, 0, 1])  # class 2 unseen
    prior = ClassPrior(3, momentum=0.25)
    old = prior.prior.clone()
    prior.update(logits, y)
    prior.end_epoch()
    fresh = direct_prior(logits, y, 3, 1.0).float()
    torch.testing.assert_close(prior.prior[:2], 0.25 * fresh[:2] + 0.75 * old[:2])
    assert torch.equal(prior.prior[2], old[2])
    assert torch.isfinite(prior.prior).all()


def test_epoch_sums_start_fresh_each_epoch():
    prior = ClassPrior(3)
    prior.update(torch.tensor([[5.0, 0, 0]]), torch.tensor([0]))
    prior.end_epoch()
    prior.update(torch.tensor([[0.0, 5, 0]]), torch.tensor([0]))
    prior.end_epoch()
    torch.testing.assert_close(prior.prior[0], torch.softmax(torch.tensor([0.0, 5, 0]), 0))


def test_ema_mode_mixes_every_batch():
    logits, y = torch.randn(8, 4), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    prior = ClassPrior(4, momentum=0.1, mode="ema")
    expected = prior.prior.clone()
    for half in (slice(0, 4), slice(4, 8)):
        prior.update(logits[half], y[half])
        expected = 0.1 * direct_prior(logits[half], y[half], 4, 1.0).float() + 0.9 * expected
    torch.testing.assert_close(prior.prior, expected)


def test_state_dict_round_trip_mid_epoch():
    prior = ClassPrior(3, temperature=2.0)
    prior.update(torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1]))
    other = ClassPrior(3)
    other.load_state_dict(prior.state_dict())
    prior.end_epoch()
    other.end_epoch()
    assert torch.equal(prior.prior, other.prior) and other.temperature == 2.0


def test_update_does_not_track_gradients():
    logits = torch.randn(4, 3, requires_grad=True)
    prior = ClassPrior(3)
    prior.update(logits, torch.tensor([0, 1, 2, 0]))
    prior.end_epoch()
    assert not prior.prior.requires_grad


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_classes=1), "num_classes"), (dict(num_classes=3, mode="x"), "mode"),
    (dict(num_classes=3, momentum=0), "momentum"), (dict(num_classes=3, temperature=0), "temperature"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ClassPrior(**kwargs)


def test_bad_update_and_state_shapes():
    prior = ClassPrior(3)
    with pytest.raises(ValueError, match="logits_nat: expected shape \\(2, 3\\)"):
        prior.update(torch.randn(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="num_classes = 3"):
        prior.load_state_dict(ClassPrior(4).state_dict())


def _ddp_worker(rank, world, port, mode, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(100 + rank)  # each rank sees different data
        prior = ClassPrior(4, temperature=2.0, momentum=0.5, mode=mode)
        for _ in range(3):
            prior.update(torch.randn(6, 4, generator=g), torch.randint(0, 4, (6,), generator=g))
        prior.end_epoch()
        out[rank] = prior.prior.clone()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["epoch", "ema"])
def test_ranks_hold_the_prior_of_all_their_data(mode):
    out = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, free_port(), mode, out), nprocs=2, join=True)
    assert torch.equal(out[0], out[1])
    # The same prior as one process seeing both ranks' batches, batch by batch in rank order.
    single = ClassPrior(4, temperature=2.0, momentum=0.5, mode=mode)
    gens = [torch.Generator().manual_seed(100 + r) for r in range(2)]
    batches = [[(torch.randn(6, 4, generator=g), torch.randint(0, 4, (6,), generator=g))
                for _ in range(3)] for g in gens]
    for step in range(3):
        logits = torch.cat([batches[r][step][0] for r in range(2)])
        labels = torch.cat([batches[r][step][1] for r in range(2)])
        single.update(logits, labels)
    single.end_epoch()
    torch.testing.assert_close(out[0], single.prior)
