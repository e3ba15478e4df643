"""Training data: COCO keypoint samples from object storage, augmented in DataLoader worker processes.

Each Ray Train worker reads the annotation JSON once, lists the samples as the authors do (one per main
person, every other person included, crowd and unannotated persons masked: `simplepose.coco`), and feeds
its shard (a `DistributedSampler`) through `loader_workers` processes that fetch, decode, augment and render
targets, so the accelerator never waits. No offline HDF5 step: images are read from `images/<file_name>`, a
batch's images together (`pipelines.storage.read_objects`: concurrent, transient errors retried). Every read goes
through `pipelines.storage` with the caller's `storage_options` (endpoint, credentials; never logged).
Augmentation draws come from a generator seeded by (seed, epoch, sample index), so a sample's augmentation
does not depend on the number of workers or on a restart.
"""
from __future__ import annotations

import ctypes
import dataclasses
import json
import logging
from collections.abc import Mapping

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from pipelines import storage
from simplepose.augment import AugmentConfig, SourceImage
from simplepose.coco import image_masks, load_coco, training_samples
from simplepose.samples import build_samples
from simplepose.targets import TargetConfig

LOG = logging.getLogger(__name__)


class CocoKeypointSamples(Dataset):
    """Item i = (image uint8 (S,S,3) BGR, mask float32 (1,S/4,S/4), targets float32 (50,S/4,S/4)) of training
    sample i, augmented for `epoch` at crop size S = augment_config.crop_size; `__getitems__` builds a batch of
    them as (B, ...) tensors. The training loop makes the images float on its device
    (`simplepose.model.network_input`). `storage_options`: fsspec options of both URIs (endpoint, credentials)."""

    def __init__(self, annotations: str, images: str, augment_config: AugmentConfig = AugmentConfig(),
                 target_config: TargetConfig = TargetConfig(), seed: int = 0, max_samples: int | None = None,
                 storage_options: Mapping[str, object] | None = None):
        self.storage_options = dict(storage_options or {})
        with storage.open_binary(annotations, self.storage_options) as handle:
            self.coco = load_coco(json.load(handle))
        self.samples = training_samples(self.coco)[:max_samples]
        if not self.samples:
            raise ValueError(f"CocoKeypointSamples: {annotations} has no training sample (no person with >= 5 "
                             f"keypoints and area >= 32x32)")
        self.images = images.rstrip("/")
        self.augment_config, self.target_config, self.seed, self.epoch = augment_config, target_config, seed, 0
        LOG.info("%d training samples from %d images of %s", len(self.samples), len(self.coco.imgs), annotations)

    def for_epoch(self, epoch: int, crop_size: int) -> CocoKeypointSamples:
        """A view of the same samples augmented for `epoch` at `crop_size` (shares the annotation index)."""
        view = object.__new__(CocoKeypointSamples)
        view.__dict__.update(self.__dict__, epoch=epoch,
                             augment_config=dataclasses.replace(self.augment_config, crop_size=crop_size))
        return view

    def __len__(self) -> int:
        return len(self.samples)

    def _read_images(self, file_names: list[str]) -> list[np.ndarray]:
        """The BGR images `images/<file_name>`, each distinct object fetched once, all of them together."""
        uris = [f"{self.images}/{name}" for name in file_names]
        distinct = list(dict.fromkeys(uris))  # an image with several main persons is in a batch more than once
        # storage.filesystem, under read_objects, gets fsspec's instance for this process (fsspec keys its cache by
        # process id, so a DataLoader worker forked from the Ray worker makes its own client)
        blobs = dict(zip(distinct, storage.read_objects(distinct, self.storage_options)))
        return [_decode(uri, blobs[uri]) for uri in uris]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(batch[0] for batch in self.__getitems__([index]))

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A whole batch at once (torch's DataLoader calls this with a batch's indices): the targets of all its
        samples are rendered together, straight into the batch tensors (no collate copy; see `make_loader`)."""
        samples = [self.samples[index] for index in indices]
        images = self._read_images([sample.file_name for sample in samples])
        items = [(SourceImage.from_arrays(image, *image_masks(self.coco, sample.image_id)), sample)
                 for image, sample in zip(images, samples)]
        rngs = [np.random.default_rng([self.seed, self.epoch, index]) for index in indices]
        images, masks, targets = build_samples(items, rngs, self.augment_config, self.target_config)
        return torch.from_numpy(images), torch.from_numpy(masks), torch.from_numpy(targets)


def _decode(uri: str, blob: bytes | BaseException) -> np.ndarray:
    """The BGR image in `blob` (what `storage.read_objects` returned for `uri`); a ValueError naming `uri` when
    it could not be read or decoded."""
    if isinstance(blob, BaseException):
        raise ValueError(f"training image {uri} could not be read: {blob}") from blob
    try:
        image = cv2.imdecode(np.frombuffer(blob, np.uint8), cv2.IMREAD_COLOR) if blob else None
    except cv2.error as error:
        raise ValueError(f"training image {uri} could not be read: {error}") from error
    if image is None:
        raise ValueError(f"training image {uri} is not a decodable image")
    return image


def tune_malloc(threshold: int = 64 << 20) -> bool:
    """Serve allocations below `threshold` bytes from the heap instead of fresh mmaps (glibc mallopt
    M_MMAP_THRESHOLD and M_TRIM_THRESHOLD). Sample generation allocates and frees multi-MB arrays per sample;
    with torch imported, glibc maps each one afresh (~1600 page faults per 512 sample), halving the rate
    (measured by `simplepose bench targets --default-malloc`). Returns False where glibc is not available."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, threshold)) and bool(libc.mallopt(m_trim_threshold, 2 * threshold))


def _configure_loader_process(_worker_id: int = 0) -> None:
    # Loader processes run in parallel already; nested OpenCV/torch thread pools would oversubscribe the CPUs.
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    tune_malloc()


def _already_batched(batch):
    """collate_fn for `CocoKeypointSamples.__getitems__`, which returns the batch tensors themselves."""
    return batch


def make_loader(samples: CocoKeypointSamples, epoch: int, crop_size: int, batch_size: int, rank: int,
                world: int, loader_workers: int = 0, prefetch_factor: int = 2, seed: int = 0) -> DataLoader:
    """This rank's shuffled shard of `samples` for `epoch` (full batches only, the same number on every rank)."""
    view = samples.for_epoch(epoch, crop_size)
    if loader_workers == 0:
        tune_malloc()  # samples are made in this process
    else:
        # A process forked while OpenCV's thread pool runs inherits a pool without threads, and the workers'
        # first parallel OpenCV call hangs (measured); one thread here stops the pool before the fork.
        cv2.setNumThreads(1)
    sampler = DistributedSampler(view, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    return DataLoader(view, batch_size=batch_size, sampler=sampler, drop_last=True, num_workers=loader_workers,
                      collate_fn=_already_batched, pin_memory=torch.cuda.is_available(),
                      worker_init_fn=_configure_loader_process,
                      prefetch_factor=prefetch_factor if loader_workers else None,
                      persistent_workers=False)

