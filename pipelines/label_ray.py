"""The labeling job's Ray side: joining or starting Ray, and the Ray Data graph of the stages.

Each stage is its own operator with its own resources (docs/architecture.md): reads are light tasks,
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


from pipelines.label_stages import AssembleStage, DecodeStage, NetworkStage, read_slices_batch

LOG = logging.getLogger(__name__)

# Before `import ray`, so its workers inherit them: no token-auth file, no usage stats, no C++ actor-argument noise.
BLOCK_BYTES = 256 << 20
"""Ray Data's target block size: large enough that a stage's batch (e.g. 64 decoded 512-px inputs, ~64 MB)
stays one block. Blocks are sized by the stages' batch sizes instead: the driver's scheduling cost is per
block, so one image per block (1 MiB blocks) made the driver the bottleneck (~8 ms of its CPU per image)."""

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


def resolve_device(config, resources: Mapping[str, float]) -> str:
    """The network actors' device for this cluster; "cuda" on a cluster without GPUs fails at once."""
    gpus = resources.get("GPU", 0)
    if config.device == "cuda" and gpus < 1:
        raise ValueError(f"device cuda: the Ray cluster has no GPUs (resources: CPU {resources.get('CPU', 0):g}, "
                         f"GPU 0); use --device cpu or auto, or join a cluster with GPU nodes (--address)")
    if config.device == "auto":
        return "cuda" if gpus >= 1 else "cpu"
    return config.device


def source(config, chunk_uris: list[str], chunk_rows: list[int]):
    """Slices of the frozen input chunks, `read_batch_size` objects each, one block per slice: each read
    task lists and fetches one slice, so reads run in parallel even within one chunk."""
    import ray.data

    size = config.read_batch_size
    items = [{"chunk_uri": uri, "start": start, "stop": min(start + size, rows)}
             for uri, rows in zip(chunk_uris, chunk_rows) for start in range(0, rows, size)]
    return ray.data.from_items(items, override_num_blocks=max(1, len(items)))


def pool_sizes(config, resources: Mapping[str, float], device: str) -> dict[str, tuple[int, int]]:
    """(min, max) actor pool sizes of decode, network and assemble; a max of None in the config is sized
    from the cluster: network one actor per GPU (or 1 on CPU); the CPUs left after the network actors and
    one read task go 15 % to assembly (it is light once decoding is bounded) and the rest to decoding."""
    cpus = float(resources.get("CPU", 1))
    low, high = config.network_actors
    if device == "cuda":  # one GPU each: never more actors than GPUs
        gpus = max(1, int(resources.get("GPU", 1)))
        network = (min(low, gpus), min(high or gpus, gpus))
    else:
        network = (low, high or 1)
    network_cpus = 1.0 if device == "cuda" else config.network_cpus
    free = max(0.0, cpus - network[1] * network_cpus - config.read_cpus)

    def sized(sizes, share: float, each: float) -> tuple[int, int]:
        low, high = sizes
        return low, max(low, high if high is not None else int(free * share / each + 1e-9))

    assemble = sized(config.assemble_actors, 0.15, config.assemble_cpus)
    decode = sized(config.decode_actors, 1.0, config.decode_cpus)
    if config.decode_actors[1] is None:  # the decode pool gets what assembly's minimum leaves
        decode = (decode[0], max(decode[0], int((free - assemble[0] * config.assemble_cpus) / config.decode_cpus
                                                + 1e-9)))
    return {"decode": decode, "network": network, "assemble": assemble}


def stages(config, model_uri: str, resources: Mapping[str, float]) -> list[tuple[str, Callable]]:
    """[(name, dataset -> dataset)] for read, decode, network and assembly, each its own operator."""
    from ray.data import ActorPoolStrategy

    device = resolve_device(config, resources)
    pools = pool_sizes(config, resources, device)
    network_resources = {"num_gpus": 1, "num_cpus": 1} if device == "cuda" else {"num_cpus": config.network_cpus}
    LOG.info("actor pools %s; network on %s (%s, engine %s)", pools, device, config.precision, config.engine)
    options = dict(config.storage_options)
    infer, decoder = config.infer_config(), config.decoder_config()
    channels_last = device == "cuda" if config.channels_last is None else config.channels_last

    def pool(name: str) -> ActorPoolStrategy:
        return ActorPoolStrategy(min_size=pools[name][0], max_size=pools[name][1])

    read = dict(fn=read_slices_batch, batch_size=1, num_cpus=config.read_cpus,
                fn_kwargs={"storage_options": options, "retries": config.read_retries})
    decode = dict(fn=DecodeStage, batch_size=config.decode_batch_size, num_cpus=config.decode_cpus,
                  compute=pool("decode"),
                  fn_constructor_kwargs={"infer_config": infer, "max_pixels": config.max_pixels})
    network = dict(fn=NetworkStage, batch_size=config.network_rows(), compute=pool("network"),
                   **network_resources,
                   fn_constructor_kwargs={"model_uri": model_uri, "infer_config": infer, "decoder_config": decoder,
                                          "device": device, "precision": config.precision,
                                          "forward_batch_size": config.forward_batch_size,
                                          "threads": max(1, int(config.network_cpus)), "storage_options": options,
                                          "engine": config.engine, "compile": config.compile,
                                          "channels_last": channels_last})
    assemble = dict(fn=AssembleStage, batch_size=config.assemble_batch_size, num_cpus=config.assemble_cpus,
                    compute=pool("assemble"),
                    fn_constructor_kwargs={"decoder_config": decoder, "floor": config.pose_floor()})
    return [(name, functools.partial(_map_batches, **kwargs))
            for name, kwargs in (("read", read), ("decode", decode), ("network", network), ("assemble", assemble))]


def _map_batches(dataset, fn, **kwargs):
    return dataset.map_batches(fn, **kwargs)


def build_dataset(config, model_uri: str, chunk_uris: list[str], chunk_rows: list[int],
                  resources: Mapping[str, float]):
    """The lazy Ray Dataset: frozen chunk slices -> read -> decode -> network -> assembly (one row per object)."""
    dataset = source(config, chunk_uris, chunk_rows)
    for _, apply in stages(config, model_uri, resources):
        dataset = apply(dataset)
    return dataset
