"""Reader throughput from object storage vs from local disk, cold and with the read-through folder warm.

    python benchmarks/remote_reader.py [--images 48] [--out benchmarks/results/remote_reader.json]

A synthetic cache with the layout of a Deformable DETR R50 extraction (``cache_io.synthetic_cache``,
480 x 640 images, C1 stored) is written to a local folder and copied into a bucket of a moto S3
server started here on 127.0.0.1 (the server the tests use; a real S3 or MinIO has other
latencies: rerun against it by setting AWS_ENDPOINT_URL and ``--url``). The training reader
(``CacheSplit.read_many``, batches of 8, every part CRC-checked, one process) then reads every
image from:

- ``disk``: the local folder, page cache dropped first (cold);
- ``s3``: the bucket, at zarr's default request concurrency (10) and at ``--concurrency``;
- ``s3 + local cache, cold``: the bucket through an empty ``--local-cache`` folder (fills it);
- ``s3 + local cache, warm``: the same folder again (the second epoch);
- the store layers, where s3fs is installed: one array read whole through ``zarr.storage.FsspecStore``
  (s3fs) and ``zarr.storage.ObjectStore`` (obstore), the measurement behind the choice of obstore.

Prints a table and writes JSON (``meta``: date, machine, command) for ``render_docs.py``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

BUCKET = "mfcache-bench"


def start_server() -> str:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://{host}:{port}",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
    )
    return f"http://{host}:{port}"


def upload(folder: Path, prefix: str) -> None:
    import boto3

    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        client.put_object(Bucket=BUCKET, Key=f"{prefix}/{path.relative_to(folder).as_posix()}", Body=path.read_bytes())


def read_all(cache, batch: int = 8) -> float:
    """Seconds for the reader to serve every image of split ``train`` in batches."""
    from mfcache.cache.reader import Cache

    start = time.perf_counter()
    split = Cache(cache).split("train")
    rows = list(split.complete_rows)
    for lo in range(0, len(rows), batch):
        split.read_many(rows[lo : lo + batch])
    return time.perf_counter() - start


def store_layers(url: str, endpoint: str) -> dict:
    """MB/s reading the ``memory`` array whole through FsspecStore (s3fs) and ObjectStore (obstore)."""
    import zarr

    from mfcache.cache.location import locate

    out = {}
    try:
        from zarr.storage import FsspecStore

        fs = FsspecStore.from_url(url, storage_options={"endpoint_url": endpoint}, read_only=True)
        layers = {"fsspec (s3fs)": fs}
    except ImportError:
        layers = {}
    layers["obstore"] = zarr.storage.ObjectStore(locate(url).object_store(), read_only=True)
    for name, store in layers.items():
        array = zarr.open_group(store=store, mode="r")["train/memory"]
        rates = []
        for _ in range(3):
            start = time.perf_counter()
            data = array[:]
            rates.append(data.nbytes / 1e6 / (time.perf_counter() - start))
        out[name] = statistics.median(rates)
    return out


def _without_machine(argv: list[str]) -> list[str]:
    """The command's arguments less ``--machine TEXT`` (the JSON records the machine apart)."""
    out, skip = [], False
    for word in argv:
        if skip or word.startswith("--machine="):
            skip = False
            continue
        if word == "--machine":
            skip = True
            continue
        out.append(word)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=64, help="zarr async.concurrency for object storage")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/remote_reader.json"))
    parser.add_argument("--machine", default=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    args = parser.parse_args()

    import zarr
    from cache_io import evict, synthetic_cache

    from mfcache.cache.location import locate

    endpoint = start_server()
    url = f"s3://{BUCKET}/caches/synthetic"
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
        folder = synthetic_cache(Path(tmp) / "cache", images=args.images, input_hw=(480, 640))
        stored = sum(p.stat().st_size for p in (folder / "train").rglob("*") if p.is_file())
        upload(folder, "caches/synthetic")
        times: dict[str, list[float]] = {k: [] for k in ("disk", "s3_default", "s3", "s3_local_cold", "s3_local_warm")}
        for r in range(args.repeats):
            evict(folder)
            times["disk"].append(read_all(folder))
            with zarr.config.set({"async.concurrency": 10}):
                times["s3_default"].append(read_all(url))
            with zarr.config.set({"async.concurrency": args.concurrency}):
                times["s3"].append(read_all(url))
                local = Path(tmp) / f"local{r}"
                remote = locate(url, local_cache=local, local_cache_size="10GB")
                times["s3_local_cold"].append(read_all(remote))
                evict(local)  # warm = the chunks are in the folder; the page cache is dropped all the same
                times["s3_local_warm"].append(read_all(remote))
        layers = store_layers(url, endpoint)
    mb = stored / 1e6
    rate = {k: mb / statistics.median(v) for k, v in times.items()}
    result = {
        "meta": {
            "date": date.today().isoformat(),
            "machine": args.machine,
            "command": "python benchmarks/remote_reader.py " + " ".join(_without_machine(sys.argv[1:])),
        },
        "images": args.images,
        "input_hw": [480, 640],
        "bytes": stored,
        "concurrency": args.concurrency,
        "MBps": rate,
        "ratio_to_disk": {k: rate[k] / rate["disk"] for k in rate if k != "disk"},
        "store_layers_MBps": layers,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for key, value in rate.items():
        print(f"{key:16s} {value:8.1f} MB/s  {value / rate['disk']:.2f}x disk")
    for key, value in layers.items():
        print(f"store layer {key:14s} {value:8.1f} MB/s")


if __name__ == "__main__":
    main()
