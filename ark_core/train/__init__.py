"""Training: the cyclic teacher-student trainer and the centralized run built on it."""
