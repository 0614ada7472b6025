"""Knowledge-editing harness: configuration, models, statistics, run loop, records, CLI."""
