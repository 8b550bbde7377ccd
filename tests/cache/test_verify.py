"""`mfcache verify` passes a healthy cache and names every kind of damage."""

import shutil

import numpy as np
import pytest
import zarr

from mfcache.cache.verify import verify
from mfcache.config import ExtractConfig
from mfcache.data.shapes import write_shapes_dataset
from mfcache.stages.extract import extract
from tests.helpers.cli import invoke

CONFIG = ExtractConfig(topk=10, target_size=8, block_size=2, num_workers=0, device="cpu", c1="store")  # c1 checked too


@pytest.fixture(scope="module")
def healthy(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    write_shapes_dataset(root / "d", num_train=5, num_val=0, seed=2, min_size=64, max_size=96)
    extract(
        detector="demo",
        images=root / "d" / "train",
        annotations=root / "d" / "annotations" / "train.json",
        out=root / "cache",
        config=CONFIG,
        progress=False,
    )
    return root / "cache"


@pytest.fixture
def cache(healthy, tmp_path):
    shutil.copytree(healthy, tmp_path / "cache")
    return tmp_path / "cache"


def problems(path):
    report = verify(path)
    assert not report.ok
    return "\n".join(report.problems)


def test_healthy_cache_passes_with_a_summary(healthy):
    report = verify(healthy)
    assert report.ok, report.problems
    (split,) = report.splits
    assert (split.num_rows, split.written, split.skipped, split.pending) == (5, 5, 0, 0)
    result = invoke("verify", healthy)
    assert result.exit_code == 0 and "OK" in result.output


def test_truncated_chunk_file(cache):
    chunk = cache / "train" / "memory" / "c" / "1" / "0"
    chunk.write_bytes(chunk.read_bytes()[:100])
    assert "memory rows" in problems(cache) and "unreadable chunk" in problems(cache)


def test_missing_chunk_file(cache):
    (cache / "train" / "queries" / "c" / "1" / "0" / "0").unlink()
    assert "train/queries: chunk file c/1/0/0 is missing" in problems(cache)


def test_flipped_bytes_are_caught_by_the_checksum(cache):
    image_id = int(zarr.open_array(cache / "train" / "index" / "image_id")[3])
    offset = int(zarr.open_array(cache / "train" / "index" / "token_offset")[3])
    chunk_rows = zarr.open_array(cache / "train" / "memory").chunks[0]
    chunk = cache / "train" / "memory" / "c" / str(offset // chunk_rows) / "0"
    data = bytearray(chunk.read_bytes())
    data[10] ^= 0x10  # zarr reads this back without complaint: the data is uncompressed
    chunk.write_bytes(bytes(data))
    text = problems(cache)
    assert f"image id {image_id} (position 3): checksum mismatch" in text


def test_non_finite_values(cache):
    boxes = zarr.open_array(cache / "train" / "boxes", mode="r+")
    boxes[1, 0, 0] = np.nan
    text = problems(cache)
    assert "boxes rows 0..1: 1 non-finite values" in text and "position 1): checksum mismatch" in text


def test_index_and_array_length_mismatch(cache):
    scores = zarr.open_array(cache / "train" / "scores", mode="r+")
    scores.resize((4, scores.shape[1]))
    assert "scores has shape (4, 10), expected (5, 10) (index/array length mismatch)" in problems(cache)


def test_bad_offsets_and_flags(cache):
    offsets = zarr.open_array(cache / "train" / "index" / "token_offset", mode="r+")
    offsets[2] = offsets[2] + 1
    zarr.open_array(cache / "train" / "index" / "done", mode="r+")[4] = 7
    text = problems(cache)
    assert "index/token_offset not chunk aligned at image ids" in text
    assert "index/done has invalid values" in text


def test_malformed_fingerprint_and_cli_report(cache):
    root = zarr.open_group(cache, mode="r+")
    fp = dict(root.attrs["mfcache"])
    del fp["extract"]
    root.attrs["mfcache"] = fp
    assert "fingerprint lacks extract" in problems(cache)
    result = invoke("verify", cache)
    assert result.exit_code == 1 and "damaged" in result.output and "fingerprint lacks extract" in result.output
