"""One module per resource; routes stay thin and call the catalog, the store and the queue."""
