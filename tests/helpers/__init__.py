"""What the tests share beyond pytest fixtures: builders, clients and pollers that several test files use."""
