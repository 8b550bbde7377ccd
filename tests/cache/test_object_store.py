"""A cache in object storage: extract, verify, train and eval against a real S3 server.

The server is moto's, started by this module on loopback with fake credentials set in the
environment here. A cache in a bucket gives exactly the metrics of the same cache in a folder;
two writers are refused (a lease object taken with a conditional write); a writer killed
mid-block is resumed and the cache equals an uninterrupted one; a truncated object is one
``error:`` line; no credential reaches any output or file."""

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
import zarr

from mfcache.cache.lease import LEASE_NAME, TTL, acquire_lease
from mfcache.cache.location import locate, parse_size
from mfcache.cache.reader import Cache
from mfcache.cache.readthrough import ReadThroughStore, trim
from mfcache.cache.verify import verify
from mfcache.config import resolve_run_config
from mfcache.errors import MfcacheError
from mfcache.stages.evaluate import evaluate
from mfcache.stages.extract import extract
from mfcache.stages.train import train
from tests.helpers.caches import STORE_CONFIG, STORE_TRAIN, extract_splits
from tests.helpers.cli import invoke

moto_server = pytest.importorskip("moto.server")  # in the dev extra: CI runs these tests

SECRET = "fake-secret-key-for-tests-0123456789"
BUCKET = "mfcache-test"
BLOCK = STORE_CONFIG.block_size
EXTRACT_ARGS = [
    "--detector",
    "demo",
    "--topk",
    "10",
    "--target-size",
    "8",
    "--block-size",
    str(BLOCK),
    "--batch-size",
    "2",
    "--workers",
    "0",
    "--device",
    "cpu",
    "--c1",
    "store",
    "-q",
]


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 and the environment that points the AWS SDKs at it."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3

    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    yield client
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()


def split_args(store_data, split):
    return [
        "--images",
        str(store_data / "d" / split),
        "--annotations",
        str(store_data / "d" / "annotations" / f"{split}.json"),
    ]


@pytest.fixture(scope="module")
def folder_cache(store_data):
    return extract_splits(store_data / "d", store_data / "folder", STORE_CONFIG)


@pytest.fixture(scope="module")
def bucket_cache(s3, store_data):
    url = f"s3://{BUCKET}/caches/shapes"
    for split in ("train", "val"):
        result = invoke("extract", *EXTRACT_ARGS, *split_args(store_data, split), "--out", url)
        assert result.exit_code == 0, result.output
    return url


