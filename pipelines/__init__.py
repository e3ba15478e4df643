"""Ray programs built from `simplepose`: labeling (Ray Data), training (Ray Train), evaluation."""
