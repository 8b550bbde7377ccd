"""Nothing read that was not written, and one writer per cache.

Damaged caches (a deleted, flipped or truncated chunk, unreadable metadata) are refused by
train, eval and verify with one line naming the split, the array and the image; a missing
chunk never reads as zeros. A second extract into a cache is refused at once, naming the
process holding it; a killed holder leaves no stale lock."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import torch
import zarr

from mfcache.cache.lock import LOCK_NAME, acquire
from mfcache.cache.reader import Cache
from mfcache.cache.report import describe
from mfcache.cache.schema import checksum
from mfcache.cache.verify import verify
from mfcache.config import ExtractConfig
from mfcache.data.shapes import write_shapes_dataset
from mfcache.errors import MfcacheError
from mfcache.stages.extract import extract
from tests.helpers.caches import extract_splits
from tests.helpers.cli import invoke

# C1 stored (not the demo's --c1 auto = recompute): the stored c1 array is among what these tests damage
CONFIG = ExtractConfig(topk=10, target_size=8, block_size=2, num_workers=0, device="cpu", c1="store")
EXTRACT_ARGS = [
    "--topk",
    "10",
    "--target-size",
    "8",
    "--block-size",
    "2",
    "--workers",
    "0",
    "--device",
    "cpu",
    "--c1",
    "store",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity")
    write_shapes_dataset(root / "d", num_train=5, num_val=3, seed=2, min_size=64, max_size=96)
    return root


@pytest.fixture(scope="module")
def healthy(data):
    return extract_splits(data / "d", data / "cache", CONFIG)


@pytest.fixture(scope="module")
def run(healthy, data):
    result = invoke(
        "train",
        "--cache",
        healthy,
        "--out",
        data / "run",
        "--set",
        "train.steps=2",
        "--set",
        "train.batch_size=2",
        "-q",
    )
    assert result.exit_code == 0, result.output
    return data / "run"


@pytest.fixture
def cache(healthy, tmp_path):
    shutil.copytree(healthy, tmp_path / "cache")
    return tmp_path / "cache"


def memory_chunk(cache, split, position):
    offset = int(zarr.open_array(cache / split / "index" / "token_offset")[position])
    rows = zarr.open_array(cache / split / "memory").chunks[0]
    return cache / split / "memory" / "c" / str(offset // rows) / "0"


def image_id(cache, split, position):
    return int(zarr.open_array(cache / split / "index" / "image_id")[position])


def delete(path):
    path.unlink()


def flip(path):
    data = bytearray(path.read_bytes())
    data[10] ^= 0x10  # uncompressed: zarr reads it back without complaint
    path.write_bytes(bytes(data))


def truncate(path):
    path.write_bytes(path.read_bytes()[:100])


DAMAGE = {
    "deleted": (delete, "is missing"),
    "flipped": (flip, "checksum mismatch"),
    "truncated": (truncate, "unreadable"),
}


def the_error_line(output: str) -> str:
    """The one ``error:`` line of ``output`` (a command's, other lines allowed), no traceback."""
    lines = [line for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in output, output
    return errors[0]


@pytest.mark.parametrize("kind", DAMAGE)
def test_train_and_eval_refuse_a_damaged_chunk(cache, run, tmp_path, kind):
    damage, what = DAMAGE[kind]
    for split in ("train", "val"):
        damage(memory_chunk(cache, split, 0))
    result = invoke(
        "train",
        "--cache",
        cache,
        "--out",
        tmp_path / "run",
        "--set",
        "train.steps=2",
        "--set",
        "train.batch_size=2",
        "-q",
    )
    assert result.exit_code == 1
    line = the_error_line(result.output)  # read in a DataLoader worker (train.num_workers=2)
    assert "split 'train'" in line and "array memory" in line and what in line
    assert f"image id {image_id(cache, 'train', 0)} " in line

    result = invoke("eval", "--cache", cache, "--run", run, "--out", tmp_path / "metrics.json", "-q")
    assert result.exit_code == 1
    line = the_error_line(result.output)
    assert "split 'val'" in line and "array memory" in line and what in line
    assert f"image id {image_id(cache, 'val', 0)} " in line
    assert not (tmp_path / "metrics.json").exists()


def test_corrupt_metadata_is_one_line_everywhere(cache, run, tmp_path):
    (cache / "val" / "memory" / "zarr.json").write_text('{"zarr_format": 3, "node_ty')
    (cache / "train" / "queries" / "zarr.json").write_text("{")
    result = invoke("eval", "--cache", cache, "--run", run, "--out", tmp_path / "metrics.json", "-q")
    line = the_error_line(result.output)
    assert result.exit_code == 1
    assert "split 'val'" in line and "array memory" in line and "not valid JSON" in line and "image id" in line
    result = invoke("train", "--cache", cache, "--out", tmp_path / "run", "--set", "train.steps=2", "-q")
    line = the_error_line(result.output)
    assert result.exit_code == 1 and "split 'train'" in line and "array queries" in line and "image id" in line

    result = invoke("inspect", cache)
    assert result.exit_code == 1 and "Traceback" not in result.output
    text = " ".join(result.output.split())  # rich may wrap the one message
    assert text.count("error:") == 1 and "unreadable array metadata" in text, text  # after what it could show

    report = verify(cache)
    text = "\n".join(report.problems)
    assert "split val: array memory: metadata memory/zarr.json is not valid JSON" in text
    assert "split train: array queries: metadata queries/zarr.json is not valid JSON" in text
    (cache / "train" / "zarr.json").write_text("not json")
    assert "split train: group metadata train/zarr.json is not valid JSON" in "\n".join(verify(cache).problems)


def test_describe_is_plain_data_and_stops_at_damage(cache):
    """What `inspect` prints, as data (JSON-ready); damage ends it with the one-line error,
    after what could be gathered."""
    report = describe(cache)
    assert "error" not in report and [s["name"] for s in report["splits"]] == ["train", "val"]
    train = report["splits"][0]
    assert train["complete"] == train["rows"] == 5 and train["targets"]["source"] == "recorded at extraction"
    assert {"memory", "index/done"} <= {a["path"] for a in train["arrays"]}
    assert train["stored_bytes"] == sum(a["stored"] for a in train["arrays"]) > 0
    assert json.loads(json.dumps(report))["extract"]["topk"] == 10
    (cache / "val" / "queries" / "zarr.json").write_text("{")
    damaged = describe(cache)
    assert "unreadable array metadata" in damaged["error"] and "split 'val'" in damaged["error"]
    assert damaged["splits"][0] == train and "arrays" not in damaged["splits"][1]
    result = invoke("verify", cache)
    assert result.exit_code == 1 and "Traceback" not in result.output
    (cache / "zarr.json").write_text("not json")
    result = invoke("verify", cache)
    assert result.exit_code == 1 and "cannot open cache" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("kind", DAMAGE)
def test_verify_names_split_array_and_image(cache, kind):
    damage, _ = DAMAGE[kind]
    damage(memory_chunk(cache, "val", 1))
    text = "\n".join(verify(cache).problems)
    assert text.startswith("split val: ")
    if kind == "flipped":
        assert f"image id {image_id(cache, 'val', 1)} (position 1): checksum mismatch in memory[0]" in text
    else:
        assert "val/memory" in text or "memory rows" in text


def test_a_missing_chunk_never_reads_as_zeros(cache):
    """Where the stored values really are zeros, the checksum of a chunk read as its fill
    value would match: the store itself must refuse the missing chunk."""
    column = list(Cache(cache).split("train").part).index("targets/gt_iou")
    # block 0's gt_iou all zeros with matching checksums, as images with no GT overlap have
    gt_iou = zarr.open_array(cache / "train" / "targets" / "gt_iou", mode="r+").with_config(
        {"write_empty_chunks": True}
    )
    gt_iou[:2] = 0
    checksums = zarr.open_array(cache / "train" / "index" / "checksum", mode="r+")
    for i in range(2):
        row = checksums[i]
        row[column] = checksum(np.zeros(gt_iou.shape[1:], np.float32))
        checksums[i] = row
    assert not Cache(cache).split("train").read(0).gt_iou.any()  # healthy, and zero
    (cache / "train" / "targets" / "gt_iou" / "c" / "0" / "0").unlink()
    with pytest.raises(
        MfcacheError,
        match=r"array targets/gt_iou of image id \d+ \(position 0\): chunk file "
        r"train/targets/gt_iou/c/0/0 is missing",
    ):
        Cache(cache).split("train").read(0)


def test_the_checksum_is_zlibs_crc32():
    """Whichever implementation runs (zlib, or ISA-L's faster one), the values are zlib's."""
    values = np.random.default_rng(0).standard_normal((300, 7)).astype(np.float16)
    assert checksum(values) == zlib.crc32(values.tobytes())
    assert checksum(values[:, 2]) == zlib.crc32(values[:, 2].tobytes())  # non-contiguous: copied


def test_int8_scales_are_checked(data, tmp_path):
    out = tmp_path / "int8"
    extract(
        detector="demo",
        images=data / "d" / "train",
        annotations=data / "d" / "annotations" / "train.json",
        out=out,
        config=ExtractConfig(
            topk=10, target_size=8, block_size=2, num_workers=0, device="cpu", dtype="int8", c1="store"
        ),
        progress=False,
    )
    split = Cache(out).split("train")
    split.read(2)
    scales = zarr.open_array(out / "train" / "scales" / "memory", mode="r+")
    scales[2, 0] = scales[2, 0] * 1.5  # a plausible value: only the checksum can tell
    with pytest.raises(MfcacheError, match=r"array scales/memory of image id \d+ \(position 2\): checksum mismatch"):
        Cache(out).split("train").read(2)
    assert "checksum mismatch in scales/memory" in "\n".join(verify(out).problems)


# --- one writer per cache ---------------------------------------------------------------


def extract_command(data, out):
    return [
        sys.executable,
        "-m",
        "mfcache",
        "extract",
        "--detector",
        "demo",
        "--images",
        str(data / "d" / "train"),
        "--annotations",
        str(data / "d" / "annotations" / "train.json"),
        "--out",
        str(out),
        "-q",
        *EXTRACT_ARGS,
    ]


def test_a_second_extract_is_refused_at_once_naming_the_holder(data, tmp_path):
    out = tmp_path / "locked"
    lock = acquire(out)
    try:
        result = invoke(
            "extract",
            "--detector",
            "demo",
            "--images",
            data / "d" / "train",
            "--annotations",
            data / "d" / "annotations" / "train.json",
            "--out",
            out,
            "-q",
            *EXTRACT_ARGS,
        )
        assert result.exit_code == 1
        line = the_error_line(result.output)
        assert f"pid {os.getpid()} on host " in line and "started " in line and "being written" in line
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing created
    finally:
        lock.release()
    assert not out.exists()  # no cache was made: the lock and its folder are gone


def test_two_extracts_at_once_one_wins_and_its_cache_verifies(data, healthy, tmp_path):
    out = tmp_path / "raced"
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the reference's float sums
    procs = [
        subprocess.Popen(
            extract_command(data, out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 1], outputs
    loser = outputs[[p.returncode for p in procs].index(1)]
    winner_pid = procs[[p.returncode for p in procs].index(0)].pid
    line = the_error_line(loser)
    assert f"pid {winner_pid} on host" in line
    assert verify(out).ok
    ours, reference = Cache(out).split("train"), Cache(healthy).split("train")
    for name in ("queries", "boxes", "memory", "c1", "targets/masks", "index/checksum"):
        np.testing.assert_array_equal(ours.array(name)[:], reference.array(name)[:])


HOLDER = """
import os, sys, time
from mfcache.cache.lock import acquire
lock = acquire(sys.argv[1])
if os.fork() == 0:  # a child that outlives its parent, as a DataLoader worker may for a while
    time.sleep(30)
    os._exit(0)
print("locked", flush=True)
time.sleep(60)
"""


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    out = tmp_path / "killed"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(MfcacheError, match=f"pid {holder.pid} on host"):
            acquire(out)
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        acquire(out).release()  # at once, although the forked child still runs
    finally:
        holder.kill()


def test_a_refused_torchrun_job_fails_on_every_rank(data, tmp_path):
    out = tmp_path / "dist"
    lock = acquire(out)
    try:
        script = tmp_path / "extract.py"
        script.write_text(
            "import sys\nfrom pathlib import Path\nfrom mfcache.config import ExtractConfig\n"
            "from mfcache.errors import MfcacheError\nfrom mfcache.stages.extract import extract\n"
            "try:\n"
            f"    extract(detector='demo', images=Path({str(data / 'd' / 'train')!r}), "
            f"annotations=Path({str(data / 'd' / 'annotations' / 'train.json')!r}), out=Path({str(out)!r}), "
            "config=ExtractConfig(num_workers=0, device='cpu'), progress=False)\n"
            "except MfcacheError as exc:\n    print('refused:', exc, flush=True)\n    sys.exit(1)\n"
        )
        start = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)],
            capture_output=True,
            text=True,
            timeout=180,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert proc.returncode != 0
        # both ranks print at once, so their lines may interleave: count, don't split
        assert proc.stdout.count("refused:") == 2, proc.stdout
        assert proc.stdout.count(f"pid {os.getpid()} on host") == 2, proc.stdout
        assert time.monotonic() - start < 120  # no rank waited for a barrier
    finally:
        lock.release()
