"""Object-store faults and driver kills during labeling (issue #10, items 2 and 5).

A fault-injecting proxy (tests/faultproxy.py) sits in front of the loopback moto server; the job's endpoint
points at it, so 503 SlowDown, 500 InternalError, connection resets and stalls past the read timeout reach the
job from outside, on listings, object reads, input freezing and part writes. The driver is SIGKILLed from
outside at chosen moments: between a chunk's `poses` and `images` parts, and while the input list is frozen.
Every run must end with each input exactly once in `images` and the persons of the clean run
(docs/reliability.md records what was run and what happened)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import s3fs
from fsspec.implementations.local import LocalFileSystem

from fault_inputs import BROKEN, image_objects, loud_random_checkpoint
from faultproxy import FAULTS, FaultProxy, Rule
from run_tables import assert_same_as_clean, tables_of
from pipelines import storage
from pipelines.label.config import LabelJobConfig, label_config
from pipelines.label.job import run_label_job

N_IMAGES = 20
TOTAL = N_IMAGES + len(BROKEN)
SMALL = {"infer.boxsize": 128, "decode.actors": (1, 1), "network.actors": (1, 1), "assemble.actors": (1, 1),
         "network.cpus": 0.5, "read.batch_size": 4, "decode.batch_size": 2, "network.batch_size": 2,
         "assemble.batch_size": 4, "progress_interval_s": 1.0, "floor.min_person_score": 0.0,
         "floor.min_keypoints": 0, "chunk_size": 4}
READ_TIMEOUT_S = 2.0
STALL_S = 4.0  # longer than the read timeout: a stalled request times out and is retried


@pytest.fixture(scope="module")
def store(s3_endpoint, coco_mini, tmp_path_factory):
    """s3://flt-in/imgs/: 20 coco-mini JPEGs and 2 broken objects; s3://flt-in/cursed/: 3 JPEGs and
    cursed.jpg; a local tiny random IMHN; the proxy in front of moto (no faults until a test sets rules)."""
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    fs.mkdir("flt-in")
    fs.mkdir("flt-out")
    images = sorted((coco_mini / "train2017").glob("*.jpg"))[:N_IMAGES]
    objects = image_objects(images, "flt-in/imgs")
    objects.update({f"flt-in/cursed/{p.name}": p.read_bytes() for p in images[:3]})
    objects["flt-in/cursed/cursed.jpg"] = images[3].read_bytes()
    fs.pipe(objects)
    local = loud_random_checkpoint(tmp_path_factory.mktemp("fltmodel") / "tiny.pt")
    proxy = FaultProxy(s3_endpoint, seed=10, stall_s=STALL_S).start()
    yield fs, str(local), proxy
    proxy.stop()


def options(proxy: FaultProxy, botocore_retries: int = 3) -> dict:
    """The job's storage options: the proxy as endpoint, short timeouts (stalls cost seconds, not minutes)."""
    return {"endpoint_url": proxy.endpoint,
            "config_kwargs": {"connect_timeout": READ_TIMEOUT_S, "read_timeout": READ_TIMEOUT_S,
                              "retries": {"max_attempts": botocore_retries, "mode": "standard"}}}


def config(store, output: str, input_prefix: str = "s3://flt-in/imgs/", botocore_retries: int = 3,
           **changes) -> LabelJobConfig:
    """The job's config; `botocore_retries` lower for the faults that never end (every retry layer's backoff
    multiplies: our retries x s3fs's 5 tries x botocore's attempts)."""
    _, model, proxy = store
    return label_config(input=input_prefix, output=f"s3://flt-out/{output}", model=model,
                        storage_options=options(proxy, botocore_retries), **{**SMALL, **changes})


@pytest.fixture(scope="module")
def clean(store, ray_cluster):
    fs, _, proxy = store
    proxy.healthy()
    summary = run_label_job(config(store, "clean"))
    images, poses = tables_of(fs, "flt-out/clean")
    assert summary.counts == {"ok": N_IMAGES, "empty": 1, "decode_error": 1}
    assert len(poses) > 0
    return images, poses


