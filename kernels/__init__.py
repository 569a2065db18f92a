"""The fused LoRA kernel: tensors in, tensors out; imports torch and triton only.

dispatch.py decides which LoRA path runs (fused Triton or torch) for the layer and the memory
planner alike; reference.py holds the torch side of the contract (input checks, the dropout
mask, the torch paths); lora.py is the autograd Function and its launchers, lora_kernels.py
the Triton kernels, tuning.py their block sizes.
"""
