"""Plumbing ark-server and ark-client share: processes and Flower array payloads.

The processes they start and stop, and the Flower ``Array`` payloads they turn into torch
tensors and back.
"""
