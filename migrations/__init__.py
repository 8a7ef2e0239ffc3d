"""The schema, as versioned SQL applied by dbmate; installed as the package service.core.migrations
(see pyproject.toml) so that a regular install finds it."""
