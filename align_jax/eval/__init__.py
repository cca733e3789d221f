"""Evaluation: scoring with a trained reward model (reward.py)."""