@pytest.mark.slow
def test_faults_on_listing_reads_freezing_and_part_writes_change_nothing(store, clean):
    fs, _, proxy = store
    # 10 % of every request (listings, object GETs and HEADs, PUTs of input and output parts) get a fault,
    # a quarter each of 503 SlowDown, 500 InternalError, connection reset, stall past the read timeout; and
    # for certain, the first listing a 503, the first object GET a stall, the fourth a 500, the first PUT a reset
    proxy.rules = [Rule("503", kinds=("list",), limit=1), Rule("stall", kinds=("get",), limit=1),
                   Rule("500", kinds=("get",), after=2, limit=1), Rule("reset", kinds=("put",), limit=1),
                   *(Rule(fault, rate=0.025) for fault in FAULTS)]
    started = time.monotonic()
    try:
        summary = run_label_job(config(store, "faulty"))
    finally:
        injected, requests = dict(proxy.injected), dict(proxy.requests)
        proxy.healthy()
    print(f"faulty run: {time.monotonic() - started:.1f} s; requests {requests}; injected {injected}")
    for fault in FAULTS:
        assert sum(n for (f, _), n in injected.items() if f == fault) > 0, f"no {fault} was injected"
    for kind in ("list", "get", "put"):
        assert sum(n for (_, k), n in injected.items() if k == kind) > 0, f"no fault on {kind} requests"
    assert summary.counts == {"ok": N_IMAGES, "empty": 1, "decode_error": 1}
    assert_same_as_clean(fs, "flt-out/faulty", clean, TOTAL)


@pytest.mark.slow
def test_an_object_failing_every_try_becomes_a_read_error_row(store, ray_cluster):
    fs, _, proxy = store
    proxy.rules = [Rule("503", kinds=("get",), path=r"/cursed\.jpg$")]
    try:
        summary = run_label_job(config(store, "cursed", "s3://flt-in/cursed/", botocore_retries=0,
                                       **{"read.retries": 1}))
        tries = proxy.injected[("503", "get")]
    finally:
        proxy.healthy()
    assert summary.counts == {"ok": 3, "read_error": 1}
    images, _ = tables_of(fs, "flt-out/cursed")
    row = images.set_index("image_id").loc["cursed.jpg"]
    print(f"cursed.jpg: {tries} GETs answered 503; error {row['error']!r}")
    assert row["status"] == "read_error" and row["size_bytes"] == 0
    assert "SlowDown" in row["error"] or "reduce your request rate" in row["error"], row["error"]
    assert tries >= 2  # the read was retried


def test_objects_are_read_with_one_get_each_and_no_head(store):
    """s3fs sends a HEAD before each GET unless told to read whole objects; a batch's reads are one GET each
    (requests counted by the proxy, from outside), and a 250 ms store latency costs the batch about one
    round trip, not one per object (the GETs run concurrently)."""
    fs, _, proxy = store
    uris = [f"s3://{key}" for key in sorted(fs.find("flt-in/imgs"))[:8]]
    storage.read_objects(uris, options(proxy))  # the client and its connections exist before the timing
    before = proxy.injected.copy()
    proxy.rules = [Rule("delay", delay_s=0.25, kinds=("head", "get"), path=r"^/flt-in/imgs/")]
    try:
        started = time.monotonic()
        blobs = storage.read_objects(uris, options(proxy))
        seconds = time.monotonic() - started
    finally:
        proxy.healthy()
    delayed = proxy.injected - before
    assert all(isinstance(blob, bytes) and blob for blob in blobs)
    assert delayed[("delay", "head")] == 0 and delayed[("delay", "get")] == len(uris), delayed
    assert seconds < 0.25 * len(uris) / 2, f"8 reads took {seconds:.2f} s: not concurrent"


