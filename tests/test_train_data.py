"""Training data loader (pipelines.train.data): batches built whole by `__getitems__`, equal to the samples one
by one, deterministic per (seed, epoch, index), the same through worker processes; read from S3 through the
caller's storage options."""
from __future__ import annotations

import uuid

import boto3
import fsspec
import numpy as np
import pytest
import torch

from pipelines.train.data import CocoKeypointSamples, make_loader
from simplepose.augment import AugmentConfig


@pytest.fixture(scope="module")
def samples(coco_mini_annotations, coco_mini):
    return CocoKeypointSamples(str(coco_mini_annotations), str(coco_mini / "train2017"),
                               AugmentConfig(crop_size=128), max_samples=6)


def test_a_batch_equals_its_items(samples):
    view = samples.for_epoch(1, 128)
    images, masks, targets = view.__getitems__([4, 0, 2])
    assert images.shape == (3, 128, 128, 3) and images.dtype == torch.uint8
    assert masks.shape == (3, 1, 32, 32) and targets.shape == (3, 50, 32, 32)
    for row, index in enumerate([4, 0, 2]):
        image, mask, target = view[index]
        torch.testing.assert_close(images[row], image, rtol=0, atol=0)
        torch.testing.assert_close(masks[row], mask, rtol=0, atol=0)
        torch.testing.assert_close(targets[row], target, rtol=0, atol=1e-7)
    other_epoch = samples.for_epoch(2, 128)[4][0]
    assert not torch.equal(other_epoch, images[0])  # a new augmentation each epoch


@pytest.mark.parametrize("workers", [0, 1])
def test_loader_yields_whole_batches(samples, workers):
    loader = make_loader(samples, epoch=0, crop_size=128, batch_size=3, rank=0, world=1, loader_workers=workers)
    batches = list(loader)
    assert len(batches) == 2
    images, masks, targets = batches[0]
    assert images.shape == (3, 128, 128, 3) and masks.shape == (3, 1, 32, 32) and targets.shape == (3, 50, 32, 32)
    assert float(targets[:, 30:48].max()) > 0.9 and 0 <= float(masks.min()) <= float(masks.max()) <= 1
    first = np.concatenate([b[0].numpy() for b in batches])
    again = np.concatenate([b[0].numpy() for b in make_loader(samples, 0, 128, 3, 0, 1, workers)])
    np.testing.assert_array_equal(first, again)  # deterministic per (seed, epoch, index)


def test_annotations_and_images_are_read_through_storage_options(s3_endpoint, samples, coco_mini,
                                                                 coco_mini_annotations, monkeypatch):
    """With no endpoint in the environment, the loopback S3 server is reachable only through the options."""
    bucket = f"train-data-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    names = {sample.file_name for sample in samples.samples}
    fsspec.filesystem("s3", endpoint_url=s3_endpoint).pipe(
        {f"{bucket}/annotations.json": coco_mini_annotations.read_bytes(),
         **{f"{bucket}/train2017/{name}": (coco_mini / "train2017" / name).read_bytes() for name in names}})
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    on_s3 = CocoKeypointSamples(f"s3://{bucket}/annotations.json", f"s3://{bucket}/train2017/",
                                AugmentConfig(crop_size=128), max_samples=6,
                                storage_options={"endpoint_url": s3_endpoint})
    assert [s.file_name for s in on_s3.samples] == [s.file_name for s in samples.samples]
    for got, expected in zip(on_s3.for_epoch(1, 128).__getitems__([4, 0, 2]),
                             samples.for_epoch(1, 128).__getitems__([4, 0, 2])):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
