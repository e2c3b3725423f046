"""Shipping a model: the Hub push with its model card (push.py, card.py)."""
