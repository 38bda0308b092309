"""Training: setup -> fit -> finalize, the step and its objective, optimizer, data loader, and what is measured
and drawn between epochs."""
