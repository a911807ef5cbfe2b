"""The build machinery: spec → task descriptions → doit graph, and what wraps every task
(hashing, atomic writes, run records, the lock, the action cache, registry transfers)."""
