"""The labeling job's Ray side: joining or starting Ray, and the Ray Data graph of the stages.

Each stage is its own operator with its own resources (notes/STACK.md §5, P3): reads are light tasks,
decode / network / assembly are actor pools sized by `LabelJobConfig`. On a 2-CPU machine the default
minimum pools take 0.5 + 1 + 0.25 CPUs and leave 0.25 for read tasks (a pool that takes every CPU makes Ray
Data wait forever); pools grow only into CPUs that are free.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable, Iterator, Mapping

import numpy as np

from pipelines import storage
from pipelines.label_stages import AssembleStage, DecodeStage, NetworkStage, read_objects_batch

LOG = logging.getLogger(__name__)

# Before `import ray` (STACK P9, P10): no token-auth file, no usage stats, no C++ actor-argument noise.
BLOCK_BYTES = 1 << 20
"""Target Ray Data block size: a few images' bytes, one or two decoded network inputs."""

QUIET_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_BACKEND_LOG_LEVEL": "fatal"}


@contextlib.contextmanager
def connect_ray(address: str | None = None) -> Iterator[dict[str, float]]:
    """Use the Ray this process is already connected to, join `address` / $RAY_ADDRESS, or start a local
    Ray (stopped again on exit). Yields the cluster's resources ({"CPU": n, "GPU": g, ...})."""
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    import ray
    import ray.data

    started = False
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        LOG.info("%s", f"joining Ray at {address}" if address else "starting a local Ray")
        ray.init(address=address, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
        started = True
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its own logger: ray.init's level does not reach it
    context = ray.data.DataContext.get_current()
    # The job logs its own progress (objects, failures, images/s). Small blocks: a map task turns one input
    # block into one task, so with the default 128 MiB blocks the objects of a whole chunk would go through
    # each stage as one task (no pipelining, no parallelism). Restored on exit: the context is per process.
    settings = {"enable_progress_bars": False, "print_on_execution_start": False,
                "target_max_block_size": BLOCK_BYTES}
    previous = {name: getattr(context, name) for name in settings}
    for name, value in settings.items():
        setattr(context, name, value)
    try:
        yield dict(ray.cluster_resources())
    finally:
        for name, value in previous.items():
            setattr(context, name, value)
        if started:
            ray.shutdown()


def list_chunk_rows(batch: Mapping[str, np.ndarray], storage_options: Mapping | None = None
                    ) -> dict[str, np.ndarray]:
    """{chunk_uri} -> the rows (input_index, image_id, uri) of those frozen input chunks."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = []
    for uri in batch["chunk_uri"]:
        with storage.open_binary(str(uri), storage_options) as f:
            parts.append(pq.read_table(f))
    table = pa.concat_tables(parts)
    return {"input_index": table["input_index"].to_numpy(),
            "image_id": np.asarray(table["image_id"].to_pylist(), dtype=object),
            "uri": np.asarray(table["uri"].to_pylist(), dtype=object)}


def resolve_device(config, resources: Mapping[str, float]) -> tuple[str, str]:
    """(device, precision) of the network actors for this cluster."""
    device = config.device
    if device == "auto":
        device = "cuda" if resources.get("GPU", 0) >= 1 else "cpu"
    precision = config.precision
    if precision == "auto":
        precision = "fp32" if device == "cpu" else "bf16" if _cuda_bf16() else "fp16"
    return device, precision


def _cuda_bf16() -> bool:
    """Whether the driver's GPU (a proxy for the cluster's) supports bf16; assume so without a local GPU."""
    import torch

    return not torch.cuda.is_available() or torch.cuda.is_bf16_supported()


def source(config, chunk_uris: list[str]):
    """The rows (input_index, image_id, uri) of the frozen input chunks, one block per chunk."""
    import ray.data

    dataset = ray.data.from_items([{"chunk_uri": uri} for uri in chunk_uris], override_num_blocks=len(chunk_uris))
    dataset = dataset.map_batches(list_chunk_rows, batch_size=1, num_cpus=config.read_cpus,
                                  fn_kwargs={"storage_options": dict(config.storage_options)})
    return dataset


def stages(config, model_uri: str, resources: Mapping[str, float]) -> list[tuple[str, Callable]]:
    """[(name, dataset -> dataset)] for read, decode, network and assembly, each its own operator."""
    from ray.data import ActorPoolStrategy

    device, precision = resolve_device(config, resources)
    network_resources = {"num_gpus": 1, "num_cpus": 1} if device == "cuda" else {"num_cpus": config.network_cpus}
    network_actors = config.network_actors
    if device == "cuda":  # one GPU each: never more actors than GPUs
        gpus = max(1, int(resources.get("GPU", 1)))
        network_actors = (min(network_actors[0], gpus), gpus)
    LOG.info("network actors %s on %s (%s)", network_actors, device, precision)
    options = dict(config.storage_options)
    infer, decoder = config.infer_config(), config.decoder_config()

    def pool(sizes: tuple[int, int]) -> ActorPoolStrategy:
        return ActorPoolStrategy(min_size=sizes[0], max_size=sizes[1])

    read = dict(fn=read_objects_batch, batch_size=config.read_batch_size, num_cpus=config.read_cpus,
                fn_kwargs={"storage_options": options, "retries": config.read_retries})
    decode = dict(fn=DecodeStage, batch_size=config.decode_batch_size, num_cpus=config.decode_cpus,
                  compute=pool(config.decode_actors),
                  fn_constructor_kwargs={"infer_config": infer, "max_pixels": config.max_pixels})
    network = dict(fn=NetworkStage, batch_size=config.network_batch_size, compute=pool(network_actors),
                   **network_resources,
                   fn_constructor_kwargs={"model_uri": model_uri, "infer_config": infer, "decoder_config": decoder,
                                          "device": device, "precision": precision,
                                          "network_batch_size": config.network_batch_size,
                                          "threads": max(1, int(config.network_cpus)), "storage_options": options})
    assemble = dict(fn=AssembleStage, batch_size=config.assemble_batch_size, num_cpus=config.assemble_cpus,
                    compute=pool(config.assemble_actors), fn_constructor_kwargs={"decoder_config": decoder})
    return [(name, functools.partial(_map_batches, **kwargs))
            for name, kwargs in (("read", read), ("decode", decode), ("network", network), ("assemble", assemble))]


def _map_batches(dataset, fn, **kwargs):
    return dataset.map_batches(fn, **kwargs)


def build_dataset(config, model_uri: str, chunk_uris: list[str], resources: Mapping[str, float]):
    """The lazy Ray Dataset: frozen chunks -> read -> decode -> network -> assembly (one row per object)."""
    dataset = source(config, chunk_uris)
    for _, apply in stages(config, model_uri, resources):
        dataset = apply(dataset)
    return dataset
