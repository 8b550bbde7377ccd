"""A cache at a ``gs://`` URL: extract, verify, train and eval against a GCS server on loopback.

The server is gcp-storage-emulator with the XML API that obstore's ``GCSStore`` speaks filled
in by :mod:`tests.helpers.gcs` (the emulator alone answers none of it in a form obstore
accepts). A cache in a bucket gives exactly the metrics of the same cache in a folder; a second
writer is refused (the lease is created with ``x-goog-if-generation-match: 0``); the lease is
renewed and taken over with a conditional write on its generation, which GCS needs where S3
and Azure match the ETag."""

import json
import os
import time

import obstore
import pytest

from mfcache.cache.lease import LEASE_NAME, TTL, acquire_lease
from mfcache.cache.location import locate
from mfcache.cache.verify import verify
from mfcache.config import resolve_run_config
from mfcache.errors import MfcacheError
from mfcache.stages.evaluate import evaluate
from mfcache.stages.train import train
from tests.helpers.caches import STORE_CONFIG, STORE_TRAIN, extract_splits
from tests.helpers.cli import extract_demo, one_error_line

pytest.importorskip("gcp_storage_emulator")  # in the dev extra: CI runs these tests
from tests.helpers import gcs  # noqa: E402  (imports the emulator)

BUCKET = "mfcache-test"


@pytest.fixture(scope="module")
def server():
    """The GCS server, with the environment pointing obstore at it and no other Google
    setting of the machine's in the way."""
    server, env = gcs.start(BUCKET)
    saved = {key: value for key, value in os.environ.items() if key.startswith("GOOGLE_")}
    for key in saved:
        del os.environ[key]
    os.environ.update(env)
    yield server
    for key in env:
        os.environ.pop(key, None)
    os.environ.update(saved)
    server.stop()


def test_a_gs_cache_gives_the_folder_cache_metrics_exactly(server, store_data, tmp_path):
    caches = {
        "folder": extract_splits(store_data / "d", store_data / "folder", STORE_CONFIG),
        "bucket": extract_splits(store_data / "d", f"gs://{BUCKET}/caches/shapes", STORE_CONFIG),
    }
    assert verify(caches["bucket"]).ok, verify(caches["bucket"]).problems
    metrics = {}
    for name, cache in caches.items():
        run = tmp_path / f"run_{name}"
        train(cache_path=locate(cache), run_dir=run, config=resolve_run_config(None, STORE_TRAIN), progress=False)
        metrics[name] = evaluate(
            cache_path=locate(cache), run_dir=run, out=tmp_path / f"{name}.json", progress=False, device="cpu"
        )
    for kind in ("segm", "bbox"):
        assert metrics["bucket"][kind] == metrics["folder"][kind]
    assert metrics["bucket"]["bbox"]["AP50"] > 0  # an equality of zeros would hold for an empty cache too
    assert json.loads((tmp_path / "bucket.json").read_text())["cache"]["path"] == caches["bucket"]


def test_a_second_writer_is_refused_naming_the_holder(server, store_data):
    url = f"gs://{BUCKET}/caches/contended"
    lease = acquire_lease(locate(url))
    try:
        result = extract_demo(store_data / "d", url, "--c1", "store")
        one_error_line(result, "being written by another extract", f"pid {os.getpid()}", "lease expires at")
    finally:
        lease.release()
    assert obstore.list(locate(url).object_store()).collect() == []  # released: nothing left


def test_the_lease_is_renewed_on_its_generation_and_a_take_over_noticed(server):
    location = locate(f"gs://{BUCKET}/caches/taken")
    lease = acquire_lease(location)
    expires = lease.info["expires"]
    time.sleep(0.01)
    lease.renew()  # object_store refuses a conditional update on GCS without the generation
    assert lease.info["expires"] > expires
    obstore.put(location.object_store(), LEASE_NAME, b'{"owner": "another"}')
    with pytest.raises(Exception, match="took it over"):
        lease.renew()
    with pytest.raises(MfcacheError, match="lost the writer lease"):
        location.open_group("a")  # every write through the cache's store is refused
    lease.release()  # leaves the other writer's lease alone
    assert json.loads(obstore.get(location.object_store(), LEASE_NAME).bytes().to_bytes()) == {"owner": "another"}


def test_an_expired_lease_is_taken_over(server):
    location = locate(f"gs://{BUCKET}/caches/stale")
    stale = {"owner": "gone", "host": "another-node", "pid": 1, "started": "then", "expires": time.time() - 1}
    store = location.object_store()
    obstore.put(store, LEASE_NAME, json.dumps({**stale, "expires_utc": "then", "command": "mfcache extract"}).encode())
    lease = acquire_lease(location)  # a conditional write on the stale lease's generation
    assert lease.info["owner"] != "gone"
    lease.release()
    obstore.put(store, LEASE_NAME, json.dumps({**stale, "expires": time.time() + TTL}).encode())
    with pytest.raises(MfcacheError, match="pid 1 on host another-node"):
        acquire_lease(location)
