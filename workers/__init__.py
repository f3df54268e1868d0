"""imagepub's workers: the Celery app, its tasks, and one module per external system."""
