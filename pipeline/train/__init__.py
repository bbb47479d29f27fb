"""Distributed training: one rank's run (main), the engine (DeepSpeed or plain PyTorch), the loop,
evaluation, checkpoints and the GPU-hour account."""
