"""Storage options (int8 per-channel, a subset of encoder levels, blosc compression) and the
background block writer: round trips through extract -> reader, verify, inspect."""

import shutil
import threading
import time

import numpy as np
import pytest
import torch
import zarr

from mfcache.cache.reader import Cache
from mfcache.cache.schema import dequantize, quantize
from mfcache.cache.verify import verify
from mfcache.cache.writer import BackgroundWriter
from mfcache.config import ExtractConfig
from mfcache.errors import MfcacheError
from mfcache.stages.extract import extract
from tests.helpers.cli import invoke


def cache(data, out, **options):
    extract(
        detector="demo",
        images=data / "train",
        annotations=data / "annotations" / "train.json",
        out=out,
        config=ExtractConfig(
            **{
                "topk": 10,
                "target_size": 8,
                "block_size": 3,
                "num_workers": 0,
                "device": "cpu",
                "c1": "store",
                **options,
            }
        ),  # the stored c1 is compared across dtypes
        progress=False,
    )
    assert verify(out).ok, verify(out).problems
    return Cache(out).split()


@pytest.fixture(scope="module")
def reference(shapes_data, tmp_path_factory):
    return cache(shapes_data, tmp_path_factory.mktemp("f32") / "cache", dtype="float32")


def relative_rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a.float() - b.float()) / torch.linalg.norm(a.float()))


def test_quantize_is_per_channel_symmetric():
    x = np.random.default_rng(0).normal(size=(500, 4)).astype(np.float32) * np.array([1e-3, 1, 100, 0])
    q, scale = quantize(x)
    assert q.dtype == np.int8 and scale.shape == (4,) and np.abs(q).max() == 127
    assert scale[3] == 1 and (q[:, 3] == 0).all()  # an all-zero channel stays exact
    err = np.sqrt(((dequantize(q, scale) - x) ** 2).mean(0)) / np.sqrt((x**2).mean(0)).clip(1e-12)
    assert (err[:3] < 0.02).all()  # tiny and huge channels alike


@pytest.fixture(scope="module")
def int8(shapes_data, tmp_path_factory):
    return cache(shapes_data, tmp_path_factory.mktemp("int8") / "cache", dtype="int8")


def test_int8_cache_reads_back_within_about_one_percent(int8, reference):
    split = int8
    assert split.group["memory"].dtype == np.int8 and split.group["scales/memory"].shape == (
        split.num_rows,
        split.group["memory"].shape[1],
    )
    for i in split.complete_rows[:3]:
        a, b = reference.read(int(i)), split.read(int(i))
        assert b.queries.dtype == torch.float32
        for key in ("queries", "c1"):
            assert relative_rmse(getattr(a, key), getattr(b, key)) < 0.02, key
        for x, y in zip(a.levels, b.levels):
            assert relative_rmse(x, y) < 0.02
        torch.testing.assert_close(a.boxes, b.boxes)
    stored = sum(split.group[k].nbytes for k in ("memory", "c1"))
    assert stored * 4 == sum(reference.group[k].nbytes for k in ("memory", "c1"))  # 1 byte vs 4


def test_int8_checksum_covers_the_scales(int8, tmp_path):
    shutil.copytree(int8.cache.path, tmp_path / "int8")
    scales = zarr.open_array(tmp_path / "int8" / "train" / "scales" / "memory", mode="r+")
    row = scales[1]
    row[0] *= 2
    scales[1] = row
    assert any("checksum mismatch" in p for p in verify(tmp_path / "int8").problems)


def test_level_subset_maps_head_levels_and_names_a_missing_one(shapes_data, reference, tmp_path):
    split = cache(shapes_data, tmp_path / "levels", dtype="float32", levels=(2, 0))
    assert Cache(tmp_path / "levels").extract["levels"] == [0, 2]
    assert split.group["memory"].shape[0] < reference.group["memory"].shape[0]
    a, b = reference.read(1, levels=(2, 0)), split.read(1, levels=(2, 0))
    assert all(torch.equal(x, y) for x, y in zip(a.levels, b.levels))
    with pytest.raises(MfcacheError, match=r"reads encoder levels \[1\].*stores only levels \[0, 2\]"):
        split.read(1, levels=(0, 1))
    with pytest.raises(MfcacheError, match="another"):  # a resume asking for other levels is refused
        cache(shapes_data, tmp_path / "levels", dtype="float32", levels=(0,))


def test_compressed_cache_equals_uncompressed(shapes_data, reference, tmp_path):
    split = cache(shapes_data, tmp_path / "zstd", dtype="float32", compress=True)
    assert split.group["memory"].compressors and not reference.group["memory"].compressors
    for i in (0, 4):
        a, b = reference.read(i), split.read(i)
        assert all(torch.equal(x, y) for x, y in zip(a.levels, b.levels)) and torch.equal(a.c1, b.c1)
    result = invoke("inspect", tmp_path / "zstd")
    assert result.exit_code == 0 and "compress=True" in result.output


def test_background_writer_overlaps_and_keeps_order():
    written, started = [], threading.Event()

    def slow_write(k):
        started.set()
        time.sleep(0.05)
        written.append(k)

    begin = time.perf_counter()
    with BackgroundWriter(slow_write, depth=2) as writer:
        for k in range(3):
            writer.submit(k)
        submitted = time.perf_counter() - begin
    assert submitted < 0.05 and written == [0, 1, 2]  # producer did not wait for the first write


def test_background_writer_surfaces_the_first_error_and_keeps_earlier_jobs():
    written = []

    def write(k):
        if k == 1:
            raise MfcacheError("disk full while writing images 3..5")
        written.append(k)

    with pytest.raises(MfcacheError, match="disk full"):
        with BackgroundWriter(write, depth=1) as writer:
            for k in range(5):
                writer.submit(k)
    assert written == [0]  # jobs after the failure are dropped, the one before it is kept
