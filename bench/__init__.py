"""imagepub's benchmark suite (issue 7). Run it with ``bench/run`` or ``python -m bench``."""
