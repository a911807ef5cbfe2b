"""What the train stage (`stages.train`) runs on: the memory estimate it checks before loading a
model, the checkpoints it resumes from, and the launch of several processes through torch.distributed."""
