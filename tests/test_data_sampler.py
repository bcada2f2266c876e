"""Mixing proportions, determinism, rank sharding and mid-epoch resume of MixtureSampler; the
per-task splits and the preview sharding. No tokenizer needed except for the end-to-end test."""

import itertools
import json
from collections import Counter

import pytest

from thanora_ds.data import MixtureSampler, mixture_probabilities, preview_batches
from thanora_ds.data.splits import split_indices, split_sizes


def take(it, n):
    return list(itertools.islice(it, n))


@pytest.mark.parametrize(
    "sizes,kw,expected",
    [
        ([100, 400, 1600], dict(mixing="natural"), [100 / 2100, 400 / 2100, 1600 / 2100]),
        ([100, 400, 1600], dict(mixing="temperature", temperature=2.0), [1 / 7, 2 / 7, 4 / 7]),
        ([100, 400, 1600], dict(mixing="temperature", temperature=1e9), [1 / 3, 1 / 3, 1 / 3]),
        ([100, 400, 1600], dict(mixing="weights", weights=[2, 1, 1]), [0.5, 0.25, 0.25]),
    ],
)
def test_proportions_over_many_draws(sizes, kw, expected):
    s = MixtureSampler(sizes, seed=3, **kw)
    assert s.probabilities == pytest.approx(expected, abs=1e-6)
    draws = [t for _ in range(3) for t, _ in s]  # 3 epochs, 6300 draws
    freq = Counter(draws)
    for t, p in enumerate(expected):
        assert freq[t] / len(draws) == pytest.approx(p, abs=0.002)
    # interleaved, not in blocks: each window of 300 draws holds every task near its share
    for w in range(0, len(draws), 300):
        window = Counter(draws[w : w + 300])
        for t, p in enumerate(expected):
            assert abs(window[t] / 300 - p) < 0.1


def test_indices_are_valid_and_temperature_repeats_small_tasks():
    sizes = [10, 1000]
    s = MixtureSampler(sizes, mixing="temperature", temperature=2.0, seed=0)
    draws = list(s)
    assert all(0 <= i < sizes[t] for t, i in draws)
    small = [i for t, i in draws if t == 0]
    assert len(small) > 10 and set(small) == set(range(10))  # oversampled: every example, repeated
    # within one pass of a task's stream no example repeats
    assert len(set(small[:10])) == 10


def test_same_seed_same_order_other_seed_other_order():
    a = list(MixtureSampler([30, 50, 20], mixing="temperature", seed=7))
    b = list(MixtureSampler([30, 50, 20], mixing="temperature", seed=7))
    c = list(MixtureSampler([30, 50, 20], mixing="temperature", seed=8))
    assert a == b and a != c
    s = MixtureSampler([30, 50, 20], seed=7)
    e0, e1 = list(s), list(s)  # consecutive epochs differ in order
    assert e0 != e1 and sorted(e0) == sorted(e1)


def test_natural_epoch_is_every_example_once():
    sizes = [30, 50, 20]
    draws = list(MixtureSampler(sizes, seed=1))
    assert sorted(draws) == [(t, i) for t, n in enumerate(sizes) for i in range(n)]


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_disjoint_and_cover_the_epoch(world_size):
    sizes = [30, 50, 20]  # 100 examples: divisible by 2 and 4
    per_rank = [list(MixtureSampler(sizes, seed=5, rank=r, world_size=world_size)) for r in range(world_size)]
    assert len({len(p) for p in per_rank}) == 1
    union = [d for p in per_rank for d in p]
    assert len(set(union)) == len(union) == 100  # disjoint
    assert sorted(union) == [(t, i) for t, n in enumerate(sizes) for i in range(n)]  # cover
    # rank r's draws are the single-process sequence's positions r, r+W, ...
    whole = MixtureSampler(sizes, seed=5).epoch_sequence(0)
    for r, p in enumerate(per_rank):
        assert p == whole[r::world_size]


