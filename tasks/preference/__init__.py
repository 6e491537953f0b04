"""Preference pairs for the Flow-DPO stage: a LatentDataset -> a PreferencePairs folder (docs/artifacts.md,
docs/post_training.md). ``labels.py``: the pair table and its resolution; ``encode.py``: human pairs encoded with
the dataset's VAE and text encoder; ``auto.py``: automatic pairs (corrupted held-in latents); ``build.py``:
``run_pairs`` picks one; ``task.py``: the Flyte task (the only module here that imports flytekit)."""
