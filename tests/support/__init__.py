"""What the tests run on, kept out of the product (issue 24): server launchers
(servers.py), worker processes (fault_fixtures.py), the CLI as a subprocess (cli.py),
in-memory stand-ins (stubs.py), the in-process gateway (api_fixtures.py), Prometheus
(prometheus.py), tiny sparse models (sparse_models.py), a served Milvus Lite and the sinks a
test closes (sink_fixtures.py), and the rule that sorts tests into layers (layers.py)."""