def one_error(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_a_bucket_cache_gives_the_folder_cache_metrics_exactly(s3, store_data, folder_cache, bucket_cache, tmp_path):
    assert verify(bucket_cache).ok, verify(bucket_cache).problems
    metrics = {}
    for name, cache in (("folder", folder_cache), ("bucket", bucket_cache)):
        run = tmp_path / f"run_{name}"
        train(cache_path=locate(cache), run_dir=run, config=resolve_run_config(None, STORE_TRAIN), progress=False)
        metrics[name] = evaluate(
            cache_path=locate(cache), run_dir=run, out=tmp_path / f"{name}.json", progress=False, device="cpu"
        )
    for kind in ("segm", "bbox"):
        assert metrics["bucket"][kind] == metrics["folder"][kind]
    assert metrics["bucket"]["bbox"]["AP50"] > 0  # an equality of zeros would hold for an empty cache too
    # the run folder and the metrics name the cache by its URL, and hold no credential
    assert json.loads((tmp_path / "bucket.json").read_text())["cache"]["path"] == bucket_cache
    for path in [*(tmp_path / "run_bucket").rglob("*"), tmp_path / "bucket.json"]:
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes() and b"testing" not in path.read_bytes(), path
    # eval through a read-through folder: the second run reads every chunk from the local disk
    local = tmp_path / "chunks"
    args = [
        "eval",
        "--cache",
        bucket_cache,
        "--run",
        str(tmp_path / "run_bucket"),
        "--local-cache",
        str(local),
        "--local-cache-size",
        "1GB",
        "-q",
        "--device",
        "cpu",
    ]
    for attempt in range(2):
        result = invoke(*args, "--out", tmp_path / f"local{attempt}.json")
        assert result.exit_code == 0, result.output
        assert json.loads((tmp_path / f"local{attempt}.json").read_text())["segm"] == metrics["folder"]["segm"]
    assert any(p.is_file() for p in local.rglob("c/*"))
    for _ in range(2):  # (eval reads no targets: the first read of them fills the folder)
        split = Cache(locate(bucket_cache, local_cache=local, local_cache_size="1GB")).split("val")
        split.read_many(list(split.complete_rows))
    store = split.cache.root.store._store  # StrictWrapper(ReadThroughStore(...))
    assert store.misses == 0 and store.hits > 0


def test_a_damaged_local_copy_is_read_again_from_the_bucket(s3, bucket_cache, tmp_path):
    location = locate(bucket_cache, local_cache=tmp_path / "chunks", local_cache_size="1GB")
    split = Cache(location).split("val")
    first = split.read(0)
    copies = sorted(p for p in (tmp_path / "chunks").rglob("*") if p.is_file() and "queries" in p.parts)
    copies[0].write_bytes(b"\0" * len(copies[0].read_bytes()))  # the local disk flipped bits
    again = Cache(location).split("val").read(0)
    np.testing.assert_array_equal(np.asarray(again.queries), np.asarray(first.queries))


def test_the_read_through_folder_stays_under_its_size(tmp_path):
    for i in range(30):
        path = tmp_path / "c" / str(i)
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"x" * 1000)
        os.utime(path, (i, i))
    assert trim(tmp_path, 20_000) <= 18_000
    kept = sorted(int(p.name) for p in (tmp_path / "c").iterdir())
    assert kept == list(range(30 - len(kept), 30))  # the ones read longest ago went first
    assert parse_size("500GB") == 500 * 10**9 and parse_size("2GiB") == 2 * 2**30
    assert ReadThroughStore.kept("val/queries/c/0/0/0") and not ReadThroughStore.kept("val/index/done/c/0")


def test_a_second_writer_is_refused_naming_the_holder(s3, store_data, tmp_path):
    url = f"s3://{BUCKET}/caches/contended"
    lease = acquire_lease(locate(url))
    try:
        result = invoke("extract", *EXTRACT_ARGS, *split_args(store_data, "val"), "--out", url)
        line = one_error(result)
        assert "being written by another extract" in line and f"pid {os.getpid()}" in line
        assert "lease expires at" in line and "UTC" in line
    finally:
        lease.release()
    assert s3.list_objects_v2(Bucket=BUCKET, Prefix="caches/contended").get("KeyCount", 0) == 0


