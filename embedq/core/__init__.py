"""What every layer shares: settings, errors, Redis key names, the stream contract."""
