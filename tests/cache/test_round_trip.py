"""The cache stores exactly what it is given, image by image, ragged memory included."""

import dataclasses

import numpy as np
import pytest
import torch

from mfcache.cache.reader import Cache, CacheDataset
from mfcache.cache.records import ImageRecord
from mfcache.cache.sample import Batch
from mfcache.cache.schema import fingerprint, plan_split
from mfcache.cache.writer import BlockWriter, create_split, open_root
from mfcache.detectors.base import DetectorInfo, Preprocess
from mfcache.errors import MfcacheError

K, D, C, S = 5, 8, 4, 16


def info(weights="abc"):
    return DetectorInfo(
        spec="test",
        family="fake",
        d_model=D,
        num_queries=10,
        label_names=("a", "b"),
        strides=(8, 16, 32, 64),
        c1_channels=C,
        sigmoid=True,
        weights_sha256=weights,
        preprocess=Preprocess(shortest_edge=64, longest_edge=128),
    )


def make_cache(path, sizes, block=2, weights="abc"):
    det = info(weights)
    fp = fingerprint(det, topk=K, target_size=S, c1="store", dtype="float16")
    root = open_root(path, fp)
    plan = plan_split(list(range(100, 100 + len(sizes))), sizes, det, chunk_tokens=32)
    meta = {
        "annotations_sha256": "x",
        "annotation_file": "a.json",
        "images_dir": ".",
        "label_to_category": [1, 2],
        "category_names": {"1": "a", "2": "b"},
    }
    group = create_split(
        root,
        "train",
        plan,
        meta=meta,
        annotations=b'{"images": [], "annotations": [], "categories": []}',
        topk=K,
        d_model=D,
        c1_channels=C,
        target_size=S,
        block_size=block,
        dtype="float16",
    )
    rng = np.random.default_rng(0)
    records = []
    for i in range(len(sizes)):
        tokens = int(plan.level_hw[i].prod(-1).sum())
        h4, w4 = (-(-plan.input_hw[i] // 4)).tolist()
        records.append(
            ImageRecord(
                queries=rng.standard_normal((K, D)).astype(np.float16),
                boxes=rng.uniform(0, 60, (K, 4)).astype(np.float32),
                scores=rng.uniform(size=K).astype(np.float32),
                labels=rng.integers(0, 2, K).astype(np.int32),
                query_index=rng.integers(0, 10, K).astype(np.int32),
                gt_id=rng.integers(-1, 5, K).astype(np.int64),
                gt_iou=rng.uniform(size=K).astype(np.float32),
                target_masks=np.packbits(rng.integers(0, 2, (K, S * S)).astype(bool), axis=-1),
                memory=rng.standard_normal((tokens, D)).astype(np.float16),
                c1=rng.standard_normal((h4 * w4, C)).astype(np.float16),
            )
        )
    return group, plan, records


SIZES = [(64, 96), (80, 64), (64, 64), (100, 70), (64, 120)]


def test_round_trip_is_exact_per_image(tmp_path):
    group, plan, records = make_cache(tmp_path / "c", SIZES)
    writer = BlockWriter(group)
    for start in range(0, len(records), 2):
        writer.write(start, records[start : start + 2])
    split = Cache(tmp_path / "c").split()
    assert len(split.complete_rows) == len(SIZES)
    for i, rec in enumerate(records):
        got = split.read(i)
        np.testing.assert_array_equal(got.queries.numpy(), rec.queries)
        np.testing.assert_array_equal(got.boxes.numpy(), rec.boxes)
        np.testing.assert_array_equal(got.gt_id.numpy(), rec.gt_id)
        np.testing.assert_array_equal(np.packbits(got.target_masks.numpy().reshape(K, -1), axis=-1), rec.target_masks)
        flat = torch.cat([lvl.permute(1, 2, 0).reshape(-1, D) for lvl in got.levels]).numpy()
        np.testing.assert_array_equal(flat, rec.memory)
        for lvl, (h, w) in zip(got.levels, plan.level_hw[i]):
            assert lvl.shape == (D, h, w)
        np.testing.assert_array_equal(got.c1.permute(1, 2, 0).reshape(-1, C).numpy(), rec.c1)
        assert got.image_id == 100 + i
        # only the requested levels are returned, with the same values
        only = split.read(i, levels=(2,), c1=False, targets=False)
        assert len(only.levels) == 1 and torch.equal(only.levels[0], got.levels[2])
        assert only.c1 is None and only.gt_id is None and only.target_masks is None
    # a batch read in one go (DataLoader's __getitems__) is the same as image by image
    batch = CacheDataset(tmp_path / "c", "train", levels=None, c1=True, targets=True).__getitems__([3, 0, 2])
    for got, i in zip(batch, (3, 0, 2)):
        alone = split.read(i)
        for field in dataclasses.fields(got):
            value, expected = getattr(got, field.name), getattr(alone, field.name)
            values = zip(value, expected) if field.name == "levels" else [(value, expected)]
            assert all(torch.equal(a, b) if torch.is_tensor(a) else a == b for a, b in values), field.name


def test_images_start_on_chunk_boundaries(tmp_path):
    _, plan, _ = make_cache(tmp_path / "c", SIZES)
    assert (plan.token_offset % plan.chunk_tokens == 0).all()
    assert (plan.c1_offset % plan.c1_chunk == 0).all()
    tokens = plan.level_hw.prod(-1).sum(-1)
    assert (np.diff(plan.token_offset) >= tokens).all()


def test_unfinished_blocks_read_as_not_done(tmp_path):
    group, _, records = make_cache(tmp_path / "c", SIZES)
    BlockWriter(group).write(2, records[2:4])
    split = Cache(tmp_path / "c").split()
    assert split.complete_rows.tolist() == [2, 3]
    with pytest.raises(MfcacheError, match="incomplete"):
        split.require_complete()
    assert len(CacheDataset(tmp_path / "c", "train", levels=None, c1=True, targets=True)) == 2


def test_another_detector_is_refused(tmp_path):
    make_cache(tmp_path / "c", SIZES)
    other = fingerprint(info("other-weights"), topk=K, target_size=S, c1="store", dtype="float16")
    with pytest.raises(MfcacheError, match="another detector"):
        open_root(tmp_path / "c", other)


def test_collate_pads_to_the_batch(tmp_path):
    """Two images of different sizes in one batch: maps padded to the larger height and width with
    zeros, each image's values (queries, boxes, targets, level-0 memory, C1) exactly those written."""
    group, plan, records = make_cache(tmp_path / "c", SIZES)
    BlockWriter(group).write(0, records[:2])
    ds = CacheDataset(tmp_path / "c", "train", levels=(0,), c1=True, targets=True)
    batch = Batch.collate([ds[0], ds[1]])
    assert batch.queries.shape == (2, K, D) and batch.queries.dtype == torch.float32
    assert batch.levels[0].shape == (2, D, 10, 12)  # ceil(80/8), ceil(96/8)
    assert batch.c1.shape == (2, C, 20, 24)
    assert batch.target_masks.shape == (2, K, S, S)
    for b, record in enumerate(records[:2]):
        assert torch.equal(batch.queries[b], torch.from_numpy(record.queries.astype(np.float32)))
        assert torch.equal(batch.boxes[b], torch.from_numpy(record.boxes))
        targets = np.unpackbits(record.target_masks, axis=-1)[:, : S * S].reshape(K, S, S)
        assert torch.equal(batch.target_masks[b].bool(), torch.from_numpy(targets.astype(bool)))
        h, w = plan.level_hw[b][0].tolist()  # level 0's tokens come first in memory, row-major
        level = torch.from_numpy(record.memory[: h * w].astype(np.float32)).T.reshape(D, h, w)
        h4, w4 = (-(-plan.input_hw[b] // 4)).tolist()
        c1 = torch.from_numpy(record.c1.astype(np.float32)).T.reshape(C, h4, w4)
        for name, got, want in (("level 0", batch.levels[0][b], level), ("c1", batch.c1[b], c1)):
            assert torch.equal(got[:, : want.shape[1], : want.shape[2]], want), (b, name)
            assert not got[:, want.shape[1] :].any() and not got[:, :, want.shape[2] :].any(), (b, name)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_collated_maps_hold_each_image_and_zero_padding(tmp_path, num_workers):
    group, _, records = make_cache(tmp_path / "c", SIZES)
    BlockWriter(group).write(0, records[:2])
    BlockWriter(group).write(2, records[2:4])
    ds = CacheDataset(tmp_path / "c", "train", levels=(0, 1), c1=True, targets=False)
    torch.full((1 << 16,), 7.0).sum()  # leave non-zero memory around for the allocator to hand back
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=Batch.collate, num_workers=num_workers)
    batch = next(iter(loader))
    for b in range(4):
        image = ds[b]
        for name, got, want in [("c1", batch.c1[b], image.c1)] + [
            ("level", batch.levels[l][b], image.levels[l]) for l in range(2)
        ]:
            h, w = want.shape[1:]
            assert torch.equal(got[:, :h, :w], want), name
            assert not got[:, h:].any() and not got[:, :, w:].any(), name


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
@pytest.mark.parametrize("store_c1", [True, False])
def test_as_served_equals_the_record_written_and_served(dtype, store_c1):
    """``predict`` serves the detector's outputs at the cache's precision without a record
    (``as_served``); that is bit for bit what a record written and served back holds."""
    from mfcache.cache.records import as_served, image_record, served_sample
    from mfcache.cache.sample import Sample

    gen = torch.Generator().manual_seed(0)
    level_hw = np.array([[12, 10], [6, 5], [3, 3], [2, 2]])
    sample = Sample(
        image_id=7,
        queries=torch.randn(K, D, generator=gen) * 3,
        boxes=torch.rand(K, 4, generator=gen) * 40,
        scores=torch.rand(K, generator=gen),
        labels=torch.randint(0, 2, (K,), generator=gen),
        query_index=torch.randperm(10, generator=gen)[:K],
        levels=[torch.randn(D, h, w, generator=gen) * (l + 1) for l, (h, w) in enumerate(level_hw)],
        input_hw=torch.tensor([96, 80]),
        orig_hw=torch.tensor([48, 40]),
        c1=torch.randn(C, 24, 20, generator=gen),
    )
    stored, wanted = [0, 1, 3], [0, 2]  # levels kept in the cache; the head reads the 1st and 3rd of them
    record = image_record(
        dataclasses.replace(sample, c1=sample.c1 if store_c1 else None),
        gt=None,
        target_size=S,
        dtype=dtype,
        levels=stored,
    )
    read = served_sample(
        record, image_id=7, input_hw=(96, 80), orig_hw=(48, 40), level_hw=level_hw[stored], wanted=wanted
    )
    served = as_served(sample, dtype=dtype, levels=stored, wanted=wanted, store_c1=store_c1)
    for name in ("queries", "boxes", "scores", "labels", "query_index", "input_hw", "orig_hw"):
        a, b = getattr(served, name), getattr(read, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert len(served.levels) == len(read.levels) == 2
    for a, b in zip(served.levels, read.levels):
        assert a.dtype == b.dtype and torch.equal(a, b)
    if store_c1:
        assert served.c1.dtype == read.c1.dtype and torch.equal(served.c1, read.c1)
    else:  # a recomputed C1 is served at float32 by the reader's stem, not from the record
        assert read.c1 is None and served.c1.dtype == torch.float32 and torch.equal(served.c1, sample.c1)
    if dtype != "float32":  # and the rounding is real: the served values are not the computed ones
        assert not torch.equal(served.levels[0].float(), sample.levels[0])
