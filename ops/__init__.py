"""Plumbing ark-server and ark-client share: the processes they start and stop."""
