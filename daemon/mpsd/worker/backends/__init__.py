"""Model backends a worker can run. Imported only inside worker processes."""