def test_of_writers_racing_for_the_lease_exactly_one_wins(s3):
    location = locate(f"s3://{BUCKET}/caches/race")
    won, refused = [], []
    barrier = threading.Barrier(4)

    def take():
        barrier.wait()
        try:
            won.append(acquire_lease(locate(location.url)))
        except MfcacheError as exc:
            refused.append(str(exc))

    threads = [threading.Thread(target=take) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 1 and len(refused) == 3, refused
    won[0].release()


def test_an_expired_lease_is_taken_over(s3):
    url = f"s3://{BUCKET}/caches/stale"
    stale = {
        "owner": "gone",
        "host": "another-node",
        "pid": 1,
        "started": "then",
        "expires": time.time() - 1,
        "expires_utc": "then",
        "command": "mfcache extract",
    }
    s3.put_object(Bucket=BUCKET, Key=f"caches/stale/{LEASE_NAME}", Body=json.dumps(stale).encode())
    lease = acquire_lease(locate(url))
    assert lease.info["owner"] != "gone"
    lease.release()
    live = {**stale, "expires": time.time() + TTL}
    s3.put_object(Bucket=BUCKET, Key=f"caches/stale/{LEASE_NAME}", Body=json.dumps(live).encode())
    with pytest.raises(MfcacheError, match="pid 1 on host another-node"):
        acquire_lease(locate(url))


def test_a_writer_whose_lease_was_taken_over_stops_writing(s3):
    location = locate(f"s3://{BUCKET}/caches/taken")
    lease = acquire_lease(location)
    expires = lease.info["expires"]
    time.sleep(0.01)
    lease.renew()  # a conditional write on its own ETag
    assert lease.info["expires"] > expires
    s3.put_object(Bucket=BUCKET, Key=f"caches/taken/{LEASE_NAME}", Body=b'{"owner": "another"}')
    with pytest.raises(Exception, match="took it over"):
        lease.renew()
    with pytest.raises(MfcacheError, match="lost the writer lease"):
        location.open_group("a")  # every write through the cache's store is refused
    lease.release()  # leaves the other writer's lease alone
    assert b"another" in s3.get_object(Bucket=BUCKET, Key=f"caches/taken/{LEASE_NAME}")["Body"].read()


# The real command, each block write slowed down so that the test can kill it inside one.
CHILD = """
import sys, time
from mfcache.cache import writer
write, ragged = writer.BlockWriter.write, writer.BlockWriter._write_ragged
writer.BlockWriter.write = lambda self, *a, **k: (time.sleep(0.3), write(self, *a, **k))[1]
writer.BlockWriter._write_ragged = lambda self, *a, **k: (time.sleep(0.3), ragged(self, *a, **k))[1]
from mfcache.cli.main import main
sys.argv = ["mfcache", *sys.argv[1:]]
main()
"""


def done_flags(url):
    try:
        return locate(url).open_group("r")["train/index/done"][:]
    except Exception:  # not created yet
        return None


def test_a_writer_killed_mid_block_is_resumed_exactly(s3, store_data, tmp_path):
    url = f"s3://{BUCKET}/caches/killed"
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, "extract", *EXTRACT_ARGS, *split_args(store_data, "train"), "--out", url],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())},
    )
    deadline = time.monotonic() + 180
    while (flags := done_flags(url)) is None or flags.sum() < BLOCK:
        assert proc.poll() is None, f"extract ended before the kill point: {proc.stderr.read().decode()}"
        assert time.monotonic() < deadline, "kill point never reached"
        time.sleep(0.05)
    time.sleep(0.45)  # inside the next block's write
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    flags = done_flags(url)
    assert BLOCK <= flags.sum() < len(flags)  # what the kill left reads as not done
    with pytest.raises(MfcacheError, match="incomplete"):
        Cache(url).split("train").require_complete()
    # the killed writer's lease is still there; the same command on this host takes it over
    assert locate(url).has(LEASE_NAME)
    extract(
        detector="demo",
        images=store_data / "d" / "train",
        annotations=store_data / "d" / "annotations" / "train.json",
        out=locate(url),
        config=STORE_CONFIG,
        progress=False,
    )
    assert not locate(url).has(LEASE_NAME) and verify(url).ok
    reference = tmp_path / "reference"
    extract(
        detector="demo",
        images=store_data / "d" / "train",
        annotations=store_data / "d" / "annotations" / "train.json",
        out=reference,
        config=STORE_CONFIG,
        progress=False,
    )
    resumed, whole = locate(url).open_group("r")["train"], zarr.open_group(reference / "train", mode="r")
    arrays = {p: n for p, n in whole.members(max_depth=None) if isinstance(n, zarr.Array)}
    for name, array in arrays.items():
        np.testing.assert_array_equal(resumed[name][:], array[:], err_msg=name)


