"""MLflow tracking: the run and its status, the outbox, the heartbeat, the store."""
