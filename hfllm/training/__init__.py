"""Pretraining building blocks used by `hfllm/run_pretrain.py`: recipe parsing, optimizers, callbacks, metadata."""