def test_a_truncated_object_is_one_error_line(s3, store_data, bucket_cache, tmp_path):
    source = bucket_cache.removeprefix(f"s3://{BUCKET}/")
    for item in s3.list_objects_v2(Bucket=BUCKET, Prefix=source + "/")["Contents"]:  # a copy to damage
        s3.copy_object(
            Bucket=BUCKET,
            CopySource={"Bucket": BUCKET, "Key": item["Key"]},
            Key=item["Key"].replace(source, "caches/truncated", 1),
        )
    key = "caches/truncated/val/memory/c/0/0"
    body = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    s3.put_object(Bucket=BUCKET, Key=key, Body=body[: len(body) // 2])
    url = f"s3://{BUCKET}/caches/truncated"
    run = tmp_path / "run"
    train(
        cache_path=locate(url), run_dir=run, config=resolve_run_config(None, STORE_TRAIN), split="train", progress=False
    )
    line = one_error(invoke("eval", "--cache", url, "--run", run, "-q", "--device", "cpu"))
    assert "split 'val'" in line and "array memory" in line and "image id" in line and "damaged" in line
    assert not verify(url).ok


def test_bad_places_are_one_error_line_without_credentials(s3, store_data, monkeypatch):
    line = one_error(invoke("inspect", "s3://no-such-bucket-here/x"))
    assert "does not exist" in line
    line = one_error(invoke("verify", f"s3://user:{SECRET}@{BUCKET}/x"))
    assert SECRET not in line and "not in the cache URL" in line
    line = one_error(invoke("inspect", f"s3://{BUCKET}/caches/none"))
    assert "no mfcache cache at" in line
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(store_data / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(store_data / "none"))
    line = one_error(
        invoke("extract", *EXTRACT_ARGS, *split_args(store_data, "val"), "--out", f"s3://{BUCKET}/caches/nocreds")
    )
    assert "no AWS credentials" in line


def test_a_sweep_reads_a_bucket_through_a_local_folder(s3, store_data, folder_cache, bucket_cache, tmp_path):
    """``sweep --local-cache`` trains and evaluates every head from the bucket through one local
    folder of chunks; its rows equal the same sweep over the folder cache."""
    rows = {}
    for name, cache, extra in (
        ("folder", folder_cache, []),
        ("bucket", bucket_cache, ["--local-cache", str(tmp_path / "chunks"), "--local-cache-size", "1GB"]),
    ):
        args = ["sweep", "--cache", str(cache), "--heads", "box_baseline", "--out", tmp_path / name, *extra]
        result = invoke(*args, *[a for s in STORE_TRAIN for a in ("--set", s)], "--json", "-q")
        assert result.exit_code == 0, result.output
        rows[name] = json.loads((tmp_path / name / "sweep.json").read_text())
    keys = ("name", "segm_AP", "segm_AP50", "params")
    assert [{k: r[k] for k in keys} for r in rows["bucket"]] == [{k: r[k] for k in keys} for r in rows["folder"]]
    assert rows["bucket"][0]["segm_AP50"] is not None
    assert any(p.is_file() for p in (tmp_path / "chunks").rglob("c/*"))  # the chunks were kept locally


def test_two_nodes_extract_one_cache_in_a_bucket(s3, store_data, tmp_path):
    """``torchrun --nnodes 2`` (two launchers on this host, one process each, as two machines
    would run it) writes one cache in a bucket, whole blocks per rank, equal to one process's."""
    import socket

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    url = f"s3://{BUCKET}/caches/two-nodes"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--nproc_per_node",
                "1",
                "--node_rank",
                str(rank),
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                str(port),
                "-m",
                "mfcache",
                "extract",
                *EXTRACT_ARGS,
                *split_args(store_data, "train"),
                "--out",
                url,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for rank in (0, 1)
    ]
    for node in nodes:
        _, err = node.communicate(timeout=300)
        assert node.returncode == 0, err[-4000:]
    assert verify(url).ok and not locate(url).has(LEASE_NAME)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun's processes (OMP_NUM_THREADS=1): the same float sums
    try:
        extract_splits(store_data / "d", tmp_path / "one", STORE_CONFIG, splits=("train",))
    finally:
        torch.set_num_threads(threads)
    both, one = locate(url).open_group("r")["train"], zarr.open_group(tmp_path / "one" / "train", mode="r")
    arrays = {p: n for p, n in one.members(max_depth=None) if isinstance(n, zarr.Array)}
    assert "memory" in arrays and "index/done" in arrays
    for name, array in arrays.items():
        np.testing.assert_array_equal(both[name][:], array[:], err_msg=name)
