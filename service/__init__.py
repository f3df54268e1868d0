"""imagepub's HTTP API. It validates, records, enqueues and reads jobs; it never imports Docker
or boto3 — the workers own every external system."""
