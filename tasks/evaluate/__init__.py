"""Evaluation stage: held-out flow-matching loss, samples from the rectified-flow sampler, a report."""
