"""What every stage stands on: the spec, the task description, hashing, atomic writes, run records,
the lock, the action cache and the registry transfers it shares through. Nothing here imports a
stage; `stages.graph`, above the stages, wires them into doit."""
