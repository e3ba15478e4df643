#!/usr/bin/env python3
"""One-shot GPU check (issue #9 item 5): everything a lent GPU machine should measure, in one command.

    python scripts/gpu_check.py              # on a bare machine with an NVIDIA GPU, <= 8 minutes (make gpu-check)
    python scripts/gpu_check.py --smoke      # the same code on tiny configurations, on a CPU, < 1 minute

Prints ONE JSON object as the last line of stdout (progress goes to stderr), with one key per section:

  env              python, torch, device, which optional packages were found (pycocotools, Pillow)
  network          the released IMHN (random weights) in bf16: eager / channels_last / torch.compile at batch
                   1, 8, 32 -> images/s, peak memory MB
  precision        the largest |bf16 - fp32| over the output maps (same input, same weights)
  label_stage      `pipelines.label.stages.NetworkStage` alone (no Ray) on decoded + preprocessed coco-mini
                   photos (boxsize 512, flip, "stride4", decoder tensor stage) -> images/s, forward batch fill
  training         50 steps of the released IMHN at 384x384 with fp16 + GradScaler and with bf16, the project's
                   loss and targets -> images/s, losses finite
  learning         a small IMHN overfits coco-mini train (<= 4 min), then COCO AP on those images

Each section runs under its own guard and time share of `--budget-s` (unused time passes to the next ones);
a failing section records `error` and the script goes on; a watchdog prints what was measured and exits if
the whole budget is overrun. Needs torch, numpy, opencv, numba, fsspec, pyarrow; never imports Ray, MLflow
or s3fs. pycocotools (targets and COCOeval) is optional: if it is not importable, wheels found in `--wheels`
(default `.whl/` in the repository) are unpacked into a temporary folder and put on sys.path; else the
sections that need it say why they were skipped or used random targets.
"""
from __future__ import annotations

import argparse
import glob
import inspect
import json
import math
import os
import pickle
import sys
import tempfile
import threading
import time
import traceback
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # runs as `python scripts/gpu_check.py` without installing the project
    sys.path.insert(0, str(REPO))

RELEASED = {"stacks": 4, "width": 256, "increase": 128, "outputs": 50}
RELEASED_PARAMETERS = 128_998_760

# Section -> share of the remaining budget (a section gets remaining * share / sum of the shares still to run).
SHARES = {"env": 0.01, "network": 0.36, "precision": 0.03, "label_stage": 0.10, "training": 0.10, "learning": 0.40}

FULL = {
    "device": "cuda", "network_size": 512, "network_batches": [1, 8, 32], "network_iters": 10,
    "model": RELEASED, "stage_boxsize": 512, "stage_images": 640, "stage_ray_batch": 256,
    "stage_forward_batch": 16, "train_size": 384, "train_batch": 16, "train_steps": 50,
    "learn_model": {"stacks": 2, "width": 128, "increase": 64}, "learn_crop": 256, "learn_batch": 16,
    "learn_max_s": 240.0, "learn_max_steps": 0, "learn_boxsize": 384, "learn_eval_images": 0,
    "loader_workers": 8, "budget_s": 450.0, "compile_backend": "inductor",
    "cpu_threads": 0,
}
SMOKE = {
    "device": "cpu", "network_size": 64, "network_batches": [1, 2], "network_iters": 2,
    "model": {"stacks": 1, "width": 32, "increase": 8, "outputs": 50}, "stage_boxsize": 128, "stage_images": 4,
    "stage_ray_batch": 4, "stage_forward_batch": 2, "train_size": 64, "train_batch": 2, "train_steps": 2,
    "learn_model": {"stacks": 1, "width": 32, "increase": 8}, "learn_crop": 64, "learn_batch": 2,
    "learn_max_s": 10.0, "learn_max_steps": 3, "learn_boxsize": 128, "learn_eval_images": 3,
    "loader_workers": 0, "budget_s": 150.0, "compile_backend": "aot_eager",
    "cpu_threads": 1,  # one torch thread: on a shared 2-core VM, two threads stall each other's oneDNN kernels
}
SMOKE_COMPILE_NOTE = ("smoke runs torch.compile with backend aot_eager (Dynamo capture + AOTAutograd, no code "
                      "generation): inductor's C++ code generation for the tiny IMHN took 92 s per batch size on the "
                      "2-core development VM (measured, load average ~8), too slow for a test; "
                      "--set compile_backend='\"inductor\"' runs it anyway")


def log(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:500]


def finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


