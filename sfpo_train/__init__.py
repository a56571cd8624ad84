"""SFPO training: the update rule, its alpha schedule and the training loops.

This release ships the command-line entry point (``sfpo``) with the kernel
demo; the update rule (``SFPOConfig``, ``SFPO``) and the trainers build on
:mod:`sfpo_kernels` in the following releases.
"""
