"""Differential privacy, in one place: accounting (noise plans, epsilon, the run's record),
DP-SGD (Opacus on the LoRA tensors), the ledger every release is charged in before it happens,
epsilon across versions per example (ancestry), and the canary audit that measures it.

Imports nothing itself: ClientApps import the light ledger without torch or Opacus.
"""