# --------------------------------------------------------------------------------------------------- helpers
def find_data(explicit: str | None) -> Path | None:
    """coco-mini: --data, $SIMPLEPOSE_SHARED/data/coco-mini, REPO/shared/..., REPO/../shared/... (first found)."""
    candidates = [Path(explicit)] if explicit else []
    if os.environ.get("SIMPLEPOSE_SHARED"):
        candidates.append(Path(os.environ["SIMPLEPOSE_SHARED"]) / "data" / "coco-mini")
    candidates += [REPO / "shared" / "data" / "coco-mini", REPO.parent / "shared" / "data" / "coco-mini"]
    for path in candidates:
        if (path / "annotations" / "person_keypoints_train2017.json").is_file() and (path / "train2017").is_dir():
            return path
    return None


def ensure_pycocotools(wheels: str | None) -> str:
    """'installed', 'from wheels: ...' or 'missing: reason'. Wheels (zip files) are unpacked, not pip-installed:
    a binary wheel's extension module cannot be imported from inside the zip."""
    try:
        import pycocotools.mask  # noqa: F401
        return "installed"
    except ImportError as error:
        first = describe(error)
    folder = Path(wheels) if wheels else REPO / ".whl"
    found = sorted(glob.glob(str(folder / "pycocotools-*.whl")))
    if not found:
        return f"missing: {first}; no pycocotools-*.whl in {folder}"
    target = Path(tempfile.mkdtemp(prefix="gpu_check_wheels_"))
    for wheel in found:
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(target)
    sys.path.insert(0, str(target))
    try:
        import pycocotools.mask  # noqa: F401,F811
        return f"from wheels: {', '.join(Path(w).name for w in found)}"
    except ImportError as error:
        return f"missing: {first}; the wheels in {folder} did not import: {describe(error)}"


def have_pycocotools(results: dict) -> bool:
    """results: the whole results dict, or the env section itself."""
    env = results.get("env", results)
    return str(env.get("pycocotools", "")).startswith(("installed", "from wheels"))


class Clock:
    """Times a section; `left()` is what remains of its allowance."""

    def __init__(self, allowance: float):
        self.start, self.allowance = time.perf_counter(), allowance

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.allowance - self.elapsed()


