"""The labeling job's Ray Data graph: one operator per stage, pools sized from the cluster.

Each stage is its own `map_batches` with its own resources (docs/architecture.md): read, then decode /
network / assembly actor pools sized by `LabelJobConfig`. By default reads take the decode actors' CPUs, and
Ray Data fuses them into the decode actors (one operator less); with `read.cpus` set they stay separate
tasks, which must then find a free CPU beside the pools (a pool that takes every CPU makes Ray Data wait
forever). Pools grow only into CPUs that are free.

Ray is imported inside the functions: the job imports this module before `pipelines.ray_cluster.connect_ray`
has set Ray's environment (docs/architecture.md, "Ray and the stack").
"""
from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator, Mapping

from pipelines.label.stages import AssembleStage, DecodeStage, NetworkStage, read_slices_batch

LOG = logging.getLogger(__name__)

BLOCK_BYTES = 256 << 20
"""Ray Data's target block size: large enough that a stage's batch (e.g. 64 decoded 512-px inputs, ~64 MB)
stays one block. Blocks are sized by the stages' batch sizes instead: the driver's scheduling cost is per
block, so one image per block (1 MiB blocks) made the driver the bottleneck (~8 ms of its CPU per image)."""


@contextlib.contextmanager
def data_context() -> Iterator[None]:
    """Ray Data settings of the labeling job for the duration of one run, restored on exit (the context is per
    process): no progress bars (the job logs its own progress: objects, failures, images/s), `BLOCK_BYTES`."""
    import ray.data

    context = ray.data.DataContext.get_current()
    settings = {"enable_progress_bars": False, "print_on_execution_start": False,
                "target_max_block_size": BLOCK_BYTES}
    previous = {name: getattr(context, name) for name in settings}
    for name, value in settings.items():
        setattr(context, name, value)
    try:
        yield
    finally:
        for name, value in previous.items():
            setattr(context, name, value)


def resolve_device(config, resources: Mapping[str, float]) -> str:
    """The network actors' device for this cluster; "cuda" on a cluster without GPUs fails at once; engine
    onnxruntime runs on CPUs (its "auto" is "cpu")."""
    gpus = resources.get("GPU", 0)
    if config.network.device == "cuda" and gpus < 1:
        raise ValueError(f"device cuda: the Ray cluster has no GPUs (resources: CPU {resources.get('CPU', 0):g}, "
                         f"GPU 0); use --device cpu or auto, or join a cluster with GPU nodes (--address)")
    if config.network.device == "auto":
        return "cuda" if gpus >= 1 and config.network.engine != "onnxruntime" else "cpu"
    return config.network.device


def source(config, chunk_uris: list[str], chunk_rows: list[int]):
    """Slices of the frozen input chunks, `read.batch_size` objects each, one block per slice: each read call
    lists and fetches one slice, so reads run in parallel even within one chunk."""
    import ray.data

    size = config.read.batch_size
    items = [{"chunk_uri": uri, "start": start, "stop": min(start + size, rows)}
             for uri, rows in zip(chunk_uris, chunk_rows) for start in range(0, rows, size)]
    return ray.data.from_items(items, override_num_blocks=max(1, len(items)))


def pool_sizes(config, resources: Mapping[str, float], device: str) -> dict[str, tuple[int, int]]:
    """(min, max) actor pool sizes of decode, network and assemble; a max of None in the config is sized
    from the cluster: network one actor per GPU (or 1 on CPU); the CPUs left after the network actors and
    separate read tasks (none when reads are fused into decoding) go 15 % to assembly (it is light once
    decoding is bounded) and the rest to decoding."""
    cpus = float(resources.get("CPU", 1))
    low, high = config.network.actors
    if device == "cuda":  # one GPU each: never more actors than GPUs
        gpus = max(1, int(resources.get("GPU", 1)))
        network = (min(low, gpus), min(high or gpus, gpus))
    else:
        network = (low, high or 1)
    network_cpus = 1.0 if device == "cuda" else config.network.cpus
    reads = 0.0 if config.read.cpus is None else config.read.cpus  # fused reads use the decode actors' CPUs
    free = max(0.0, cpus - network[1] * network_cpus - reads)

    def sized(sizes, share: float, each: float) -> tuple[int, int]:
        low, high = sizes
        return low, max(low, high if high is not None else int(free * share / each + 1e-9))

    assemble = sized(config.assemble.actors, 0.15, config.assemble.cpus)
    decode = sized(config.decode.actors, 1.0, config.decode.cpus)
    if config.decode.actors[1] is None:  # the decode pool gets what assembly's minimum leaves
        decode = (decode[0], max(decode[0], int((free - assemble[0] * config.assemble.cpus) / config.decode.cpus
                                                + 1e-9)))
    return {"decode": decode, "network": network, "assemble": assemble}


def stages(config, model_uri: str, resources: Mapping[str, float]) -> list[tuple[str, Callable]]:
    """[(name, dataset -> dataset)] for read, decode, network and assembly, each its own operator."""
    from ray.data import ActorPoolStrategy

    device = resolve_device(config, resources)
    pools = pool_sizes(config, resources, device)
    network_resources = {"num_gpus": 1, "num_cpus": 1} if device == "cuda" else {"num_cpus": config.network.cpus}
    LOG.info("actor pools %s; network on %s (%s, engine %s)", pools, device, config.network.precision,
             config.network.engine)
    options = dict(config.storage_options)
    infer, decoder = config.infer, config.decoder
    channels_last = device == "cuda" if config.network.channels_last is None else config.network.channels_last

    def pool(name: str) -> ActorPoolStrategy:
        return ActorPoolStrategy(min_size=pools[name][0], max_size=pools[name][1])

    read = dict(fn=read_slices_batch, batch_size=1, num_cpus=config.read_cpus(),
                fn_kwargs={"storage_options": options, "retries": config.read.retries})
    decode = dict(fn=DecodeStage, batch_size=config.decode.batch_size, num_cpus=config.decode.cpus,
                  compute=pool("decode"),
                  fn_constructor_kwargs={"infer_config": infer, "max_pixels": config.max_pixels})
    network = dict(fn=NetworkStage, batch_size=config.network_rows(), compute=pool("network"),
                   **network_resources,
                   fn_constructor_kwargs={"model_uri": model_uri, "infer_config": infer, "decoder_config": decoder,
                                          "device": device, "precision": config.network.precision,
                                          "forward_batch_size": config.network.forward_batch_size,
                                          "threads": max(1, int(config.network.cpus)), "storage_options": options,
                                          "engine": config.network.engine, "compile": config.network.compile,
                                          "channels_last": channels_last})
    assemble = dict(fn=AssembleStage, batch_size=config.assemble.batch_size, num_cpus=config.assemble.cpus,
                    compute=pool("assemble"),
                    fn_constructor_kwargs={"decoder_config": decoder, "floor": config.floor})
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
