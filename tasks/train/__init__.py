"""Training tasks: each pretraining stage and post-training launch the SPMD trainer (trainer/) through TorchX."""
