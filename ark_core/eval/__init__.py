"""Evaluation: predictions, metrics, downstream protocols, subgroups, reports, model card.

Downstream protocols are the linear probe, few-shot, zero-shot and fine-tuning; reports
include plots and TensorBoard scalars.
"""
