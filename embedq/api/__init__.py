"""``embedq serve``: the online gateway (OpenAI-compatible embeddings and search through the
fleet's interactive lane). ``app`` has the routes, ``fleet`` the way through the workers,
``limits`` the API keys and the shared rate limit, ``requests`` what a body may hold,
``telemetry`` the metrics, ``serve`` the server process."""
