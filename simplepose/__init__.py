"""Simple Pose (Li, Su, Wang, AAAI 2020) as a plain library: heatmaps in, persons out.

No Ray, MLflow or object-store clients are imported here; callers hand in file objects or paths.
"""
__version__ = "0.1.0"


def load_model(path, **kwargs):
    """Build an IMHN from our checkpoint or the authors' (`simplepose.checkpoint.load_model`)."""
    # Imported on call, like `Predictor` below: `import simplepose` stays light, without torch.
    from simplepose.checkpoint import load_model as _load_model

    return _load_model(path, **kwargs)


__all__ = ["Predictor", "load_model"]


def __getattr__(name):
    """`simplepose.Predictor` (imported on first use: `import simplepose` stays light, without torch)."""
    if name == "Predictor":
        from simplepose.predictor import Predictor

        return Predictor
    raise AttributeError(f"module 'simplepose' has no attribute {name!r}")
