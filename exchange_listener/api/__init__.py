"""The HTTP API sending platforms integrate with (``exchange-listener api``): sends, enrollments,
transitions, health and metrics over bearer-token HTTP, described by ``openapi.json``."""
