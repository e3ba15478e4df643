"""Unit tests of the labeling job's parts without Ray: tables, storage helpers, the run folder protocol,
the chunk writer and every stage called on a hand-made dict batch. The model has random weights: these
tests check plumbing (rows, statuses, shapes), not pose quality."""
from __future__ import annotations

import json
import uuid

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines import storage
from pipelines.label import run_folder, tables
from pipelines.config import format_config
from pipelines.label.config import label_config
from pipelines.label.job import ChunkWriter, chunk_tables
from simplepose.skeleton import COCO_KEYPOINTS, COCO_SKELETON


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    import torch

    from simplepose.checkpoint import save_checkpoint
    from simplepose.model import IMHN

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    save_checkpoint(IMHN(stacks=1, width=32, increase=8), path, {"name": "tiny-random"})
    return str(path)


def _pose_rows():
    """Two images: the first with 2 persons (given in increasing score order), the second with none."""
    kp = np.zeros((2, 17, 3), np.float32)
    kp[0, 0] = (10, 20, 0.9)
    kp[1, 1:6] = (30, 40, 0.5)
    base = {"status": "ok", "error": "", "size_bytes": 100, "width": 64, "height": 48}
    return [
        {**base, "input_index": 0, "image_id": "a", "uri": "s3://b/a.jpg", "num_persons": 2,
         "pose_keypoints": kp.tobytes(), "pose_scores": np.array([0.2, 0.7], np.float32).tobytes(),
         "pose_boxes": np.ones((2, 4), np.float32).tobytes()},
        {**base, "input_index": 1, "image_id": "b", "uri": "s3://b/b.jpg", "num_persons": 0,
         "pose_keypoints": b"", "pose_scores": b"", "pose_boxes": b""},
    ]


RUN = {"run_id": "r1", "model_name": "tiny", "model_version": "v1"}


def _columns(rows: list[dict]) -> dict[str, np.ndarray]:
    """Rows -> the assembly stage's batch format (one object array per column)."""
    return {name: np.array([r[name] for r in rows], dtype=object) for name in rows[0]}


def test_chunk_tables_schema_ranks_and_missing_keypoints():
    meta = tables.table_metadata(RUN)
    images, poses = chunk_tables(_columns(_pose_rows()), RUN, meta)
    assert images.schema.equals(tables.IMAGES_SCHEMA) and poses.schema.equals(tables.POSES_SCHEMA)
    assert images["num_persons"].to_pylist() == [2, 0] and images["run_id"].to_pylist() == ["r1", "r1"]
    assert poses.num_rows == 2 and poses["image_id"].to_pylist() == ["a", "a"]
    assert poses["person_index"].to_pylist() == [1, 0]  # the 0.7 person ranks first
    assert poses["nose_x"].to_pylist() == [10, None] and poses["nose_score"].to_pylist()[1] == 0
    assert poses["left_eye_y"].to_pylist() == [None, 40]
    assert poses["num_keypoints"].to_pylist() == [1, 5]
    described = tables.read_metadata(poses)
    assert described["keypoints"] == list(COCO_KEYPOINTS)
    assert described["skeleton"] == [list(p) for p in COCO_SKELETON] and described["run"]["run_id"] == "r1"


def test_parquet_bytes_read_by_pandas_and_duckdb(tmp_path):
    duckdb = pytest.importorskip("duckdb")
    _, poses = chunk_tables(_columns(_pose_rows()), RUN, tables.table_metadata(RUN))
    path = tmp_path / "poses.parquet"
    path.write_bytes(tables.to_parquet_bytes(poses))
    assert tables.read_metadata(pq.read_schema(path))["schema_version"] == tables.SCHEMA_VERSION
    best = duckdb.sql(f"SELECT score FROM '{path}' WHERE person_index = 0").fetchall()
    assert best == [(pytest.approx(0.7),)]
    import pandas as pd

    assert len(pd.read_parquet(path)) == 2