@pytest.mark.slow
def test_a_part_write_that_keeps_failing_stops_the_run_naming_it_then_the_rerun_completes(store, clean):
    fs, _, proxy = store
    # every PUT of a poses part after the first (the second chunk to commit) is answered 500 InternalError
    proxy.rules = [Rule("500", kinds=("put",), path=r"/partfail/poses/part-\d+\.parquet$", after=1)]
    started = time.monotonic()
    try:
        with pytest.raises(storage.StorageWriteError, match=r"s3://flt-out/partfail/poses/part-\d{6}\.parquet") \
                as error:
            run_label_job(config(store, "partfail", botocore_retries=0))
    finally:
        proxy.healthy()
    print(f"failing part write: stopped after {time.monotonic() - started:.1f} s, "
          f"{proxy.injected[('500', 'put')]} PUTs answered 500: {error.value}")
    failed = str(error.value).split("/poses/", 1)[1].split(" ", 1)[0]
    fs.invalidate_cache()
    assert not fs.exists("flt-out/partfail/_SUCCESS")
    assert not fs.exists(f"flt-out/partfail/images/{failed}")
    kept = committed_rows(fs, "flt-out/partfail")  # the chunk committed before the failing one
    summary = run_label_job(config(store, "partfail"))
    print(f"re-run: {kept} objects were committed, {summary.processed} processed in {summary.seconds:.1f} s")
    assert summary.resumed and summary.processed == TOTAL - kept and 0 < kept < TOTAL
    assert_same_as_clean(fs, "flt-out/partfail", clean, TOTAL)


