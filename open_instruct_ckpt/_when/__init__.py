"""WHEN to save: the save schedule and interval policy, preemption signals, argument checks."""