def test_uneven_world_size_gives_equal_lengths():
    sizes = [30, 50, 21]  # 101 draws over 2 ranks: padded to 102, one example seen twice
    per_rank = [list(MixtureSampler(sizes, seed=5, rank=r, world_size=2)) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 51
    union = per_rank[0] + per_rank[1]
    assert set(union) == {(t, i) for t, n in enumerate(sizes) for i in range(n)}


@pytest.mark.parametrize("stop_at", [0, 7, 33, 50, 63])  # 50 = exactly one epoch (epoch = 50 per rank)
@pytest.mark.parametrize("mixing", ["natural", "temperature"])
def test_resume_mid_epoch_gives_same_next_batches(stop_at, mixing):
    sizes, ws = [30, 50, 20], 2
    for rank in range(ws):
        ref = MixtureSampler(sizes, mixing, seed=11, rank=rank, world_size=ws)
        uninterrupted = [d for _ in range(3) for d in ref]  # 3 epochs

        first = MixtureSampler(sizes, mixing, seed=11, rank=rank, world_size=ws)
        stream = itertools.chain.from_iterable(first for _ in range(3))
        seen = take(stream, stop_at)
        state = json.loads(json.dumps(first.state_dict()))  # plain JSON round trip

        resumed = MixtureSampler(sizes, mixing, seed=11, rank=rank, world_size=ws)
        resumed.load_state_dict(state)
        rest = []
        while len(seen) + len(rest) < len(uninterrupted):
            rest += list(resumed)
        assert seen + rest[: len(uninterrupted) - len(seen)] == uninterrupted


def test_state_from_another_mixture_is_refused():
    s = MixtureSampler([30, 50], seed=1)
    take(iter(s), 5)
    with pytest.raises(ValueError, match="seed"):
        MixtureSampler([30, 50], seed=2).load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="task_sizes"):
        MixtureSampler([30, 51], seed=1).load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="counts"):
        MixtureSampler([30, 50], "temperature", seed=1).load_state_dict(s.state_dict())


def test_bad_mixture_arguments():
    with pytest.raises(ValueError, match="one weight per task"):
        mixture_probabilities([1, 2], "weights", weights=[1])
    with pytest.raises(ValueError, match="no training examples"):
        mixture_probabilities([0, 2], "weights", weights=[1, 1])
    with pytest.raises(ValueError, match="rank"):
        MixtureSampler([3], rank=1, world_size=1)


def test_splits_disjoint_deterministic_and_capped():
    for n in (0, 1, 3, 10, 100, 1000):
        tr, pv, ev = split_indices(n, "qa", 0, preview_samples=128, eval_samples=32)
        assert sorted(tr + pv + ev) == list(range(n))  # disjoint, complete
        assert (len(tr), len(pv), len(ev)) == split_sizes(n, 128, 32)
        assert n == 0 or len(tr) >= 1
        assert split_indices(n, "qa", 0, 128, 32) == (tr, pv, ev)
    assert split_sizes(1000, 128, 32) == (840, 128, 32)
    assert split_indices(100, "qa", 0, 8, 8) != split_indices(100, "qa", 1, 8, 8)
    assert split_indices(100, "qa", 0, 8, 8) != split_indices(100, "vqa", 0, 8, 8)


class _FakeData:
    """Just what preview_batches reads: preview splits and a pad id."""

    pad_token_id = 0

    def __init__(self, n):
        self.preview = {"t": [{"input_ids": [1, 2, i + 3], "labels": [-100, 2, i + 3], "task_id": 0, "id": str(i)} for i in range(n)]}


@pytest.mark.parametrize("n,world_size,batch_size", [(10, 1, 4), (10, 2, 4), (11, 3, 2), (2, 4, 3)])
def test_preview_batches_shard_once_over_ranks(n, world_size, batch_size):
    data = _FakeData(n)
    seen = []
    for r in range(world_size):
        for b in preview_batches(data, "t", batch_size, r, world_size):
            assert b["input_ids"].shape[0] <= batch_size
            seen += b["input_ids"][:, 2].tolist()
    assert sorted(seen) == [i + 3 for i in range(n)]


def test_end_to_end_resume_yields_same_batches(tmp_path):
    """Build real data, train-batch through make_sampler + collate, stop, resume from the JSON
    state in a fresh process-like setup: the next batches are the ones never stopping gives."""
    import torch

    from thanora_ds.data import DataConfig, SourceConfig, build_multitask_data, collate_batch
    from tiny_assets import make_llama_tokenizer

    tok = make_llama_tokenizer(tmp_path / "tok")
    rows = [{"prompt": f"Add {i} and {j}.", "response": str(i + j), "task": "add"} for i in range(6) for j in range(4)]
    rows += [{"prompt": f"Say {w}.", "response": w, "task": "say"} for w in ("yes", "no", "maybe", "cat", "chat") * 2]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(sources=[SourceConfig(str(tmp_path / "d.jsonl"))], preview_samples=2, eval_samples=2,
                     mixing="temperature", seed=4)
    data = build_multitask_data(cfg, tokenizer=tok)

    def batches(sampler, n, bs=3):
        it = itertools.chain.from_iterable(sampler for _ in range(100))
        out = []
        for _ in range(n):
            out.append(collate_batch([data.train_example(t, i) for t, i in take(it, bs)], data.pad_token_id))
        return out

    ref = batches(data.make_sampler(rank=1, world_size=2), 12)
    s = data.make_sampler(rank=1, world_size=2)
    head = batches(s, 5)
    state = json.loads(json.dumps(s.state_dict()))
    s2 = data.make_sampler(rank=1, world_size=2)
    s2.load_state_dict(state)
    tail = batches(s2, 7)
    for a, b in zip(ref, head + tail):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