def test_rank_within_groups_ties_are_stable():
    groups = np.array(["a", "a", "a", "b", "b"], dtype=object)
    ranks = tables._rank_within_groups(groups, np.array([0.5, 0.9, 0.5, 0.1, 0.3], np.float32))
    assert ranks.tolist() == [1, 0, 2, 1, 0]


def test_iter_input_uris_prefix_glob_and_manifests(tmp_path):
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    for name in ("b.jpg", "a.jpg", "sub/c.png", "_skip.jpg", ".hidden"):
        (tmp_path / "imgs" / name).write_bytes(b"x")
    found = list(storage.iter_input_uris(str(tmp_path / "imgs")))
    assert [i for i, _ in found] == ["a.jpg", "b.jpg", "sub/c.png"]
    assert all(u.startswith("file://") for _, u in found)
    assert [i for i, _ in storage.iter_input_uris(str(tmp_path / "imgs" / "*.jpg"))] == ["a.jpg", "b.jpg"]
    (tmp_path / "list.txt").write_text("# comment\ns3://b/1.jpg\n\ns3://b/2.jpg\n")
    assert list(storage.iter_input_uris(str(tmp_path / "list.txt"))) == [("s3://b/1.jpg",) * 2, ("s3://b/2.jpg",) * 2]
    (tmp_path / "m.csv").write_text("image_id,uri\n7,s3://b/7.jpg\n")
    assert list(storage.iter_input_uris(str(tmp_path / "m.csv"))) == [("7", "s3://b/7.jpg")]
    import pyarrow as pa

    pq.write_table(pa.table({"uri": ["s3://b/9.jpg"]}), tmp_path / "m.parquet")
    assert list(storage.iter_input_uris(str(tmp_path / "m.parquet"))) == [("s3://b/9.jpg", "s3://b/9.jpg")]


def test_read_objects_retries_transient_errors_only(tmp_path, monkeypatch):
    good = tmp_path / "good.bin"
    good.write_bytes(b"abc")
    calls = []
    real = storage._cat_grouped

    def flaky(uris, options):
        calls.append(list(uris))
        if len(calls) == 1:  # first attempt: a transient failure for every object
            return iter([(i, TimeoutError("slow down")) for i in range(len(uris))])
        return real(uris, options)

    monkeypatch.setattr(storage, "_cat_grouped", flaky)
    out = storage.read_objects([str(good), str(tmp_path / "missing.bin")], retries=2, backoff_s=0)
    assert out[0] == b"abc" and isinstance(out[1], FileNotFoundError)
    assert len(calls) == 2  # the missing object is not retried a third time


def test_redact_hides_secrets():
    shown = storage.redact({"endpoint_url": "http://x", "secret": "s", "client_kwargs": {"aws_secret_access_key": "k"}})
    assert shown == {"endpoint_url": "http://x", "secret": "***", "client_kwargs": {"aws_secret_access_key": "***"}}


def test_run_folder_freeze_start_and_overwrite(tmp_path):
    folder = run_folder.RunFolder(str(tmp_path / "out"))
    run = {"run_id": "r1", "settings": {"boxsize": 640}}
    assert folder.start(run, overwrite=False) is False
    assert folder.start(run, overwrite=False) is True
    uris = ((f"{i}", f"s3://b/{i}.jpg") for i in range(5))
    assert folder.freeze_inputs(uris, chunk_size=2) == (3, 5)
    assert folder.freeze_inputs(iter(()), chunk_size=2) == (3, 5)  # frozen: the new listing is ignored
    with pytest.raises(ValueError, match="matched no objects"):
        run_folder.RunFolder(str(tmp_path / "empty")).freeze_inputs(iter(()), chunk_size=2)
    last = pq.read_table(str(tmp_path / "out" / "_inputs" / run_folder.part_name(2)))
    assert last["input_index"].to_pylist() == [4]
    with pytest.raises(ValueError, match="changed: boxsize"):
        folder.start({"run_id": "r2", "settings": {"boxsize": 512}}, overwrite=False)
    assert folder.start({"run_id": "r2", "settings": {}}, overwrite=True) is False
    assert not (tmp_path / "out" / "_inputs").exists()
    assert run_folder.chunk_of("part-000012.parquet") == 12 and run_folder.chunk_of(".part-1.tmp") is None


