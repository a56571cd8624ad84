"""sfpo inside TRL: :mod:`.fused_loss` (sfpo's fused LM head as ``GRPOTrainer``'s loss).

Importing this package imports nothing from ``trl``: only its modules need it.
"""
