"""Training: objectives, losses, the loop, and the run driver."""