def test_chunk_writer_commits_complete_chunks_once(tmp_path):
    folder = run_folder.RunFolder(str(tmp_path / "out"))
    rows = _pose_rows() + [{**_pose_rows()[1], "input_index": 2, "image_id": "c", "status": "decode_error"}]
    writer = ChunkWriter(folder, RUN, chunk_size=2, objects=3, pending=[0, 1], progress_interval_s=0)

    def batch(selected):
        return {name: np.array([r[name] for r in selected], dtype=object) for name in selected[0]}

    writer.add(batch([rows[0]]))
    assert folder.committed_chunks() == set()
    writer.add(batch([rows[2], rows[0]]))  # row 0 delivered twice (a retried task): stored once
    assert folder.committed_chunks() == {1}
    writer.add(batch([rows[1], rows[2]]))  # row 2 again, after its chunk was committed: ignored
    writer.check_done()
    assert folder.committed_chunks() == {0, 1} and writer.rows_written == 3 and writer.failed == 1
    totals = folder.totals()
    assert totals["images"] == 3 and totals["persons"] == 2 and totals["status"] == {"ok": 2, "decode_error": 1}


def test_label_job_config_validates():
    with pytest.raises(ValueError, match=r"decode: DecodeStageConfig.actors: needs 1 <= min <= max"):
        label_config(input="a", output="b", model="c", **{"decode.actors": (2, 1)})
    with pytest.raises(ValueError, match="DecoderConfig.mode"):
        label_config(input="a", output="b", model="c", **{"decoder.mode": "nonsense"})
    with pytest.raises(ValueError, match="reference needs infer.aggregation=reference"):
        label_config(input="a", output="b", model="c", **{"decoder.mode": "reference"})
    config = label_config(input="a", output="b", model="c", storage_options={"secret": "x"},
                          **{"decoder.mode": "reference", "infer.aggregation": "reference"})
    assert config.decoder.is_reference and config.storage_options == {"secret": "x"}
    assert "secret" not in json.dumps(config.settings()) and "secret" not in format_config(config)
    assert label_config(input="a", output="b", model="c").infer.aggregation == "stride4"
    assert label_config(input="a", output="b", model="c", stall_timeout_s=0).stall_timeout_s is None  # 0 = never
    with pytest.raises(ValueError, match="stall_timeout_s: must be >= 0"):
        label_config(input="a", output="b", model="c", stall_timeout_s=-1)


def test_stages_on_a_hand_made_batch(tiny_checkpoint, coco_mini, tmp_path):
    from pipelines.label.stages import AssembleStage, DecodeStage, NetworkStage, read_objects_batch

    image = sorted((coco_mini / "train2017").glob("*.jpg"))[0]
    (tmp_path / "truncated.jpg").write_bytes(image.read_bytes()[:2000])
    (tmp_path / "text.jpg").write_text("not an image")
    (tmp_path / "empty.jpg").write_bytes(b"")
    uris = [str(image), str(tmp_path / "truncated.jpg"), str(tmp_path / "text.jpg"), str(tmp_path / "empty.jpg"),
            str(tmp_path / "missing.jpg")]
    config = label_config(input="x", output="y", model=tiny_checkpoint, **{"infer.boxsize": 128})
    batch = {"input_index": np.arange(5), "image_id": np.array(uris, dtype=object), "uri": np.array(uris, dtype=object)}
    batch = read_objects_batch(batch, retries=0)
    assert batch["status"].tolist() == ["ok", "ok", "ok", "empty", "read_error"]
    batch = DecodeStage(config.infer, config.max_pixels)(batch)
    assert batch["status"].tolist() == ["ok", "decode_error", "decode_error", "empty", "read_error"]
    assert batch["width"][0] > 0 and batch["pixels_0"][0].shape[2] == 3 and batch["pixels_0"][1].size == 0
    assert "data" not in batch  # the bytes are dropped after decoding
    tiny_limit = DecodeStage(config.infer, max_pixels=100)(read_objects_batch(
        {name: batch[name][:1] for name in ("input_index", "image_id", "uri")}, retries=0))
    assert tiny_limit["status"].tolist() == ["too_large"] and tiny_limit["pixels_0"][0].size == 0
    batch = NetworkStage(tiny_checkpoint, config.infer, config.decoder)(batch)
    assert batch["status"][0] == "ok" and batch["candidates"][0] and batch["forward_batch"][0] == 1
    batch = AssembleStage(config.decoder, config.floor)(batch)
    keypoints = np.frombuffer(batch["pose_keypoints"][0], np.float32).reshape(-1, 17, 3)
    assert keypoints.shape[0] == batch["num_persons"][0] and batch["num_persons"][1:].tolist() == [0] * 4