def test_local_prefix_listing_is_streamed_in_the_order_of_sorted_find(tmp_path):
    """`iter_input_uris` walks local prefixes itself (no stat per file, not all in memory): same order and
    ids as `sorted(fs.find(root))` with the `_`/`.` rule."""
    names = ["a.txt", "a/b.jpg", "a/c/d.jpg", "a-b/x.jpg", "a0", "_skip/x.jpg", "k/_x.jpg", "k/.hidden",
             ".h/y.jpg", "k/m/n.png", "B.jpg", "z/ü.jpg", "ab/c"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    fs = LocalFileSystem()
    root = fs._strip_protocol(str(tmp_path))
    expected = [(p[len(root) + 1:], fs.unstrip_protocol(p)) for p in sorted(fs.find(root))
                if not any(part.startswith(("_", ".")) for part in p[len(root) + 1:].split("/"))]
    assert list(storage.iter_input_uris(str(tmp_path))) == expected
    assert list(storage.iter_input_uris(str(tmp_path) + "/")) == expected
    assert [i for i, _ in expected] == ["B.jpg", "a-b/x.jpg", "a.txt", "a/b.jpg", "a/c/d.jpg", "a0", "ab/c",
                                        "k/m/n.png", "z/ü.jpg"]
    assert list(storage.iter_input_uris(str(tmp_path / "missing"))) == []


def committed_rows(fs, out: str) -> int:
    fs.invalidate_cache()
    if not fs.exists(f"{out}/images"):
        return 0
    return pq.read_table(f"{out}/images", filesystem=fs).num_rows


def cli(store, output: str, *flags: str) -> list[str]:
    _, model, _ = store
    return [sys.executable, "-m", "jobs.cli", "label", "s3://flt-in/imgs/", f"s3://flt-out/{output}",
            "--model", model, "--boxsize", "128", "--chunk-size", "4", "--network-cpus", "0.5",
            "--decode-actors", "1", "--network-actors", "1", "--assemble-actors", "1", "--read-batch-size", "4",
            "--decode-batch-size", "2", "--network-batch-size", "2", "--assemble-batch-size", "4",
            "--min-person-score", "0", "--min-keypoints", "0", *flags]


def kill_when(store, output: str, condition, command: list[str], timeout: float = 180) -> None:
    """Run the driver with its endpoint at the proxy; SIGKILL it from outside once `condition(fs)` holds
    (checked on moto directly)."""
    fs, _, proxy = store
    env = {**os.environ, "AWS_ENDPOINT_URL": proxy.endpoint}
    job = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and job.poll() is None:
            fs.invalidate_cache()
            if condition(fs):
                break
            time.sleep(0.1)
        assert job.poll() is None, f"the driver ended (rc {job.returncode}) before the moment to kill it"
        if not condition(fs):  # timing on a loaded machine, not a broken guarantee
            pytest.skip(f"the fault could not be injected: the moment to kill the driver did not come within "
                        f"{timeout} s")
    finally:
        job.send_signal(signal.SIGKILL)
        job.wait(timeout=30)


@pytest.mark.slow
def test_driver_killed_between_a_chunks_poses_and_images_parts(store, clean, ray_cluster):
    fs, _, proxy = store
    out = "flt-out/killparts"
    # the driver's PUT of the second chunk's images part hangs (longer than the driver's read timeout): the
    # driver is killed while that chunk has its poses part and no images part, one chunk committed before it
    proxy.rules = [Rule("stall", kinds=("put",), path=r"/killparts/images/part-\d+\.parquet$", after=1,
                        stall_s=120)]

    def poses_without_images(fs) -> set[str]:
        names = {kind: {p.rsplit("/", 1)[-1] for p in fs.glob(f"{out}/{kind}/part-*.parquet")}
                 for kind in ("poses", "images")}
        return names["poses"] - names["images"]

    try:
        kill_when(store, "killparts", lambda fs: bool(poses_without_images(fs)),
                  cli(store, "killparts", "--address", ray_cluster.get_runtime_context().gcs_address))
    finally:
        proxy.healthy()
    fs.invalidate_cache()
    assert len(poses_without_images(fs)) == 1 and len(fs.glob(f"{out}/images/part-*.parquet")) == 1
    assert not fs.exists(f"{out}/_SUCCESS")
    kept = committed_rows(fs, out)
    summary = run_label_job(config(store, "killparts"))
    print(f"killed between parts; re-run: {kept} objects were committed, {summary.processed} processed in "
          f"{summary.seconds:.1f} s")
    assert summary.resumed and summary.processed == TOTAL - kept and 0 < kept < TOTAL
    assert_same_as_clean(fs, "flt-out/killparts", clean, TOTAL)


@pytest.mark.slow
def test_driver_killed_while_freezing_the_input_list(store, clean, ray_cluster):
    fs, _, proxy = store
    out = "flt-out/killfreeze"
    proxy.rules = [Rule("stall", kinds=("put",), path=r"/killfreeze/_inputs/part-000003\.parquet$", stall_s=120)]
    try:
        kill_when(store, "killfreeze",
                  lambda fs: fs.exists(f"{out}/_inputs/part-000002.parquet"),
                  cli(store, "killfreeze", "--address", ray_cluster.get_runtime_context().gcs_address))
    finally:
        proxy.healthy()
    fs.invalidate_cache()
    assert not fs.exists(f"{out}/_inputs/_complete.json") and not fs.exists(f"{out}/images")
    print(f"killed while freezing: {len(fs.ls(f'{out}/_inputs'))} input parts frozen of 6")
    summary = run_label_job(config(store, "killfreeze"))
    assert summary.resumed and summary.processed == TOTAL
    assert_same_as_clean(fs, "flt-out/killfreeze", clean, TOTAL)
    frozen = pq.read_table(f"{out}/_inputs", filesystem=fs)
    assert sorted(frozen["input_index"].to_pylist()) == list(range(TOTAL))


def test_s3_prefix_listing_is_streamed_in_the_order_of_sorted_find(s3_endpoint):
    """`iter_input_uris` lists S3 prefixes page by page: same objects, order and ids as `sorted(fs.find)`
    (with folder placeholders, as find has them; `_`/`.` names left out), also across pages."""
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    fs.mkdir("flt-list")
    names = ["a.txt", "a/b.jpg", "a/c/d.jpg", "a-b/x.jpg", "a0", "_skip/x.jpg", "k/_x.jpg", "k/.hidden",
             "k/m/n.png", "B.jpg", "z/ü.jpg", "ab/c", "folder/", "folder/in.jpg"]
    fs.pipe({f"flt-list/p/{name}": b"x" for name in names})
    fs.pipe({f"flt-list/many/{i:05d}.jpg": b"" for i in range(2100)})  # 3 pages of 1000
    for prefix in ("p", "many"):
        root = f"flt-list/{prefix}"
        fs.invalidate_cache()
        expected = [(p[len(root) + 1:], f"s3://{p}") for p in sorted(fs.find(root))
                    if not any(part.startswith(("_", ".")) for part in p[len(root) + 1:].split("/"))]
        for uri in (f"s3://{root}", f"s3://{root}/"):
            assert list(storage.iter_input_uris(uri)) == expected
    assert len(expected) == 2100
    assert list(storage.iter_input_uris("s3://flt-list/missing/")) == []
