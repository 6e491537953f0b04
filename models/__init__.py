"""PyTorch modules and diffusion math. Imports neither Flyte, MLflow nor TorchX (a test enforces it)."""