def test_network_stage_isolates_a_failing_image(tiny_checkpoint):
    from pipelines.label.stages import NetworkStage, pack_inputs
    from simplepose.infer import ScaleInput

    config = label_config(input="x", output="y", model=tiny_checkpoint, **{"infer.boxsize": 64})
    good = [ScaleInput(np.full((64, 64, 3), 100, np.uint8), 1.0, (64, 64), (64, 64))]
    bad = [ScaleInput(np.zeros((60, 64, 3), np.uint8), 1.0, (60, 64), (60, 64))]  # not a multiple of 64
    batch = {"input_index": np.arange(2), "image_id": np.array(["g", "b"], dtype=object),
             "uri": np.array(["g", "b"], dtype=object), "status": np.array(["ok", "ok"], dtype=object),
             "error": np.array(["", ""], dtype=object), "size_bytes": np.zeros(2, np.int64),
             "width": np.full(2, 64), "height": np.full(2, 64),
             **pack_inputs([good, bad], scales=1)}
    out = NetworkStage(tiny_checkpoint, config.infer, config.decoder)(batch)
    assert out["status"].tolist() == ["ok", "inference_error"] and "multiples of 64" in out["error"][1]


def test_registry_model_is_pinned_to_its_version(tiny_checkpoint, tmp_path, monkeypatch):
    from pipelines import registry, tracking
    from pipelines.label.stages import load_model

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    client = tracking.client()
    experiment = tracking.ensure_experiment(client, "label-test", str(tmp_path / "artifacts"))
    run_id = client.create_run(experiment).info.run_id
    client.log_artifact(run_id, tiny_checkpoint, registry.MODEL_ARTIFACT_PATH)
    artifact = tmp_path / "artifacts" / run_id / "artifacts" / registry.MODEL_ARTIFACT_PATH
    (artifact / "tiny.pt").rename(artifact / registry.MODEL_FILE)
    name = f"imhn-{uuid.uuid4().hex[:8]}"  # unique: the registry's download cache outlives the test
    registry.register_checkpoint(client, name, run_id, alias="champion")
    assert registry.describe_model(f"models:/{name}@champion") == (f"models:/{name}/1", name, "1")
    assert load_model(f"models:/{name}/1").training is False


def test_cuda_on_a_cluster_without_gpus_fails_at_once():
    from pipelines.label.graph import resolve_device

    config = label_config(input="a", output="b", model="c", **{"network.device": "cuda"})
    with pytest.raises(ValueError, match="no GPUs"):
        resolve_device(config, {"CPU": 8.0})
    assert resolve_device(label_config(input="a", output="b", model="c"), {"CPU": 8.0}) == "cpu"
    assert resolve_device(label_config(input="a", output="b", model="c"), {"CPU": 8.0, "GPU": 2.0}) == "cuda"


