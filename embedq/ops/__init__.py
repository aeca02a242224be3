"""What operators run beside the workers: the stream exporter, top, verify, migrate."""