def synchronize(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_mb(device):
    import torch

    if torch.device(device).type == "cuda":
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return None  # no allocator statistics on the CPU


def build_imhn(spec: dict, seed: int = 0):
    import torch

    from simplepose.model import IMHN

    torch.manual_seed(seed)
    return IMHN(**spec)


# --------------------------------------------------------------------------------------------------- sections
def section_env(cfg: dict, args, clock: Clock) -> dict:
    import numpy as np
    import torch

    out = {"python": sys.version.split()[0], "torch": torch.__version__, "numpy": np.__version__,
           "cuda_available": torch.cuda.is_available(), "device": cfg["device"], "smoke": bool(args.smoke),
           "budget_s": cfg["budget_s"], "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
        out["gpu_memory_mb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**20)
        out["bf16_supported"] = torch.cuda.is_bf16_supported()
        out["cuda"] = torch.version.cuda
    out["pycocotools"] = ensure_pycocotools(args.wheels)
    try:
        import PIL

        out["pillow"] = PIL.__version__
    except ImportError as error:
        out["pillow"] = f"missing: {describe(error)}"
    out["ray_imported"] = "ray" in sys.modules
    data = find_data(args.data)
    out["data"] = str(data) if data else None
    return out


def _time_forward(model, x, iters: int, device, clock: Clock, min_left: float = 0.0) -> tuple[float, float]:
    """(seconds of the first call, median seconds per forward over `iters` timed calls after one warm-up)."""
    start = time.perf_counter()
    model(x)
    synchronize(device)
    first = time.perf_counter() - start
    model(x)  # second warm-up (cudnn benchmark / compiled graph replay settle)
    synchronize(device)
    times = []
    for _ in range(iters):
        if times and clock.left() < min_left:
            break
        start = time.perf_counter()
        model(x)
        synchronize(device)
        times.append(time.perf_counter() - start)
    times.sort()
    return first, times[len(times) // 2]


def section_network(cfg: dict, args, clock: Clock, results: dict) -> dict:
    import torch

    device = torch.device(cfg["device"])
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model = build_imhn(cfg["model"]).eval().to(device)
    out = {"config": dict(cfg["model"]), "size": cfg["network_size"], "precision": "bf16",
           "parameters": sum(p.numel() for p in model.parameters()), "runs": []}
    results["network"] = out  # partial results survive a watchdog exit
    if cfg["model"] == RELEASED:
        out["parameters_match_release"] = out["parameters"] == RELEASED_PARAMETERS
    size = cfg["network_size"]
    modes = ["eager", "channels_last", "compile"]
    out["compile_backend"] = cfg["compile_backend"]
    if args.smoke and cfg["compile_backend"] != "inductor":
        out["compile_note"] = SMOKE_COMPILE_NOTE
    if args.no_compile:
        modes.remove("compile")
        out["compile_skipped"] = "--no-compile"
    compiled = None
    for mode in modes:
        for batch in (cfg["network_batches"] if mode != "compile" else sorted(cfg["network_batches"], reverse=True)):
            run = {"mode": mode, "batch": batch}
            out["runs"].append(run)
            # compile costs a (re)compilation per batch size: start one only with time for it
            need = 45.0 if (mode == "compile" and device.type == "cuda") else 3.0
            if clock.left() < need:
                run["skipped"] = f"time budget: {clock.left():.0f} s left of the section, {need:.0f} s needed"
                continue
            try:
                channels_last = mode != "eager"
                net = model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
                if mode == "compile":
                    if compiled is None:
                        compiled = torch.compile(net, backend=cfg["compile_backend"])
                    net = compiled
                x = torch.rand(batch, 3, size, size, device=device)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                reset_peak(device)
                with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
                    first, per_batch = _time_forward(net, x, cfg["network_iters"], device, clock)
                run.update(images_per_s=round(batch / per_batch, 2), ms_per_batch=round(per_batch * 1e3, 3),
                           first_call_s=round(first, 2), peak_memory_mb=peak_mb(device))
                log(f"network {mode} batch {batch}: {run['images_per_s']} images/s")
            except Exception as error:  # one configuration failing (e.g. compile) must not hide the others
                run["error"] = describe(error)
                log(f"network {mode} batch {batch} failed: {run['error']}")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    best = [r["images_per_s"] for r in out["runs"] if "images_per_s" in r]
    out["best_images_per_s"] = max(best) if best else None
    return out


def section_precision(cfg: dict, args, clock: Clock) -> dict:
    """max |bf16 - fp32| over every output map (all stacks and scales) and over the last stack's stride-4 map,
    with the fp32 maps' own max |value| for scale."""
    import torch

    device = torch.device(cfg["device"])
    model = build_imhn(cfg["model"]).eval().to(device)
    torch.manual_seed(1)
    x = torch.rand(1, 3, cfg["network_size"], cfg["network_size"], device=device)
    with torch.inference_mode():
        with torch.autocast(device.type, enabled=False):
            if device.type == "cuda":  # a true fp32 reference: no TF32 in the convolutions
                tf32 = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
                torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
            reference = model(x)
            if device.type == "cuda":
                torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
        with torch.autocast(device.type, dtype=torch.bfloat16):
            low = model(x)
    diffs = [(a.float() - b.float()).abs().max().item() for sa, sb in zip(reference, low) for a, b in zip(sa, sb)]
    last = (reference[-1][0].float() - low[-1][0].float()).abs()
    scale = max(a.abs().max().item() for s in reference for a in s)
    return {"max_abs_diff": max(diffs), "max_abs_diff_last_stride4": last.max().item(),
            "mean_abs_diff_last_stride4": last.mean().item(), "max_abs_fp32": scale,
            "max_rel_diff": max(diffs) / scale if scale else None, "size": cfg["network_size"],
            "outputs_compared": len(diffs)}


def _stage_inputs(cfg: dict, data: Path, infer_config, count: int):
    """coco-mini photos decoded (`pipelines.images.decode_image`) and preprocessed (`simplepose.infer.preprocess`)
    as `DecodeStage` does, cycled to `count` rows: (rows of image columns, per-row preprocess output)."""
    from pipelines.images import decode_image
    from simplepose.infer import preprocess

    files = sorted((data / "train2017").glob("*.jpg"))
    rows, inputs, cache = [], [], {}
    for i in range(count):
        path = files[i % len(files)]
        if path not in cache:
            blob = path.read_bytes()
            decoded = decode_image(blob)
            if decoded.status != "ok":
                raise ValueError(f"{path.name}: {decoded.status} {decoded.error}")
            cache[path] = (len(blob), decoded.width, decoded.height, preprocess(decoded.image, infer_config))
        size_bytes, width, height, prepared = cache[path]
        rows.append({"input_index": i, "image_id": path.stem, "uri": str(path), "status": "ok", "error": "",
                     "size_bytes": size_bytes, "width": width, "height": height})
        inputs.append(prepared)
    return rows, inputs


def stage_batch(stages, rows: list[dict], inputs: list, scales: int) -> dict:
    """The NetworkStage's input batch, built with the stage module's own helpers where they exist
    (`pack_inputs`: per-scale tensor columns); else the older pickled `inputs` column."""
    import numpy as np

    columns = getattr(stages, "IMAGE_COLUMNS", ("input_index", "image_id", "uri", "status", "error", "size_bytes",
                                                "width", "height"))
    kinds = {"input_index": np.int64, "size_bytes": np.int64, "width": np.int32, "height": np.int32}
    batch = {}
    for name in columns:
        values = [row.get(name) for row in rows]
        if name in kinds:
            batch[name] = np.asarray(values, kinds[name])
        else:
            column = np.empty(len(values), dtype=object)
            column[:] = values
            batch[name] = column
    if hasattr(stages, "pack_inputs"):
        batch.update(stages.pack_inputs(inputs, scales))
    else:
        column = np.empty(len(inputs), dtype=object)
        column[:] = [pickle.dumps(item, protocol=5) for item in inputs]
        batch["inputs"] = column
    return batch


def build_network_stage(stages, model_uri: str, infer_config, decoder_config, device: str, precision: str,
                        forward_batch: int, channels_last: bool):
    """Construct `NetworkStage` with whichever of its keyword arguments exist (its signature is changing)."""
    params = inspect.signature(stages.NetworkStage).parameters
    kwargs = {}
    for name in ("forward_batch_size", "network_batch_size"):
        if name in params:
            kwargs[name] = forward_batch
    if "channels_last" in params:
        kwargs["channels_last"] = channels_last
    if "threads" in params:
        kwargs["threads"] = torch_threads() if device == "cpu" else 1
    used = sorted(kwargs)
    return stages.NetworkStage(model_uri, infer_config, decoder_config, device=device, precision=precision,
                               **kwargs), used


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


class ForwardCounter:
    """Counts the model's forwards and their batch sizes with a forward pre-hook (no change to project code)."""

    def __init__(self, model, flip: bool):
        import torch

        self.calls, self.inputs, self.flip = 0, 0, flip
        module = getattr(model, "_orig_mod", model)
        self.handle = module.register_forward_pre_hook(self._hook) if isinstance(module, torch.nn.Module) else None

    def _hook(self, _module, args):
        self.calls += 1
        self.inputs += int(args[0].shape[0]) // (2 if self.flip else 1)

    def reset(self):
        self.calls = self.inputs = 0


def section_label_stage(cfg: dict, args, clock: Clock, results: dict) -> dict:
    import numpy as np
    import torch

    from pipelines.label import stages
    from simplepose.checkpoint import save_checkpoint
    from simplepose.decode import DecoderConfig
    from simplepose.infer import InferConfig

    data = find_data(args.data)
    if data is None:
        raise FileNotFoundError("coco-mini not found (--data, $SIMPLEPOSE_SHARED, shared/ or ../shared)")
    device = cfg["device"]
    precision = "bf16"
    # as the labeling actor runs: it leaves cudnn.benchmark off (forward shapes vary with each Ray batch)
    torch.backends.cudnn.benchmark = False
    infer_config = InferConfig(boxsize=cfg["stage_boxsize"], scales=(1.0,), flip=True, aggregation="stride4")
    decoder_config = DecoderConfig()
    with tempfile.TemporaryDirectory() as folder:
        model_uri = os.path.join(folder, "imhn.pt")
        save_checkpoint(build_imhn(cfg["model"]), model_uri)
        stage, used = build_network_stage(stages, model_uri, infer_config, decoder_config, device, precision,
                                          cfg["stage_forward_batch"], channels_last=device == "cuda")
    model = getattr(stage, "model", None)
    counter = ForwardCounter(model, infer_config.flip) if model is not None else None
    rows, inputs = _stage_inputs(cfg, data, infer_config, cfg["stage_images"])
    shapes = sorted({tuple(item[0].image.shape[:2]) for item in inputs})
    batches = [stage_batch(stages, rows[k:k + cfg["stage_ray_batch"]], inputs[k:k + cfg["stage_ray_batch"]], 1)
               for k in range(0, len(rows), cfg["stage_ray_batch"])]
    out = {"boxsize": cfg["stage_boxsize"], "precision": precision, "device": device, "images": len(rows),
           "ray_batch": cfg["stage_ray_batch"], "forward_batch_size": cfg["stage_forward_batch"],
           "padded_shapes": len(shapes), "stage_kwargs": used, "cudnn_benchmark": False,
           "input_format": "pack_inputs" if hasattr(stages, "pack_inputs") else "pickled inputs"}
    # warm-up: one pass over every distinct photo (cudnn picks algorithms per padded shape), not timed
    distinct = min(len(rows), len(list((data / "train2017").glob("*.jpg"))))
    warm = stage_batch(stages, rows[:distinct], inputs[:distinct], 1)
    start = time.perf_counter()
    stage(warm)
    synchronize(device)
    out["warmup_s"] = round(time.perf_counter() - start, 2)
    before = (getattr(stage, "forwards", None), getattr(stage, "images_forwarded", None))
    if counter:
        counter.reset()
    outputs, start, done = [], time.perf_counter(), 0
    for batch in batches:
        if outputs and clock.left() < 2.0:
            out["stopped_early"] = f"time budget after {done} images"
            break
        outputs.append(stage(batch))
        done += len(batch["uri"])
    synchronize(device)
    seconds = time.perf_counter() - start
    statuses = np.concatenate([o["status"] for o in outputs])
    out.update(seconds=round(seconds, 3), images_timed=done, images_per_s=round(done / seconds, 2),
               ok=int((statuses == "ok").sum()))
    errors = sorted({str(e) for o in outputs for e in o["error"] if e})
    if errors:
        out["errors"] = errors[:5]
    # forward batch fill: the stage's own counters, else its forward_batch column, else the forward hook
    mean, source = None, None
    if before[0] is not None and before[1] is not None:
        forwards = stage.forwards - before[0]
        if forwards:
            mean, source = (stage.images_forwarded - before[1]) / forwards, "stage.forwards/images_forwarded"
    if mean is None and all("forward_batch" in o for o in outputs):
        shared = np.concatenate([np.asarray(o["forward_batch"], np.float64) for o in outputs])
        shared = shared[shared > 0]
        if len(shared):
            mean, source = len(shared) / float((1.0 / shared).sum()), "forward_batch column"
    if counter is not None and counter.calls:
        out["hook_forwards"], out["hook_mean_images_per_forward"] = counter.calls, counter.inputs / counter.calls
        if mean is None:
            mean, source = counter.inputs / counter.calls, "forward hook"
    out["mean_images_per_forward"] = mean
    out["forward_batch_fill"] = mean / cfg["stage_forward_batch"] if mean is not None else None
    out["fill_source"] = source
    return out


def _training_batches(cfg: dict, args, results: dict, size: int, batch: int, count: int, seed: int = 0):
    """(list of (images uint8 (B,S,S,3), masks, targets) CPU tensors, description of where they came from).
    The project's samples (`pipelines.train.data.CocoKeypointSamples`: augmentation + targets of coco-mini) when
    pycocotools and the data are there; else random targets of the right shapes."""
    import torch

    data = find_data(args.data)
    if have_pycocotools(results) and data is not None:
        from pipelines.train.data import CocoKeypointSamples
        from simplepose.augment import AugmentConfig

        samples = CocoKeypointSamples(str(data / "annotations" / "person_keypoints_train2017.json"),
                                      str(data / "train2017"), AugmentConfig(crop_size=size), seed=seed)
        view = samples.for_epoch(0, size)
        n = len(view)
        out = [view.__getitems__([(k * batch + j) % n for j in range(batch)]) for k in range(count)]
        return out, f"coco-mini samples (pipelines.train.data.CocoKeypointSamples, {n} samples)"
    reason = results.get("env", {}).get("pycocotools") if data is not None else "coco-mini not found"
    generator = torch.Generator().manual_seed(seed)
    grid = size // 4
    out = [(torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, generator=generator),
            torch.ones(batch, 1, grid, grid), torch.rand(batch, 50, grid, grid, generator=generator))
           for _ in range(count)]
    return out, f"random targets ({reason})"


def _train_steps(model, optimizer, batches, steps: int, amp_dtype, use_scaler: bool, device, loss_config,
                 clock: Clock | None = None, max_seconds: float | None = None, warmup: int = 0,
                 lr_at=None) -> dict:
    """The training step of `pipelines.train.train_loop` (autocast forward, `multitask_loss`, GradScaler)."""
    import torch

    from simplepose.loss import multitask_loss
    from simplepose.model import network_input

    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    losses, timed_images, timed_start, step = [], 0, None, 0
    model.train()
    while steps <= 0 or step < steps:
        if step == warmup:
            synchronize(device)
            timed_start = time.perf_counter()
        if max_seconds is not None and timed_start is not None and time.perf_counter() - timed_start > max_seconds:
            break
        if clock is not None and clock.left() < 0 and step > warmup:
            break
        images, masks, targets = batches[step % len(batches)] if isinstance(batches, list) else next(batches)
        images, masks, targets = (t.to(device, non_blocking=True) for t in (images, masks, targets))
        if lr_at is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            predictions = model(network_input(images))
        loss, _ = multitask_loss(predictions, targets, masks, loss_config)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.detach())
        if step >= warmup:
            timed_images += images.shape[0]
        step += 1
    synchronize(device)
    seconds = time.perf_counter() - timed_start if timed_start is not None else 0.0
    values = [float(v) for v in losses]
    return {"steps": step, "timed_steps": step - warmup, "seconds": round(seconds, 3),
            "images_per_s": round(timed_images / seconds, 2) if seconds > 0 and timed_images else None,
            "loss_first": values[0] if values else None, "loss_last": values[-1] if values else None,
            "losses_finite": bool(values) and all(math.isfinite(v) for v in values),
            "loss_scale": float(scaler.get_scale()) if use_scaler else None, "_losses": values}


def section_training(cfg: dict, args, clock: Clock, results: dict) -> dict:
    import torch

    from simplepose.loss import LossConfig

    device = torch.device(cfg["device"])
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed training shapes: let cudnn pick algorithms
    size, steps = cfg["train_size"], cfg["train_steps"]
    batches, source = _training_batches(cfg, args, results, size, cfg["train_batch"], count=4)
    out = {"config": dict(cfg["model"]), "size": size, "batch": cfg["train_batch"], "steps": steps,
           "targets": source, "loss": "reference (focal L2)", "optimizer": "Adam lr 1e-4", "runs": {}}
    results["training"] = out  # partial results survive a watchdog exit
    for name, dtype, scaler in (("fp16_gradscaler", torch.float16, True), ("bf16", torch.bfloat16, False)):
        if clock.left() < 3.0:
            out["runs"][name] = {"skipped": f"time budget: {clock.left():.0f} s left of the section"}
            continue
        model = optimizer = None
        try:
            for attempt in (0, 1):  # out of GPU memory: once more at half the batch
                try:
                    model = build_imhn(cfg["model"]).to(device)
                    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
                    reset_peak(device)
                    run = _train_steps(model, optimizer, batches, steps, dtype, scaler, device, LossConfig(),
                                       clock=clock, warmup=min(3, max(steps - 1, 0)))
                    break
                except torch.OutOfMemoryError as error:
                    model = optimizer = None
                    torch.cuda.empty_cache()
                    half = batches[0][0].shape[0] // 2
                    if attempt or half < 1:
                        raise
                    out.setdefault("out_of_memory", []).append(f"{name} at batch {batches[0][0].shape[0]}: "
                                                               f"{describe(error)}")
                    batches = [tuple(t[:half] for t in item) for item in batches]
            run["batch"] = batches[0][0].shape[0]
            run.pop("_losses")
            run["peak_memory_mb"] = peak_mb(device)
            out["runs"][name] = run
            log(f"training {name}: {run['images_per_s']} images/s, loss {run['loss_first']:.4g} -> "
                f"{run['loss_last']:.4g}")
        except Exception as error:
            out["runs"][name] = {"error": describe(error)}
            log(f"training {name} failed: {describe(error)}")
        finally:
            model = optimizer = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return out


class _ManyEpochs:
    """`CocoKeypointSamples` (the project's augmentation and targets) repeated over many epochs in ONE DataLoader
    with persistent workers: `pipelines.train.data.make_loader` builds a loader per epoch, and coco-mini's 65
    samples are 4 batches, so per-epoch worker start-up would dominate a learning run of thousands of steps."""

    def __init__(self, samples, crop: int, repeats: int):
        self.view, self.n, self.repeats = samples.for_epoch(0, crop), len(samples), repeats

    def __len__(self) -> int:
        return self.n * self.repeats

    def __getitems__(self, indices):
        self.view.epoch = int(indices[0])  # the augmentation rng is (seed, epoch, index): a new draw per batch
        return self.view.__getitems__([int(i) % self.n for i in indices])


def _loader_batches(samples, crop: int, batch: int, workers: int, seed: int):
    """An endless iterator of training batches (B, ...) tensors."""
    import cv2
    import torch
    from torch.utils.data import DataLoader

    from pipelines.train.data import _already_batched, _configure_loader_process, tune_malloc

    if workers:
        cv2.setNumThreads(1)  # an OpenCV pool running at fork time hangs the workers (pipelines.train.data)
    else:
        tune_malloc()
    dataset = _ManyEpochs(samples, crop, repeats=2000)
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True, num_workers=workers,
                        collate_fn=_already_batched, pin_memory=torch.cuda.is_available(),
                        worker_init_fn=_configure_loader_process, generator=generator,
                        prefetch_factor=4 if workers else None, persistent_workers=bool(workers))
    while True:
        yield from loader


def section_learning(cfg: dict, args, clock: Clock, results: dict) -> dict:
    import numpy as np
    import torch

    out = {"config": dict(cfg["learn_model"]), "crop": cfg["learn_crop"], "batch": cfg["learn_batch"],
           "eval_boxsize": cfg["learn_boxsize"], "AP": None}
    data = find_data(args.data)
    if data is None:
        out["AP_reason"] = "coco-mini not found (--data, $SIMPLEPOSE_SHARED, shared/ or ../shared)"
        return out
    if not have_pycocotools(results):
        out["AP_reason"] = (f"pycocotools is needed for the training targets (COCO index, masks) and COCOeval: "
                            f"{results.get('env', {}).get('pycocotools')}")
        return out
    from pipelines.images import decode_image
    from pipelines.train.data import CocoKeypointSamples
    from simplepose.augment import AugmentConfig
    from simplepose.coco import evaluate_keypoints
    from simplepose.decode import DecoderConfig, assemble, coco_results, find_candidates_batch
    from simplepose.infer import InferConfig, predict_heatmaps, prepare_model
    from simplepose.loss import LossConfig

    device = torch.device(cfg["device"])
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed crop shapes while training
    annotations = data / "annotations" / "person_keypoints_train2017.json"
    samples = CocoKeypointSamples(str(annotations), str(data / "train2017"),
                                  AugmentConfig(crop_size=cfg["learn_crop"]), seed=0)
    model = build_imhn({**cfg["learn_model"], "outputs": 50}).to(device)
    out["parameters"] = sum(p.numel() for p in model.parameters())
    out["samples"] = len(samples)
    lr, amp = 1e-3, (torch.bfloat16 if device.type == "cuda" else None)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    eval_reserve = 30.0 if device.type == "cuda" else 5.0
    max_s = max(1.0, min(cfg["learn_max_s"], clock.left() - eval_reserve))
    warm_steps = 50

    def lr_at(step: int) -> float:  # linear warm-up, then cosine over the expected steps (time-bounded run)
        if step < warm_steps:
            return lr * (step + 1) / warm_steps
        return lr * max(0.05, 0.5 * (1 + math.cos(math.pi * min(1.0, elapsed_fraction()))))

    started = time.perf_counter()

    def elapsed_fraction() -> float:
        return (time.perf_counter() - started) / max_s

    batches = _loader_batches(samples, cfg["learn_crop"], cfg["learn_batch"], cfg["loader_workers"], 0)
    run = _train_steps(model, optimizer, batches, cfg["learn_max_steps"], amp, False, device, LossConfig(),
                       clock=None, max_seconds=max_s, warmup=0, lr_at=lr_at)
    losses = run.pop("_losses")
    tail = max(1, len(losses) // 10)
    out.update(train_seconds=run["seconds"], steps=run["steps"], images_per_s=run["images_per_s"],
               epochs=round(run["steps"] * cfg["learn_batch"] / max(1, len(samples)), 1),
               loss_first_10pct=float(np.mean(losses[:tail])), loss_last_10pct=float(np.mean(losses[-tail:])),
               losses_finite=run["losses_finite"], precision="bf16" if amp is not None else "fp32", lr=lr)
    log(f"learning: {run['steps']} steps in {run['seconds']:.0f} s, loss {out['loss_first_10pct']:.4g} -> "
        f"{out['loss_last_10pct']:.4g}")
    # evaluation on the same images: whole photos, one scale, flip, stride-4 maps, default decoder, COCOeval
    prepare_model(model, device)
    torch.backends.cudnn.benchmark = False  # whole photos: a new shape per aspect ratio, no autotuning for each
    infer_config = InferConfig(boxsize=cfg["learn_boxsize"], scales=(1.0,), flip=True, aggregation="stride4")
    decoder_config = DecoderConfig()
    gt = json.loads(annotations.read_text())
    images = sorted(gt["images"], key=lambda image: image["id"])
    if cfg["learn_eval_images"]:
        images = images[:cfg["learn_eval_images"]]
    start, results_list = time.perf_counter(), []
    for k in range(0, len(images), 8):
        chunk = images[k:k + 8]
        decoded = [decode_image((data / "train2017" / image["file_name"]).read_bytes()) for image in chunk]
        heatmaps = predict_heatmaps(model, [d.image for d in decoded], infer_config, dtype=amp)
        for image, candidates in zip(chunk, find_candidates_batch(heatmaps, decoder_config)):
            results_list += coco_results(assemble(candidates, decoder_config), image["id"])
    stats = evaluate_keypoints(gt, results_list, image_ids=[image["id"] for image in images])
    out.update(eval_seconds=round(time.perf_counter() - start, 2), eval_images=len(images),
               detections=len(results_list), AP=stats["AP"], AP50=stats["AP50"], AR=stats["AR"])
    return out


# --------------------------------------------------------------------------------------------------- driver
SECTIONS = {"env": section_env, "network": section_network, "precision": section_precision,
            "label_stage": section_label_stage, "training": section_training, "learning": section_learning}


def emit(results: dict, out_file: str | None) -> None:
    text = json.dumps(results, default=str, allow_nan=True)
    if out_file:
        Path(out_file).write_text(text + "\n")
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny configurations on the CPU (< 1 minute)")
    parser.add_argument("--budget-s", type=float, default=None, help="overall time budget (default 450; smoke 150)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda; cpu with --smoke)")
    parser.add_argument("--data", default=None, help="coco-mini folder (annotations/, train2017/)")
    parser.add_argument("--wheels", default=None, help="folder of wheels to use when pycocotools is missing")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset to run")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile runs")
    parser.add_argument("--out", default=None, help="also write the JSON object to this file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                        help="override a configuration value, e.g. --set learn_max_s=120 --set train_batch=8")
    args = parser.parse_args(argv)
    cfg = dict(SMOKE if args.smoke else FULL)
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in cfg:
            parser.error(f"--set: unknown key {key!r}; known: {sorted(cfg)}")
        cfg[key] = json.loads(value)
    if args.device:
        cfg["device"] = args.device
    if args.budget_s is not None:
        cfg["budget_s"] = args.budget_s
    wanted = [name for name in args.sections.split(",") if name]
    unknown = sorted(set(wanted) - set(SECTIONS))
    if unknown:
        parser.error(f"--sections: unknown {unknown}; known: {list(SECTIONS)}")
    if "env" not in wanted:
        wanted.insert(0, "env")  # finds pycocotools and the data for the others

    import torch

    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        log("no CUDA GPU visible: the sections will fail with that reason (use --smoke or --device cpu)")
    if cfg["device"] == "cpu":
        torch.set_num_threads(cfg["cpu_threads"] or max(1, os.cpu_count() or 1))

    budget, begin = float(cfg["budget_s"]), time.perf_counter()
    results: dict = {"gpu_check": 1, "complete": False, "sections": {}}
    lock = threading.Lock()
    emitted = threading.Event()

    def watchdog():  # the whole budget overrun (a section stuck past its share): print what there is and exit
        with lock:
            if emitted.is_set():
                return
            emitted.set()
            results["watchdog"] = (f"overall budget {budget:.0f} s exceeded (+15 s grace) in section "
                                   f"{current['name']}; exiting early")
            results["sections"].setdefault(current["name"], {"ok": False, "error": "interrupted by the watchdog"})
            try:
                emit(json.loads(json.dumps(results, default=str)), args.out)
            finally:
                os._exit(3)

    timer = threading.Timer(budget + 15.0, watchdog)
    timer.daemon = True
    timer.start()
    current = {"name": None}
    for index, name in enumerate(wanted):
        current["name"] = name
        remaining = budget - (time.perf_counter() - begin)
        share = SHARES[name] / sum(SHARES[n] for n in wanted[index:])
        clock = Clock(max(0.0, remaining * share))
        log(f"section {name}: {clock.allowance:.0f} s of {remaining:.0f} s left")
        info = {"allowance_s": round(clock.allowance, 1)}
        try:
            function = SECTIONS[name]
            params = inspect.signature(function).parameters
            value = function(cfg, args, clock, results) if "results" in params else function(cfg, args, clock)
            with lock:
                results[name] = value
            info["ok"] = True
        except Exception as error:
            with lock:
                results[name] = {"error": describe(error)}
            info.update(ok=False, error=describe(error))
            log(f"section {name} failed:\n{traceback.format_exc()}")
        finally:
            if cfg["device"] == "cuda" and torch.cuda.is_available():
                torch.cuda.empty_cache()
        info["seconds"] = round(clock.elapsed(), 2)
        with lock:
            results["sections"][name] = info
    timer.cancel()
    with lock:
        if emitted.is_set():
            return 3
        emitted.set()
        results["complete"] = True
        results["total_s"] = round(time.perf_counter() - begin, 2)
        results["ray_imported"] = "ray" in sys.modules
        emit(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