def test_pools_are_sized_from_the_cluster():
    from pipelines.label.graph import pool_sizes

    config = label_config(input="a", output="b", model="c")
    gpu = pool_sizes(config, {"CPU": 32.0, "GPU": 4.0}, "cuda")
    assert gpu["network"] == (1, 4)  # one actor per GPU
    # 32 CPUs - 4 network actors = 28 free (reads are fused into decoding): 15 % to assembly, the rest to decoding
    assert gpu["assemble"] == (1, int(28 * 0.15 / 0.25)) and gpu["decode"] == (1, int((28 - 0.25) / 0.5))
    separate = pool_sizes(label_config(input="a", output="b", model="c", **{"read.cpus": 0.25}),
                          {"CPU": 32.0, "GPU": 4.0}, "cuda")
    assert separate["decode"] == (1, int((27.75 - 0.25) / 0.5))  # separate read tasks keep their CPUs free
    small = pool_sizes(config, {"CPU": 2.0}, "cpu")
    assert small == {"decode": (1, 1), "network": (1, 1), "assemble": (1, 1)}
    fixed = label_config(input="a", output="b", model="c", **{"decode.actors": (2, 3)})
    assert pool_sizes(fixed, {"CPU": 64.0}, "cpu")["decode"] == (2, 3)


def test_network_batch_is_sized_by_bytes():
    assert label_config(input="a", output="b", model="c", **{"infer.boxsize": 512}).network_rows() == 1024
    five = label_config(input="a", output="b", model="c", **{"infer.boxsize": 512, "infer.scales": (0.5, 1, 1.5, 2, 3)})
    assert 16 <= five.network_rows() < 100  # ~17 MB of inputs per image
    assert label_config(input="a", output="b", model="c", **{"network.batch_size": 7}).network_rows() == 7


def test_network_stage_groups_by_shape_into_full_forwards(tiny_checkpoint):
    """Only equal padded shapes share a forward; each row says how many images shared its forward; the
    candidates equal one-by-one runs (torch engine) and the null engine groups the same way."""
    import pickle

    from pipelines.label.stages import NetworkStage, pack_inputs
    from simplepose.infer import ScaleInput

    rng = np.random.default_rng(0)
    shapes = [(64, 64)] * 5 + [(64, 128)] * 3
    inputs = [[ScaleInput(rng.integers(0, 255, (*shape, 3), dtype=np.uint8), 1.0, shape, shape)] for shape in shapes]
    n = len(shapes)
    batch = {"input_index": np.arange(n), "image_id": np.arange(n).astype(str).astype(object),
             "uri": np.arange(n).astype(str).astype(object), "status": np.full(n, "ok", dtype=object),
             "error": np.full(n, "", dtype=object), "size_bytes": np.zeros(n, np.int64),
             "width": np.array([s[1] for s in shapes]), "height": np.array([s[0] for s in shapes]),
             **pack_inputs(inputs, scales=1)}
    config = label_config(input="x", output="y", model=tiny_checkpoint, **{"infer.boxsize": 64})
    stage = NetworkStage(tiny_checkpoint, config.infer, config.decoder, forward_batch_size=4)
    out = stage(batch)
    assert out["forward_batch"].tolist() == [4, 4, 4, 4, 1, 3, 3, 3]
    assert (stage.forwards, stage.images_forwarded) == (3, 8)
    alone = NetworkStage(tiny_checkpoint, config.infer, config.decoder, forward_batch_size=1)
    single = alone({name: column[[6]] for name, column in batch.items()})
    together, apart = pickle.loads(out["candidates"][6]), pickle.loads(single["candidates"][0])
    np.testing.assert_allclose(together.xy, apart.xy, atol=1e-4)
    null = NetworkStage("unused", config.infer, config.decoder, forward_batch_size=4, engine="null")
    out = null(batch)
    assert out["forward_batch"].tolist() == [4, 4, 4, 4, 1, 3, 3, 3]
    assert len(pickle.loads(out["candidates"][0]).types) > 20  # realistic candidates, not an empty stand-in
